"""The fast engine's C kernels, built on first use with the machine's C compiler and
loaded with ctypes: decode-step attention (``decode_attention.c``) and the fused small
operations of a decode step (``decode_ops.c``: RMSNorm with the residual add, RoPE). They
are optional: where there is no compiler or the build fails, :func:`kernels` returns None
and the engine runs those steps in torch (SDPA for attention).

``decode_attention.c`` is built with ``-ffast-math`` (vectorised sums and exp), and
``decode_ops.c`` without it and with ``-ffp-contract=off``, so RoPE and the residual add
round exactly as torch does. Both with ``-O3 -march=native -fopenmp`` for the machine they
run on, into ``$DISTILLERY_KERNEL_DIR`` (default: the user's cache folder), keyed by the
sources, the flags and the CPU, so a copy built on one machine is never loaded on another.
The library is linked without ``-ffast-math``, so it does not set the process's
flush-to-zero mode on load (GCC < 13 links ``crtfastmath.o`` into shared objects built
with it), and it links ``libgomp.so.1``, which torch has already loaded: one OpenMP
runtime, torch's threads.
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

from service.once import made_once

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COMMON = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11"]
SOURCES = {
    HERE / "decode_attention.c": [*COMMON, "-ffast-math"],
    HERE / "decode_ops.c": [*COMMON, "-fno-fast-math", "-ffp-contract=off"],
}
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


def build(sources: dict[Path, list[str]] = SOURCES) -> Path:
    """Compile ``sources`` (path -> compiler flags) into one shared library (cached);
    raise RuntimeError on failure."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    parts = [cc, *LINK, _cpu_id()]
    for src, flags in sources.items():
        parts += [src.name, src.read_text(), *flags]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    out = _cache_dir() / f"distillery-kernels-{key}.so"
    with made_once(out) as todo:  # one process compiles; the others wait, then load it
        if todo:
            _compile(sources, cc, out)
    return out


def _compile(sources: dict[Path, list[str]], cc: str, out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs = [Path(tmp) / f"{src.stem}.o" for src in sources]
        cmds = [
            [cc, *flags, "-c", str(src), "-o", str(obj)]
            for (src, flags), obj in zip(sources.items(), objs, strict=True)
        ]
        lib = Path(tmp) / "k.so"
        cmds.append([cc, *map(str, objs), "-o", str(lib), *LINK])
        for cmd in cmds:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(lib, out)  # atomic: a reader sees no file or the whole one


class Kernels:
    """The loaded library's functions, checked at the boundary (C trusts its arguments)."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        i64, i32, f32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        self._attention = lib.distillery_decode_attention
        self._attention.argtypes = [p, i64, p, i64, p, i64, p, p, i64, p, p, p, p, i32, p]
        self._attention.argtypes += [i32, i32, i32, i32, f32, i32]
        self._attention.restype = ctypes.c_int
        self._norm = lib.distillery_add_rms_norm
        self._norm.argtypes = [p, p, p, p, i64, i64, f32, i32]
        self._norm.restype = None
        self._rope = lib.distillery_rope
        self._rope.argtypes = [p, i64, p, p, i64, i64, i64]
        self._rope.restype = None

    def attention(
        self, q, k_new, v_new, k_cache, v_cache, row_start, pos, scale, prefix=None
    ) -> torch.Tensor:
        """Write ``k_new``/``v_new`` into one layer's cache and attend; [rows, heads * d].

        ``q`` [rows, heads, d], ``k_new``/``v_new`` [rows, kv_heads, d] (row-strided views
        are fine; each row's heads must be contiguous), caches [slots, kv_heads, max_len,
        d] contiguous, ``row_start`` int32 [slots + 1], ``pos`` int32 [slots]: slot s's
        rows are ``row_start[s]..row_start[s+1]-1`` at positions ``pos[s], pos[s] + 1, ...``
        (the caller keeps them inside ``max_len``). ``prefix``: (keys, values) [kv_heads, P,
        d] that every slot holds at positions 0..P-1; read from there instead."""
        rows, heads, d = q.shape
        for t in (q, k_new, v_new):
            if t.dtype != torch.float32 or t.stride(2) != 1 or t.stride(1) != d:
                raise ValueError("q, k and v rows must be float32 with contiguous heads")
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("the caches must be contiguous")
        if row_start.dtype != torch.int32 or pos.dtype != torch.int32:
            raise ValueError("row_start and pos must be int32")
        pk, pv = prefix if prefix is not None else (None, None)
        P = 0 if pk is None else pk.shape[1]
        if P and not (
            pk.shape == pv.shape == (k_new.shape[1], P, d)
            and pk.is_contiguous()
            and pv.is_contiguous()
            and pk.dtype == pv.dtype == torch.float32
            and int(pos.min()) >= P
        ):
            raise ValueError("prefix must be contiguous float32 [kv_heads, P, d] before every pos")
        used = int(row_start[-1])
        if row_start.shape[0] != pos.shape[0] + 1 or used > rows or k_new.shape[0] != rows:
            raise ValueError("row_start must be [slots + 1] and its rows within q, k and v")
        out = torch.empty(rows, heads * d)
        if used < rows:  # rows past the slots' (dummy rows): zeros, not garbage
            out[used:].zero_()
        rc = self._attention(
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
            pk.data_ptr() if P else None,
            pv.data_ptr() if P else None,
            P,
            out.data_ptr(),
            pos.shape[0],
            heads,
            k_new.shape[1],
            d,
            scale,
            torch.get_num_threads(),
        )
        if rc:
            raise MemoryError("decode attention could not allocate its buffers")
        return out

    def add_rms_norm(self, x, delta, weight, eps: float, out=None) -> torch.Tensor:
        """``x += delta`` in place (unless ``delta`` is None), then LlamaRMSNorm of ``x``
        with ``weight``; [rows, dim] float32, contiguous."""
        for t in (x, weight, delta, out):
            if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
                raise ValueError("add_rms_norm takes contiguous float32 tensors")
        if delta is not None and delta.shape != x.shape:
            raise ValueError("delta must be shaped like x")
        out = torch.empty_like(x) if out is None else out
        rows, dim = x.shape
        self._norm(
            x.data_ptr(),
            None if delta is None else delta.data_ptr(),
            weight.data_ptr(),
            out.data_ptr(),
            rows,
            dim,
            eps,
            torch.get_num_threads(),
        )
        return out

    def rope(self, x, cos, sin) -> None:
        """RoPE in place on ``x`` [rows, heads, d] (row-strided, heads contiguous) with
        each row's ``cos``/``sin`` [rows, d] (contiguous float32)."""
        rows, heads, d = x.shape
        ok = x.dtype == cos.dtype == sin.dtype == torch.float32
        ok = ok and x.stride(2) == 1 and x.stride(1) == d
        if not (ok and cos.is_contiguous() and sin.is_contiguous()):
            raise ValueError("rope takes float32 x with contiguous heads, contiguous cos/sin")
        self._rope(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), rows, heads, d)


def kernels() -> Kernels | None:
    """The loaded kernels, or None where they cannot be built here
    (``DISTILLERY_NATIVE=0`` turns them off)."""
    if os.environ.get("DISTILLERY_NATIVE", "1") == "0":
        return None
    with _lock:
        if "k" not in _loaded:
            _loaded["k"] = None
            try:
                _loaded["k"] = Kernels(build())
            except (OSError, RuntimeError, AttributeError) as exc:
                log.warning("native decode kernels unavailable, using torch: %s", exc)
        return _loaded["k"]
