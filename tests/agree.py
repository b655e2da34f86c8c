"""Comparing two numerically different implementations on any x86-64 CPU.

Two engines that compute the same model with other kernels (another summation order,
another SIMD width, oneDNN vs MKL, vLLM's attention vs SDPA) agree on logits to ~1e-6, not
bit for bit, and which bits differ depends on the CPU. Where the reference's top two logits
are closer than that, greedy search may pick either; a sampled draw whose uniform lands
that close to a boundary of the cumulative distribution may land on either side. So these
checks assert what is determined, and only that:

- greedy: every token the engine picked is the reference model's best within ``TOL``
  (read teacher-forced on the engine's own prefix), and the engine equals the reference
  run token for token up to the first step whose top-2 margin is below ``TOL``;
- sampling: every token the engine drew is the reference draw (``seeded_draw`` on the
  reference logits with the row's own uniforms) up to the first draw that ``TOL`` could
  move.

Each returns how many tokens it compared exactly, and the callers assert that this is
most of them, so a near-tie cannot make the check empty.
"""

from __future__ import annotations

import torch

from service.teacher.hf_engine import render_prompt, seeded_draw

# fp32 logits of the tiny test models lie within a few units of 0; two fp32 implementations
# differ by ~1e-6 there. 1e-4 leaves two orders of magnitude for other CPUs; the real model's
# callers pass more.
TOL = 1e-4
# seeded_draw sums the CDF in float32: a few ulps of 1 per thousand terms, for 49k terms.
F32_CDF = 1e-5


@torch.inference_mode()
def forced_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """(len(tokens), V) fp32 logits that predicted each of ``tokens`` after ``prompt``."""
    ids = torch.tensor([prompt + tokens])
    logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


def token_ids(gen, tokenizer) -> list[int]:
    ids = gen.extra.get("token_ids")
    return (
        list(ids) if ids is not None else tokenizer(gen.text, add_special_tokens=False)["input_ids"]
    )


def greedy_agrees(model, tokenizer, requests, ref, out, tol: float = TOL) -> int:
    """Assert that ``out`` (the engine under test) is a greedy decoding of ``model`` and
    equals ``ref`` (plain ``generate``) wherever greedy search is determined. Returns the
    number of tokens compared exactly."""
    exact = 0
    for i, (req, a, b) in enumerate(zip(requests, ref, out, strict=True)):
        assert a.prompt_tokens == b.prompt_tokens, f"row {i}: prompt lengths differ"
        prompt = render_prompt(tokenizer, req)
        ids_a, ids_b = token_ids(a, tokenizer), token_ids(b, tokenizer)
        logits = forced_logits(model, prompt, ids_b)
        best = logits.max(-1).values
        picked = logits.gather(-1, torch.tensor(ids_b).unsqueeze(-1)).squeeze(-1)
        worst = float((best - picked).max()) if ids_b else 0.0
        assert worst <= tol, f"row {i}: picked a token {worst:.2e} below the best logit"
        top2 = logits.topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        for t, m in enumerate(margins):
            if t >= len(ids_a):
                break
            assert ids_a[t] == ids_b[t], f"row {i} step {t}: margin {m:.2e}, yet tokens differ"
            exact += 1
            if m < tol:  # a near-tie: from here on either continuation is right
                break
        else:  # determined all along: the whole generations agree
            assert (a.text, a.tokens, a.finish_reason) == (b.text, b.tokens, b.finish_reason)
    return exact


def draws_agree(
    model, tokenizer, requests, out, seeds, temperature, top_p, tol: float = TOL
) -> int:
    """Assert that each row of ``out`` holds the draws ``seeded_draw`` makes from the
    reference logits (teacher-forced on the row's own tokens) with the row's generator,
    one uniform per step, up to the first draw that a ``tol`` change of the logits could
    move. Returns the number of draws compared."""
    exact = 0
    for i, (req, gen, seed) in enumerate(zip(requests, out, seeds, strict=True)):
        prompt = render_prompt(tokenizer, req)
        ids = token_ids(gen, tokenizer)
        logits = forced_logits(model, prompt, ids)
        g = torch.Generator().manual_seed(int(seed))
        peek = torch.Generator()
        for t, tok in enumerate(ids):
            peek.set_state(g.get_state())  # the uniform seeded_draw is about to take
            u = float(torch.rand(1, generator=peek))
            want = int(seeded_draw(logits[t : t + 1], temperature, top_p, [g])[0])
            fragile = _fragile(logits[t], u, want, temperature, top_p, tol)
            assert tok == want or fragile, f"row {i} step {t}: drew {tok}, reference {want}"
            if fragile:
                break
            exact += 1
    return exact


def _fragile(logits, u, tok, temperature, top_p, tol) -> bool:
    """Whether logits moved by at most ``tol`` each could change the token ``tok`` that
    ``seeded_draw`` took with uniform ``u`` (the analysis in float64).

    Bound: each probability moves by at most a factor exp(2 tol / T), so every partial sum
    (the CDF, the mass before a token in the nucleus order) by at most 2 tol / T. Tokens
    whose mass-before lies that close to ``top_p`` may enter or leave the nucleus: their
    mass is added to the slack. The draw is fragile if the chosen token is one of them or
    the uniform's point lies within twice the slack (plus float32 rounding of the CDF) of
    the chosen token's edges."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    slack = 2.0 * tol / temperature + F32_CDF
    unsure = torch.zeros_like(probs, dtype=torch.bool)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p
        unsure = unsure.scatter(0, order, (before - top_p).abs() <= slack)
        kept = torch.zeros_like(probs).scatter(0, order, (before < top_p).double())
        slack += float(probs[unsure].sum())
        probs = probs * kept
    cdf = probs.cumsum(0)
    x = u * float(cdf[-1])
    lo = float(cdf[tok - 1]) if tok > 0 else 0.0
    return bool(unsure[tok]) or min(x - lo, float(cdf[tok]) - x) <= 2.0 * slack
