"""The artifact store in both modes: a local (or shared-filesystem) folder, and an object
store, here a real S3-compatible server (moto's, started by the test on a free port)
that two "machines" (two stores with their own cache folders) share.

    .venv/bin/python -m pytest -q tests/test_store.py
"""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest

from service.store import ArtifactStore, NotFound, StoreError


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server in a thread of the test process; yields its storage options."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    from api.redis_server import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    server.stop()


@pytest.fixture
def s3_url(s3_server) -> str:
    """A fresh bucket (and prefix) per test."""
    import s3fs

    bucket = f"b{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**s3_server).mkdir(bucket)
    return f"s3://{bucket}/distillery"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore(tmp_path / "home")
    url = request.getfixturevalue("s3_url")
    return ArtifactStore(tmp_path / "cache", url, request.getfixturevalue("s3_server"))


def make_dataset(store: ArtifactStore, text: str = '{"a": 1}\n', **manifest) -> str:
    with store.create("dataset", tenant="t1", **manifest) as tmp:
        (tmp / "rows.jsonl").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "more.txt").write_text("x")
    return store.list("dataset")[-1]["id"]


def test_create_read_list_delete(store):
    """Both modes behave the same for every public method."""
    a = make_dataset(store, name="first")
    b = make_dataset(store, '{"b": 2}\n', name="second")
    assert [d["id"] for d in store.list("dataset")] == [a, b]
    assert store.list("dataset", tenant="t2") == []
    m = store.manifest("dataset", a)
    assert m["id"] == a and m["kind"] == "dataset" and m["tenant"] == "t1" and m["name"] == "first"
    assert set(m["files"]) == {"rows.jsonl", "sub/more.txt"}
    p = store.path("dataset", b)
    assert (p / "rows.jsonl").read_text() == '{"b": 2}\n' and (p / "sub" / "more.txt").is_file()
    assert json.loads((p / "manifest.json").read_text())["id"] == b
    for bad in ("ds_nothere0000000000", "mdl_0123456789abcdef0123", "../etc"):
        with pytest.raises(NotFound):
            store.path("dataset", bad)
        with pytest.raises(NotFound):
            store.manifest("dataset", bad)
    store.delete("dataset", a)
    with pytest.raises(NotFound):
        store.manifest("dataset", a)
    with pytest.raises(NotFound):
        store.path("dataset", a)
    assert [d["id"] for d in store.list("dataset")] == [b]


def test_files_and_ranged_reads(store, request, tmp_path):
    """One file's bytes, any range, by its manifest name; in object-store mode straight
    from the bucket (another machine reads: nothing lands in its cache)."""
    body = bytes(range(256)) * 4096  # 1 MiB
    with store.create("model", tenant="t1") as tmp:
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.bin").write_bytes(body)
        (tmp / "model" / "config.json").write_text("{}")
        (tmp / "result.json").write_text("{}")
    mid = store.list("model")[-1]["id"]
    if store.remote:
        store = ArtifactStore(
            tmp_path / "reader", store.remote, request.getfixturevalue("s3_server")
        )
    files = store.files("model", mid, under="model")
    assert [(f["name"], f["size"]) for f in files] == [
        ("config.json", 2),
        ("weights.bin", len(body)),
    ]
    assert files[1]["sha256"] == hashlib.sha256(body).hexdigest()
    name = "model/weights.bin"
    assert b"".join(store.read_range("model", mid, name)) == body
    assert b"".join(store.read_range("model", mid, name, 1000, 5000, chunk=1024)) == body[1000:5000]
    assert b"".join(store.read_range("model", mid, name, len(body) - 7)) == body[-7:]
    for bad in ("weights.bin", "../model/weights.bin", "manifest.json", "model/"):
        with pytest.raises(NotFound):
            store.read_range("model", mid, bad)
    if store.remote:
        assert not (store.kind_dir("model") / mid).exists()


def test_a_failed_create_leaves_nothing(store):
    with pytest.raises(RuntimeError), store.create("model", tenant="t1") as tmp:
        (tmp / "weights.bin").write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert store.list("model") == []
    assert not any(store.kind_dir("model").iterdir())
    if store.remote:
        assert not store.fs.glob(f"{store.base}/artifacts/model/**")


def test_two_machines_share_one_bucket(s3_url, s3_server, tmp_path):
    """What one worker writes, another (own cache folder) lists, reads and fetches; a
    replaced artifact is fetched again; a delete is seen by both."""
    one = ArtifactStore(tmp_path / "one", s3_url, s3_server)
    two = ArtifactStore(tmp_path / "two", s3_url, s3_server)
    art = make_dataset(one)
    assert [d["id"] for d in two.list("dataset")] == [art]  # listing is not cached stale
    assert not (tmp_path / "two" / "artifacts" / "dataset" / art).exists()
    p = two.path("dataset", art)
    assert p.is_relative_to(tmp_path / "two")
    assert (p / "rows.jsonl").read_text() == '{"a": 1}\n'
    assert two.manifest("dataset", art) == one.manifest("dataset", art)

    # A second path() uses the cached copy: a local-only marker file survives.
    (p / "cached-marker").write_text("")
    assert (two.path("dataset", art) / "cached-marker").exists()

    # A retried job registers the same id again: the other machine refetches it.
    with one.create("dataset", artifact_id=art, tenant="t1") as tmp:
        (tmp / "rows.jsonl").write_text('{"a": 2}\n')
    p = two.path("dataset", art)
    assert (p / "rows.jsonl").read_text() == '{"a": 2}\n'
    assert not (p / "sub").exists() and not (p / "cached-marker").exists()

    two.delete("dataset", art)
    with pytest.raises(NotFound):
        one.path("dataset", art)
    assert one.list("dataset") == []


def test_a_corrupt_download_is_refused(s3_url, s3_server, tmp_path):
    one = ArtifactStore(tmp_path / "one", s3_url, s3_server)
    art = make_dataset(one)
    one.fs.pipe_file(f"{one.base}/artifacts/dataset/{art}/rows.jsonl", b"tampered\n")
    two = ArtifactStore(tmp_path / "two", s3_url, s3_server)
    with pytest.raises(StoreError, match="sha256"):
        two.path("dataset", art)
    assert not (tmp_path / "two" / "artifacts" / "dataset" / art).exists()


def test_a_worker_loads_a_model_from_the_bucket(
    s3_url, s3_server, tmp_path, tiny_llama, monkeypatch
):
    """A model registered on one machine is resolved by id on another, through the
    settings (DISTILLERY_STORE_URL / _STORE_OPTIONS), into a local folder transformers
    loads."""
    import shutil

    from service.models import load_model
    from service.settings import get_settings

    with ArtifactStore(tmp_path / "one", s3_url, s3_server).create("model", tenant="t") as tmp:
        shutil.copytree(tiny_llama, tmp / "model")
    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path / "two"))
    monkeypatch.setenv("DISTILLERY_STORE_URL", s3_url)
    monkeypatch.setenv("DISTILLERY_STORE_OPTIONS", json.dumps(s3_server))
    get_settings.cache_clear()
    try:
        store = ArtifactStore.from_settings()
        (mdl,) = [m["id"] for m in store.list("model")]
        model, tok = load_model(mdl, device="cpu")
        assert model.config.num_hidden_layers == 6 and tok is not None
        assert (tmp_path / "two" / "artifacts" / "model" / mdl / "model" / "config.json").is_file()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
