"""Linear products for the fast engine: fp32 with weights pre-packed for MKL (exact), or
int8 weights (an opt-in that trades exactness for speed)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def mkl_packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    mkl = getattr(torch.ops, "mkl", None)
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkl.is_available()
        and mkl is not None
        and hasattr(mkl, "_mkl_linear")
    )


class Proj:
    """A linear product, optionally with its weight pre-packed for MKL at ``m`` rows.

    ``F.linear`` makes MKL pack the weight into its GEMM layout on every call; at decode
    sizes (tens of rows) that extra pass over the weight is a large share of the product
    (measured here, the 30 blocks' shapes at 64 rows on 2 threads: 220 vs 292 GFLOP/s). ``torch.ops.mkl._mkl_linear``
    (what inductor's weight prepacking calls) uses a layout packed once, and only when the
    input has exactly ``m`` rows; smaller decode batches down to ``m/2`` rows are padded to
    ``m`` since that still wins, anything else takes ``F.linear``."""

    __slots__ = ("w", "b", "packed", "m", "int8")

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None):
        self.w, self.b, self.packed, self.m, self.int8 = w, b, None, 0, None

    def quantize(self) -> None:
        """int8 weights, one scale per output channel (symmetric), and activations
        quantised per call (``quantized::linear_dynamic``, fbgemm/oneDNN VNNI kernels).
        Not exact: outputs drift from fp32, and a row's activation scale is shared with its
        batch mates, so results depend on the batch."""
        scale = (self.w.abs().amax(dim=1).clamp(min=1e-12) / 127).double()
        zero = torch.zeros(self.w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated (#184982)
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(self.w, scale, zero, 0, torch.qint8)
            self.int8 = torch.ops.quantized.linear_prepack(q, self.b)

    def pack(self, m: int) -> None:
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.w, m)
        self.m = m

    def unpack(self) -> None:
        self.packed, self.m = None, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None:
            # reduce_range: 7-bit activations, the setting x86 kernels need to avoid
            # saturating 16-bit intermediate sums (torch.ao's default for fbgemm).
            return torch.ops.quantized.linear_dynamic(x, self.int8, True)
        n, m = x.shape[0], self.m
        if self.packed is None or not (2 * n >= m and n <= m):
            return F.linear(x, self.w, self.b)
        if n < m:
            x = torch.cat([x, x.new_zeros(m - n, x.shape[1])])
        y = torch.ops.mkl._mkl_linear(x, self.packed, self.w, self.b, m)
        return y if n == m else y[:n]
