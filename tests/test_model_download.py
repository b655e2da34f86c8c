"""Models out through the API: the file list, ranged reads, tenant isolation, and a
download that a dropped connection interrupts halfway, resumed by a second call, which
then loads with ``from_pretrained`` and generates.

    .venv/bin/python -m pytest tests/test_model_download.py -q
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from api.client import ApiError, Client

pytest_plugins = ["tests.redis_fixture"]
pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


class DroppingProxy:
    """A TCP proxy in front of the API that cuts the first response to a request whose
    request line holds ``match`` after ``cut_after`` bytes: a real dropped connection.
    It records every request head it forwards."""

    def __init__(self, upstream: str, match: bytes, cut_after: int):
        self.port_up = int(upstream.rsplit(":", 1)[1])
        self.match, self.cut_after, self.cut_done = match, cut_after, False
        self.heads: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.port_up)) as up:
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            # One request per connection, so the proxy knows where a response ends.
            lines = [ln for ln in head.split(b"\r\n\r\n")[0].split(b"\r\n")
                     if not ln.lower().startswith(b"connection:")]  # fmt: skip
            head = b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n"
            self.heads.append(head)
            up.sendall(head)
            cut = self.match in lines[0] and not self.cut_done
            self.cut_done = self.cut_done or cut
            sent = 0
            while data := up.recv(65536):
                if cut and sent + len(data) >= self.cut_after:
                    client.sendall(data[: self.cut_after - sent])
                    client.shutdown(socket.SHUT_RDWR)
                    return
                client.sendall(data)
                sent += len(data)

    def close(self) -> None:
        self.sock.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_files_ranges_and_isolation(api, api_url, tiny_model, tiny_llama, redis_conn):
    files = {f["name"]: f for f in api.get(f"/v1/models/{tiny_model}/files").json()["data"]}
    local = {p.name: p for p in tiny_llama.iterdir() if p.is_file()}
    assert set(files) == set(local)
    for name, f in files.items():
        assert f["size"] == local[name].stat().st_size and f["sha256"] == sha256(local[name])

    weights = local["model.safetensors"].read_bytes()
    url = f"/v1/models/{tiny_model}/files/model.safetensors"
    whole = api.get(url)
    assert whole.status_code == 200 and whole.content == weights
    assert whole.headers["accept-ranges"] == "bytes"
    part = api.get(url, headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == weights[1000:2000]
    assert part.headers["content-range"] == f"bytes 1000-1999/{len(weights)}"
    tail = api.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == weights[-10:]
    rest = api.get(url, headers={"Range": f"bytes={len(weights) - 5}-"})
    assert rest.content == weights[-5:]
    assert api.get(url, headers={"Range": f"bytes={len(weights)}-"}).status_code == 416
    stale = api.get(url, headers={"Range": "bytes=10-", "If-Range": '"0000"'})
    assert stale.status_code == 200 and stale.content == weights  # another version: all

    # Names are looked up in the manifest: the manifest itself, the job's files beside
    # the model and anything with .. are not files of the model.
    for bad in ("manifest.json", "../manifest.json", "..%2Fmanifest.json", "nope.bin"):
        r = api.get(f"/v1/models/{tiny_model}/files/{bad}")
        assert r.status_code == 404, (bad, r.status_code)

    from api.keys import create_key

    other = {"Authorization": f"Bearer {create_key(redis_conn, 'someone-else')}"}
    for path in (f"/v1/models/{tiny_model}/files", url):
        assert httpx.get(api_url + path, headers=other).status_code == 404


@pytest.mark.slow
def test_an_interrupted_download_resumes_and_loads(api_url, tenant_key, tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proxy = DroppingProxy(api_url, b"model.safetensors", cut_after=3 << 20)
    dest = tmp_path / "model"
    try:
        with Client(proxy.url, tenant_key[1]) as c:
            size = {f.name: f.size for f in c.model_files(tiny_model)}["model.safetensors"]
            with pytest.raises(httpx.TransportError):
                c.download_model(tiny_model, dest, retries=0)  # dropped: no retry
            part = dest / "model.safetensors.part"
            have = part.stat().st_size
            assert 0 < have < size and not (dest / "model.safetensors").exists()

            c.download_model(tiny_model, dest)  # a later call resumes from `have`
    finally:
        proxy.close()
    asks = [h for h in proxy.heads if b"model.safetensors" in h.split(b"\r\n")[0]]
    assert len(asks) == 2 and b"\r\nrange: bytes=%d-\r\n" % have in asks[1].lower()
    assert not list(dest.glob("*.part"))

    model = AutoModelForCausalLM.from_pretrained(dest)
    tok = AutoTokenizer.from_pretrained(dest)
    ids = tok("Hello", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 4 and torch.isfinite(model(ids).logits).all()


@pytest.mark.slow
def test_cli_download_checks_hashes(api_url, tenant_key, tiny_model, tiny_llama, tmp_path):
    dest = tmp_path / "dl"
    env = dict(os.environ, DISTILLERY_URL=api_url, DISTILLERY_API_KEY=tenant_key[1],
               PYTHONPATH=str(ROOT))  # fmt: skip
    cmd = [sys.executable, "-m", "api.cli", "models", "download", tiny_model, str(dest)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    for p in tiny_llama.iterdir():
        if p.is_file():
            assert sha256(dest / p.name) == sha256(p), p.name

    # A complete file whose bytes changed is noticed, fetched again and checked.
    (dest / "config.json").write_text("{}" + " " * ((dest / "config.json").stat().st_size - 2))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert sha256(dest / "config.json") == sha256(tiny_llama / "config.json")

    bad = subprocess.run(cmd[:-2] + ["mdl_" + "0" * 20, str(dest)], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert bad.returncode == 1 and "404" in bad.stderr


def test_client_refuses_bytes_that_do_not_match(api_url, tenant_key, tiny_model, tmp_path):
    """A server whose bytes differ from its manifest: the client refuses the file."""
    dest = tmp_path / "m"
    from service.store import ArtifactStore

    store = ArtifactStore(os.environ["DISTILLERY_HOME"])
    target = store.path("model", tiny_model) / "model" / "config.json"
    target.write_text(target.read_text().replace("llama", "LLAMA"))
    with Client(api_url, tenant_key[1]) as c, pytest.raises(ApiError, match="sha256"):
        c.download_model(tiny_model, dest)
    assert not (dest / "config.json").exists() and not (dest / "config.json.part").exists()


@pytest.mark.slow
def test_a_downloaded_model_runs_in_vllm(api_url, tenant_key, tiny_model, tmp_path):
    """The folder a caller downloads is a model vLLM serves, not only one transformers
    reads."""
    from service.teacher.base import GenParams, Request
    from service.teacher.vllm_engine import VLLMEngine
    from tests.test_vllm import vllm_settings  # vLLM's environment, restored afterwards

    dest = tmp_path / "model"
    with Client(api_url, tenant_key[1]) as c:
        c.download_model(tiny_model, dest)
    with vllm_settings():
        engine = VLLMEngine(str(dest), dtype="float32")
        try:
            (gen,) = engine.generate([Request((("user", "Hello"),))], GenParams(4), [0])
            assert gen.tokens == 4 or gen.finish_reason == "stop", gen
        finally:
            engine.close()
