"""The fast engine's C decode-attention kernel (``decode_attention.c``): built on first use
with the machine's C compiler, loaded with ctypes, and optional: where there is no
compiler or the build fails, :func:`decode_attention_kernel` returns None and the engine
uses SDPA.

Built with ``-O3 -march=native -ffast-math -fopenmp`` for the machine it runs on, into
``$DISTILLERY_KERNEL_DIR`` (default: the user's cache folder), keyed by the source, the
flags and the CPU, so a copy built on one machine is never loaded on another. It is
linked without ``-ffast-math`` so the library does not set the process's flush-to-zero
mode on load (GCC < 13 links ``crtfastmath.o`` into shared objects built with it). It
links ``libgomp.so.1``, which torch has already loaded, so its threads are torch's.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.c")
COMPILE = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11"]
LINK = ["-shared", "-fopenmp", "-lm"]
_lock = threading.Lock()
_loaded: dict[str, object] = {}


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keys = ("model name", "flags")
    return "\n".join(sorted({ln for ln in text.splitlines() if ln.split(":")[0].strip() in keys}))


def _cache_dir() -> Path:
    env = os.environ.get("DISTILLERY_KERNEL_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distillery" / "kernels"


def build(source: Path = SOURCE) -> Path:
    """Compile ``source`` to a shared library (cached); raise on failure."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    key = hashlib.sha256(
        "\0".join([source.read_text(), cc, *COMPILE, *LINK, _cpu_id()]).encode()
    ).hexdigest()[:16]
    out = _cache_dir() / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, lib = Path(tmp) / "k.o", Path(tmp) / "k.so"
        for cmd in (
            [cc, *COMPILE, "-c", str(source), "-o", str(obj)],
            [cc, str(obj), "-o", str(lib), *LINK],
        ):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(lib, out)  # atomic: a concurrent builder loads one whole file or the other
    return out


def decode_attention_kernel():
    """The loaded ``distillery_decode_attention`` function, or None where it cannot be
    built here (``DISTILLERY_NATIVE=0`` turns it off)."""
    if os.environ.get("DISTILLERY_NATIVE", "1") == "0":
        return None
    with _lock:
        if "fn" not in _loaded:
            _loaded["fn"] = None
            try:
                lib = ctypes.CDLL(str(build()))
                fn = lib.distillery_decode_attention
                i64, i32, f32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
                fn.argtypes = [p, i64, p, i64, p, i64, p, p, i64, p, p, p]
                fn.argtypes += [i32, i32, i32, i32, f32, i32]
                fn.restype = ctypes.c_int
                _loaded["fn"] = fn
            except (OSError, RuntimeError) as exc:
                log.warning("native decode attention unavailable, using SDPA: %s", exc)
        return _loaded["fn"]


def decode_attention(
    fn,
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_start: torch.Tensor,
    pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Write ``k_new``/``v_new`` into one layer's cache and attend; [rows, heads * d].

    ``q`` [rows, heads, d], ``k_new``/``v_new`` [rows, kv_heads, d] (row-strided views are
    fine; each row's heads must be contiguous), caches [slots, kv_heads, max_len, d]
    contiguous, ``row_start`` int32 [slots + 1], ``pos`` int32 [slots]."""
    rows, heads, d = q.shape
    kv_heads = k_new.shape[1]
    for t in (q, k_new, v_new):
        if t.dtype != torch.float32 or t.stride(2) != 1 or t.stride(1) != d:
            raise ValueError("q, k and v rows must be float32 with contiguous heads")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the caches must be contiguous")
    out = torch.empty(rows, heads * d)
    rc = fn(
        q.data_ptr(),
        q.stride(0),
        k_new.data_ptr(),
        k_new.stride(0),
        v_new.data_ptr(),
        v_new.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.shape[2],
        row_start.data_ptr(),
        pos.data_ptr(),
        out.data_ptr(),
        pos.shape[0],
        heads,
        kv_heads,
        d,
        scale,
        torch.get_num_threads(),
    )
    if rc:
        raise MemoryError("decode attention could not allocate its buffers")
    return out
