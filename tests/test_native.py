"""The C decode kernels against torch: attention against SDPA, RMSNorm and RoPE against the
fast engine's torch ops (``llama_forward``), on the shapes the engine feeds them.

    .venv/bin/python -m pytest -q tests/test_native.py
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from service.teacher import native
from service.teacher.llama_forward import apply_rope, rms_norm

pytestmark = pytest.mark.skipif(
    not (shutil.which("gcc") or shutil.which("cc")), reason="no C compiler here"
)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILLERY_KERNEL_DIR", str(tmp_path_factory.mktemp("kernels")))
    native._loaded.clear()
    k = native.kernels()
    assert k is not None
    yield k
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
    out = kernel.attention(
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


@pytest.mark.parametrize("d,counts", [(64, [1, 1, 3, 1, 2]), (32, [1, 2])])
def test_shared_prefix_gives_the_same_bits(kernel, d, counts):
    """Keys/values of a prefix every slot holds, read from one shared copy: same output,
    bit for bit (same values, same order of the sums), register path and generic path."""
    torch.manual_seed(1)
    heads, kv_heads, P, max_len = 9, 3, 21, 90
    slots, rows = len(counts), sum(counts)
    k_cache = torch.randn(slots, kv_heads, max_len, d)
    v_cache = torch.randn(slots, kv_heads, max_len, d)
    k_cache[:, :, :P] = k_cache[0, :, :P]  # every slot holds the same prefix
    v_cache[:, :, :P] = v_cache[0, :, :P]
    pk, pv = k_cache[0, :, :P].clone(), v_cache[0, :, :P].clone()
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d)
    q = qkv[:, : heads * d].view(rows, heads, d)
    k_new = qkv[:, heads * d : (heads + kv_heads) * d].view(rows, kv_heads, d)
    v_new = qkv[:, (heads + kv_heads) * d :].view(rows, kv_heads, d)
    row_start = torch.tensor([0, *counts], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    pos = torch.tensor([P + 3 * s for s in range(slots)], dtype=torch.int32)
    args = (q, k_new, v_new)
    own = kernel.attention(*args, k_cache.clone(), v_cache.clone(), row_start, pos, 0.125)
    k_cache[:, :, :P] = 0  # the slots' copies are not read with a shared prefix
    v_cache[:, :, :P] = 0
    shared = kernel.attention(*args, k_cache, v_cache, row_start, pos, 0.125, (pk, pv))
    assert torch.equal(own, shared)
    with pytest.raises(ValueError, match="prefix"):
        kernel.attention(*args, k_cache, v_cache, row_start, pos - P, 0.125, (pk, pv))


def test_bad_inputs_are_refused(kernel):
    q = torch.randn(2, 4, 64, dtype=torch.float64)
    k = torch.randn(2, 2, 64)
    cache = torch.zeros(2, 2, 8, 64)
    idx = torch.tensor([0, 1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="float32"):
        kernel.attention(q, k, k, cache, cache, idx, idx[:2], 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.attention(q.float(), k, k, cache.transpose(2, 3), cache, idx, idx[:2], 0.1)
    with pytest.raises(ValueError, match="int32"):
        kernel.attention(q.float(), k, k, cache, cache, idx.long(), idx[:2], 0.1)
    with pytest.raises(ValueError, match="row_start"):  # 3 rows claimed, q has 2
        kernel.attention(q.float(), k, k, cache, cache, idx + 1, idx[:2], 0.1)
    with pytest.raises(ValueError, match="row_start"):  # one slot too many
        kernel.attention(q.float(), k, k, cache, cache, idx, idx, 0.1)
    with pytest.raises(ValueError, match="float32"):
        kernel.add_rms_norm(torch.randn(2, 8).double(), None, torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="shaped like"):
        kernel.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.rope(torch.randn(2, 8, 3).transpose(1, 2), torch.ones(2, 8), torch.ones(2, 8))


@pytest.mark.parametrize("rows,dim", [(1, 576), (64, 576), (7, 100), (300, 1024)])
def test_add_rms_norm_matches_torch(kernel, rows, dim):
    torch.manual_seed(rows)
    x, delta, w = torch.randn(rows, dim), torch.randn(rows, dim), torch.randn(dim)
    want_x = x + delta  # the residual add: torch's bits exactly
    want = rms_norm(want_x, w, 1e-5)
    got = kernel.add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(x, want_x)
    # Only the sum of squares adds up in another order: a few units in the last place.
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    assert torch.equal(kernel.add_rms_norm(want_x.clone(), None, w, 1e-5), got)


def test_rope_matches_torch_bit_for_bit(kernel):
    torch.manual_seed(0)
    rows, heads, d = 5, 12, 64
    qkv = torch.randn(rows, (heads + 3) * d)  # the q/k part of a q/k/v product
    cos, sin = torch.randn(rows, d), torch.randn(rows, d)
    x = qkv[:, : heads * d].view(rows, heads, d)
    want = apply_rope(x, cos.unsqueeze(1), sin.unsqueeze(1))
    v_before = qkv[:, heads * d :].clone()
    kernel.rope(x, cos, sin)
    assert torch.equal(x, want)
    assert torch.equal(qkv[:, heads * d :], v_before)  # v untouched


def test_switch_off_and_a_broken_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILLERY_NATIVE", "0")
    assert native.kernels() is None
    monkeypatch.delenv("DISTILLERY_NATIVE")
    monkeypatch.setenv("DISTILLERY_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setattr(native, "_loaded", {})
    assert native.kernels() is None  # torch and SDPA then, with a warning
    assert not list(tmp_path.glob("*.so"))
