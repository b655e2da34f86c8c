"""The C decode-attention kernel against SDPA, on the shapes the fast engine feeds it.

    .venv/bin/python -m pytest -q tests/test_native.py
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from service.teacher import native

pytestmark = pytest.mark.skipif(
    not (shutil.which("gcc") or shutil.which("cc")), reason="no C compiler here"
)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILLERY_KERNEL_DIR", str(tmp_path_factory.mktemp("kernels")))
    native._loaded.clear()
    fn = native.decode_attention_kernel()
    yield fn
    mp.undo()
    native._loaded.clear()


def reference(q, k_cache, v_cache, counts, pos, scale):
    """SDPA per slot and token row: token j of slot s sees keys 0..pos[s] + j."""
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    out, row = [], 0
    for s, (c, p) in enumerate(zip(counts, pos, strict=True)):
        for j in range(c):
            n = p + j + 1
            qi = q[row][None, :, None]  # [1, heads, 1, d]
            o = F.scaled_dot_product_attention(
                qi,
                k_cache[s : s + 1, :, :n],
                v_cache[s : s + 1, :, :n],
                scale=scale,
                enable_gqa=heads != kv_heads,
            )
            out.append(o.reshape(-1))
            row += 1
    return torch.stack(out)


@pytest.mark.parametrize(
    "heads,kv_heads,d,counts",
    [
        (9, 3, 64, [1, 1, 1, 1, 1]),  # plain decode, 3 query rows per key/value head
        (9, 3, 64, [1, 4, 2, 1]),  # drafts: up to 12 query rows, the register path
        (4, 1, 64, [5, 1, 4]),  # 20 query rows: the generic path
        (4, 2, 32, [1, 3]),  # another head size: the generic path
        (2, 2, 64, [1, 2]),  # no grouping
    ],
)
def test_kernel_equals_sdpa_and_writes_the_cache(kernel, heads, kv_heads, d, counts):
    torch.manual_seed(0)
    slots, max_len, scale = len(counts), 70, d**-0.5
    pos = [int(p) for p in torch.randint(0, 60, (slots,))]
    pos[0] = 0  # a first token with no history
    rows = sum(counts)
    k_cache = torch.randn(slots, kv_heads, max_len, d)
    v_cache = torch.randn(slots, kv_heads, max_len, d)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d)  # row-strided views, as decode has
    q = qkv[:, : heads * d].view(rows, heads, d)
    k_new = qkv[:, heads * d : (heads + kv_heads) * d].view(rows, kv_heads, d)
    v_new = qkv[:, (heads + kv_heads) * d :].view(rows, kv_heads, d)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    row = 0
    for s, (c, p) in enumerate(zip(counts, pos, strict=True)):
        want_k[s, :, p : p + c] = k_new[row : row + c].transpose(0, 1)
        want_v[s, :, p : p + c] = v_new[row : row + c].transpose(0, 1)
        row += c
    row_start = torch.tensor([0, *counts], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    out = native.decode_attention(
        kernel,
        q,
        k_new,
        v_new,
        k_cache,
        v_cache,
        row_start,
        torch.tensor(pos, dtype=torch.int32),
        scale,
    )
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    ref = reference(q, want_k, want_v, counts, pos, scale)
    torch.testing.assert_close(out.view(rows, -1), ref, rtol=1e-5, atol=2e-6)


def test_bad_inputs_are_refused(kernel):
    q = torch.randn(2, 4, 64, dtype=torch.float64)
    k = torch.randn(2, 2, 64)
    cache = torch.zeros(2, 2, 8, 64)
    idx = torch.tensor([0, 1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="float32"):
        native.decode_attention(kernel, q, k, k, cache, cache, idx, idx[:2], 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        native.decode_attention(
            kernel, q.float(), k, k, cache.transpose(2, 3), cache, idx, idx[:2], 0.1
        )


def test_switch_off_and_a_broken_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILLERY_NATIVE", "0")
    assert native.decode_attention_kernel() is None
    monkeypatch.delenv("DISTILLERY_NATIVE")
    monkeypatch.setenv("DISTILLERY_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setattr(native, "_loaded", {})
    assert native.decode_attention_kernel() is None  # SDPA then, with a warning
    assert not list(tmp_path.glob("*.so"))
