"""The forward pass of a Llama-family Hugging Face model, written out on its own weights.

The fast engine calls :meth:`LlamaForward.prefill` and :meth:`LlamaForward.decode` instead
of ``model(...)``: one fused q/k/v product and one fused gate/up product per block, a
:class:`~service.teacher.kv.SlotCache` written in place (no ``torch.cat`` per step), no mask
building or output objects, and the LM head only on the rows that pick a token.

Every operation repeats the one ``transformers/models/llama/modeling_llama.py`` runs, in
the same order (RMSNorm in fp32 with ``rsqrt(mean(x^2) + eps)``, RoPE as ``x*cos +
rotate_half(x)*sin`` with cos/sin from the model's own ``rotary_emb``, SDPA as
``integrations/sdpa_attention.py`` calls it: ``is_causal`` + ``enable_gqa`` for a fresh
prompt, the query heads packed per key/value head with a boolean mask for one new token),
so greedy tokens match ``generate``'s up to fp32 reduction order (different matrix shapes
sum in a different order; a near-tie in the logits can then flip).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.teacher.kv import SlotCache
from service.teacher.proj import Proj, mkl_packing_available

PACK_BUDGET = 4 * 2**30  # bytes of MKL-packed weights (see LlamaForward.pack)
# Architectures whose decoder block is Llama's (optionally with q/k/v biases: Qwen2).
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# RoPE variants whose cos/sin do not depend on the sequence length ("dynamic" and
# "longrope" rescale with it, which a precomputed table cannot follow).
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def unsupported_reason(model) -> str | None:
    """Why :class:`LlamaForward` cannot run ``model`` exactly, or None when it can."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_TYPES:
        return f"model type {cfg.model_type!r} is not one of {SUPPORTED_TYPES}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} is not silu"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in STATIC_ROPE:
        return f"rope type {rope.get('rope_type')!r} depends on the sequence length"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention is not implemented"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "not a decoder-only model with model.layers and model.rotary_emb"
    return None


@dataclass
class _Block:
    ln1: torch.Tensor
    qkv: Proj
    o: Proj
    ln2: torch.Tensor
    gate_up: Proj
    down: Proj


def _bias(linear: torch.nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight for several linears sharing an input; the modules get views into it so
    the model keeps working and no weight is stored twice."""
    w = torch.cat([m.weight.detach() for m in linears]).contiguous()
    b = None
    if linears[0].bias is not None:
        b = torch.cat([m.bias.detach() for m in linears]).contiguous()
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = w[start : start + rows]
        if b is not None:
            m.bias.data = b[start : start + rows]
        start += rows
    return w, b


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # LlamaRMSNorm.forward, op for op.
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # apply_rotary_pos_emb with rotate_half, op for op.
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


class LlamaForward:
    def __init__(self, model):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(reason)
        cfg = model.config
        inner = model.model
        attn0 = inner.layers[0].self_attn
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = attn0.head_dim
        self.scaling = attn0.scaling
        self.eps = cfg.rms_norm_eps
        self.intermediate = cfg.intermediate_size
        self.layers = len(inner.layers)
        self.embed = inner.embed_tokens.weight.detach()
        self.norm = inner.norm.weight.detach()
        self.lm_head = Proj(model.lm_head.weight.detach(), _bias(model.lm_head))
        self.rotary = inner.rotary_emb
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        self.blocks = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.blocks.append(
                _Block(
                    ln1=layer.input_layernorm.weight.detach(),
                    qkv=Proj(*_fuse([a.q_proj, a.k_proj, a.v_proj])),
                    o=Proj(a.o_proj.weight.detach(), _bias(a.o_proj)),
                    ln2=layer.post_attention_layernorm.weight.detach(),
                    gate_up=Proj(*_fuse([m.gate_proj, m.up_proj])),
                    down=Proj(m.down_proj.weight.detach(), _bias(m.down_proj)),
                )
            )
        self.packed_rows = 0
        self._cos = self._sin = torch.empty(0)
        self.native = None  # the C decode kernels, once use_native() found them

    def use_native(self, on: bool = True) -> bool:
        """Decode steps run on the C kernels (``native.py``) where they build here and fit
        this model (CPU, fp32, RoPE over the whole head); True when they now do."""
        self.native = None
        if on and self.device.type == "cpu" and self.dtype == torch.float32:
            if self._rope_table(1)[0].shape[-1] == self.head_dim and self.head_dim % 2 == 0:
                from service.teacher.native import kernels

                self.native = kernels()
        return self.native is not None

    def projections(self) -> list[Proj]:
        return [p for b in self.blocks for p in (b.qkv, b.o, b.gate_up, b.down)] + [self.lm_head]

    def pack(self, rows: int) -> None:
        """Pre-pack every weight for decode steps of ``rows`` sequences (0: unpack).

        MKL's packed copies take about 3x the fp32 weights (measured: 2.97x for a
        3072x576 weight); past ``PACK_BUDGET`` bytes the weights stay unpacked."""
        weights = sum(p.w.numel() * p.w.element_size() for p in self.projections())
        usable = mkl_packing_available(self.device, self.dtype) and 3 * weights <= PACK_BUDGET
        rows = rows if usable else 0
        if rows == self.packed_rows:
            return
        for p in self.projections():
            if rows:
                p.pack(rows)
            else:
                p.unpack()
        self.packed_rows = rows

    def quantize_int8(self) -> None:
        """Switch every linear product (LM head included) to int8 weights (``Proj.quantize``)."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError("int8 weights are a CPU fp32 option")
        for p in self.projections():
            p.quantize()

    @property
    def int8(self) -> bool:
        """quantize_int8() ran: the products ignore the packed weights."""
        return self.lm_head.int8 is not None

    def cache_bytes(self, slots: int, max_len: int) -> int:
        per = self.layers * self.kv_heads * max_len * self.head_dim * self.embed.element_size()
        return 2 * slots * per

    def new_cache(self, slots: int, max_len: int) -> SlotCache:
        return SlotCache(
            self.layers, slots, self.kv_heads, max_len, self.head_dim, self.dtype, self.device
        )

    def _rope_table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos.shape[0] < length:
            pos = torch.arange(length, device=self.device)[None]
            probe = torch.empty(0, dtype=self.dtype, device=self.device)
            cos, sin = self.rotary(probe, position_ids=pos)
            self._cos, self._sin = cos[0], sin[0]
        return self._cos, self._sin

    def _mlp(self, x: torch.Tensor, b: _Block) -> torch.Tensor:
        h = rms_norm(x, b.ln2, self.eps)
        gu = b.gate_up(h)
        i = self.intermediate
        return x + b.down(F.silu(gu[:, :i]) * gu[:, i:])

    def _split_qkv(self, qkv: torch.Tensor):
        t = qkv.shape[0]
        qd, kd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q = qkv[:, :qd].view(t, self.heads, self.head_dim)
        k = qkv[:, qd : qd + kd].view(t, self.kv_heads, self.head_dim)
        v = qkv[:, qd + kd :].view(t, self.kv_heads, self.head_dim)
        return q, k, v

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(rms_norm(x, self.norm, self.eps))

    @torch.inference_mode()
    def prefill(
        self, cache: SlotCache, slots: list[int], seqs: list[list[int]], start: int = 0
    ) -> torch.Tensor:
        """Run prompts ``seqs`` (token ids following ``start`` positions already in their
        slots: a shared prefix) into ``slots``; return each one's last-position logits.

        The prompts share the linear products (one matrix of all their tokens) and each
        gets its own causal attention."""
        lengths = [len(s) for s in seqs]
        ids = torch.tensor([t for s in seqs for t in s], device=self.device)
        pos = torch.cat([torch.arange(start, start + n, device=self.device) for n in lengths])
        cos_t, sin_t = self._rope_table(start + max(lengths))
        cos, sin = cos_t[pos].unsqueeze(1), sin_t[pos].unsqueeze(1)
        spans, a = [], 0
        for n in lengths:
            spans.append((a, a + n))
            a += n
        masks = {}
        if start:
            for n in set(lengths):
                qp = torch.arange(start, start + n, device=self.device)[:, None]
                masks[n] = qp >= torch.arange(start + n, device=self.device)[None, :]
        x = F.embedding(ids, self.embed)
        for li, b in enumerate(self.blocks):
            h = rms_norm(x, b.ln1, self.eps)
            q, k, v = self._split_qkv(b.qkv(h))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kl, vl = cache.k[li], cache.v[li]
            outs = []
            for slot, (s, e) in zip(slots, spans, strict=True):
                n = e - s
                ki, vi = k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
                kl[slot, :, start : start + n] = ki
                vl[slot, :, start : start + n] = vi
                qi = q[s:e].transpose(0, 1).unsqueeze(0)
                if start == 0:
                    o = F.scaled_dot_product_attention(
                        qi, ki[None], vi[None], is_causal=True, scale=self.scaling, enable_gqa=True
                    )
                else:
                    o = F.scaled_dot_product_attention(
                        qi,
                        kl[slot : slot + 1, :, : start + n],
                        vl[slot : slot + 1, :, : start + n],
                        attn_mask=masks[n],
                        scale=self.scaling,
                        enable_gqa=True,
                    )
                outs.append(o[0].transpose(0, 1).reshape(n, -1))
            att = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = x + b.o(att)
            x = self._mlp(x, b)
        last = torch.tensor([e - 1 for _, e in spans], device=self.device)
        return self.logits(x[last])

    @torch.inference_mode()
    def decode(
        self,
        cache: SlotCache,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        counts: list[int] | None = None,
        groups: list[tuple[int, int]] | None = None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Decode step for slots ``0..n-1``; logits [rows, V].

        Slot ``i`` feeds ``counts[i]`` tokens (default 1): its last token, then draft
        tokens to check, at positions ``pos[i], pos[i] + 1, ...``; ``tokens`` holds them
        slot after slot. ``groups``: contiguous slot ranges ``(a, b)`` attended separately,
        each over its own longest length, so a short sequence does not read keys up to the
        longest one's (``kv.split_by_length`` picks them). ``prefix``: the shared prompt
        prefix's keys/values [layers, kv_heads, P, d] that every slot holds at positions
        0..P-1 (``SlotCache.save``); the C kernel reads them once for all slots."""
        n, dev = pos.shape[0], self.device
        counts = counts or [1] * n
        width, per_kv = max(counts), self.heads // self.kv_heads
        pos_list = pos.tolist()
        ends = [p + c for p, c in zip(pos_list, counts, strict=True)]
        if max(ends) > cache.max_len:
            raise ValueError(f"positions up to {max(ends)} do not fit a cache of {cache.max_len}")
        if width == 1:
            slot_of, row_pos, pad_idx = torch.arange(n, device=dev), pos, None
        else:
            cnt = torch.tensor(counts, device=dev)
            slot_of = torch.repeat_interleave(torch.arange(n, device=dev), cnt)
            j_of = torch.arange(len(slot_of), device=dev) - (cnt.cumsum(0) - cnt)[slot_of]
            row_pos = pos[slot_of] + j_of
            pad_idx = slot_of * width + j_of
        cos_t, sin_t = self._rope_table(max(ends))
        if self.native is not None:
            return self._decode_native(cache, tokens, pos, row_pos, counts, cos_t, sin_t, prefix)
        cos, sin = cos_t[row_pos].unsqueeze(1), sin_t[row_pos].unsqueeze(1)
        spans = [(a, b, max(ends[a:b])) for a, b in (groups or [(0, n)])]
        masks = [self._decode_mask(pos[a:b], counts[a:b], width, length) for a, b, length in spans]
        # Flat cache row of each (row, kv head): one index_copy_ per layer writes them all.
        heads_kv = torch.arange(self.kv_heads, device=dev)
        rows = (slot_of[:, None] * self.kv_heads + heads_kv) * cache.max_len + row_pos[:, None]
        rows = rows.reshape(-1)
        qk_heads = self.heads + self.kv_heads
        x = F.embedding(tokens, self.embed)
        r = x.shape[0]
        for li, b in enumerate(self.blocks):
            h = rms_norm(x, b.ln1, self.eps)
            qkv = b.qkv(h)
            # q and k side by side: one RoPE call for both (elementwise, same values).
            qk = apply_rope(
                qkv[:, : qk_heads * self.head_dim].view(r, qk_heads, self.head_dim), cos, sin
            )
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            v = qkv[:, qk_heads * self.head_dim :]
            kl, vl = cache.k[li], cache.v[li]
            kl.view(-1, self.head_dim).index_copy_(0, rows, k.reshape(-1, self.head_dim))
            vl.view(-1, self.head_dim).index_copy_(0, rows, v.reshape(-1, self.head_dim))
            # pack_gqa: the query heads of one key/value head (times the slot's rows)
            # form its "sequence"; row-major, so query row r is the slot's token r // per_kv.
            if pad_idx is None:
                qg = q.reshape(n, self.kv_heads, per_kv, self.head_dim)
            else:
                qg = q.new_zeros(n * width, self.heads, self.head_dim).index_copy_(0, pad_idx, q)
                qg = qg.view(n, width, self.kv_heads, per_kv, self.head_dim).transpose(1, 2)
                qg = qg.reshape(n, self.kv_heads, width * per_kv, self.head_dim)
            outs = [
                F.scaled_dot_product_attention(
                    qg[a:b],
                    kl[a:b, :, :length],
                    vl[a:b, :, :length],
                    attn_mask=m,
                    scale=self.scaling,
                )
                for (a, b, length), m in zip(spans, masks, strict=True)
            ]
            o = outs[0] if len(outs) == 1 else torch.cat(outs)
            if pad_idx is None:
                o = o.reshape(n, -1)
            else:
                o = o.view(n, self.kv_heads, width, per_kv, self.head_dim).transpose(1, 2)
                o = o.reshape(n * width, -1).index_select(0, pad_idx)
            x = x + b.o(o)
            x = self._mlp(x, b)
        return self.logits(x)

    def _decode_native(
        self, cache, tokens, pos, row_pos, counts, cos_t, sin_t, prefix
    ) -> torch.Tensor:
        """:meth:`decode` on the C kernels: RMSNorm fused with the residual add before it,
        RoPE in place on the q/k product, and one attention call per layer that writes the
        new keys/values and reads each slot to its own length (no masks, groups or padded
        query rows). The same operations as the torch path, in the same order.

        When the step has fewer rows than the weights are packed for (but at least half,
        where ``Proj`` would pad every product's input with zero rows), the whole step
        runs on that many rows instead: dummy rows of token 0 at position 0 whose results
        are dropped, so no product pads or slices (a matrix row's result does not depend
        on the other rows)."""
        nk, d = self.native, self.head_dim
        row_start = torch.tensor([0, *counts], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        pos32 = pos.to(torch.int32)
        real, m = tokens.shape[0], self.packed_rows
        if real < m <= 2 * real and not self.int8:
            tokens = torch.cat([tokens, tokens.new_zeros(m - real)])
            row_pos = torch.cat([row_pos, row_pos.new_zeros(m - real)])
        cos, sin = cos_t[row_pos].contiguous(), sin_t[row_pos].contiguous()
        qd, kd = self.heads * d, self.kv_heads * d
        x = F.embedding(tokens, self.embed)  # a fresh tensor: updated in place below
        r = x.shape[0]
        h = torch.empty_like(x)
        delta = None  # the last block's MLP output, added to x by the next norm
        for li, b in enumerate(self.blocks):
            nk.add_rms_norm(x, delta, b.ln1, self.eps, out=h)
            qkv = b.qkv(h)
            nk.rope(qkv[:, : qd + kd].view(r, self.heads + self.kv_heads, d), cos, sin)
            att = nk.attention(
                qkv[:, :qd].view(r, self.heads, d),
                qkv[:, qd : qd + kd].view(r, self.kv_heads, d),
                qkv[:, qd + kd :].view(r, self.kv_heads, d),
                cache.k[li],
                cache.v[li],
                row_start,
                pos32,
                self.scaling,
                None if prefix is None else (prefix[0][li], prefix[1][li]),
            )
            nk.add_rms_norm(x, b.o(att), b.ln2, self.eps, out=h)
            gu = b.gate_up(h)
            i = self.intermediate
            delta = b.down(F.silu(gu[:, :i]) * gu[:, i:])
        nk.add_rms_norm(x, delta, self.norm, self.eps, out=h)
        logits = self.lm_head(h)
        return logits if r == real else logits[:real]

    def _decode_mask(self, pos: torch.Tensor, counts: list[int], width: int, length: int):
        """Boolean [slots, 1, query rows, keys]: the slot's token j sees keys up to pos + j."""
        keys = torch.arange(length, device=self.device)
        if width == 1:
            return (keys[None, :] <= pos[:, None]).view(len(counts), 1, 1, length)
        per_kv = self.heads // self.kv_heads
        j = torch.arange(width * per_kv, device=self.device) // per_kv
        # Padding rows (j >= count) copy the slot's last real row; their output is dropped.
        last = torch.tensor(counts, device=self.device)[:, None] - 1
        limit = pos[:, None] + torch.minimum(j[None, :], last)
        return (keys[None, None, :] <= limit[:, :, None]).unsqueeze(1)
