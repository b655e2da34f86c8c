"""How closely a pruned or recovered model follows its teacher (DESIGN.md step 5).

    distillery evaluate --model recovered/ --teacher builtin:smollm2-135m-instruct \\
        --agreement-prompts 64 --draft-k 5 --out eval.json   # "agreement", "speculative"

On held-out chat prompts the teacher writes its greedy continuation (``max_new_tokens``
tokens, or up to its end-of-turn); then both models score prompt + continuation in one
forward each, and at every continuation position we compare the next-token
distributions:

- ``kl_mean``: KL(teacher || student), mean over all continuation tokens;
- ``top1``: fraction of those positions where the student's argmax is the teacher's
  (the same matches give the exact speculative-decoding acceptance, ``service/speculative.py``);
- ``embedding_cosine``: cosine between the two models' mean last-layer hidden states
  over the scored text (prompt + continuation), mean over prompts, the similarity the
  paper uses to spot distribution shift. The states are the final-norm outputs, the
  input of the LM head (``hidden_states[-1]`` in transformers), which the predictions
  are made from; the pre-norm residual stream is dominated by a few outlier dimensions.

The continuation is generated with a KV cache; the teacher's one-pass forward may break a
near-tie the other way. A continuation is cut at the first position where the forward's
argmax differs from the generated token (counted in ``truncated``), so every kept
position is a greedy step of the same computation the student is compared with.

Held-out prompts: ``agreement_dataset`` (first N rows), else the GSM8K *test* questions
of the evaluation data folder (never a training split), else a built-in list.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
import torch.nn.functional as F

from service.errors import ModelError
from service.progress import Reporter

BUILTIN_PROMPTS = [
    "Give three tips for staying healthy.",
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about the sea.",
    "What is the capital of France, and what is it known for?",
    "Describe how a bicycle works.",
    "List five fruits that are high in vitamin C.",
    "Summarise the plot of Romeo and Juliet.",
    "How do I make a cup of green tea?",
    "What are the benefits of regular exercise?",
    "Explain the difference between weather and climate.",
    "Write an email asking a colleague to reschedule a meeting.",
    "Translate 'good morning, how are you?' into Spanish.",
    "What is photosynthesis?",
    "Give me a recipe for a simple tomato pasta.",
    "Why do we have seasons on Earth?",
    "Suggest three names for a friendly robot.",
    "How many days are there in a leap year, and why?",
    "Explain what a computer program is to a child.",
    "What should I pack for a weekend hiking trip?",
    "Describe the water cycle.",
    "Write a haiku about autumn leaves.",
    "What is the difference between a virus and a bacterium?",
    "Give two arguments for and against working from home.",
    "If a train travels 60 km in one hour, how far does it go in 2.5 hours?",
]


def load_prompts(
    dataset: str | None, n: int, data_dir: Path | None = None
) -> tuple[list[str], str]:
    """(prompts, where they came from). See the module doc for the order of sources."""
    from service.datasets import load_rows

    if dataset:
        return [r.prompt for r in load_rows(dataset, limit=n)], dataset
    try:
        from service.settings import resolve_data_dir

        gsm8k = resolve_data_dir(data_dir) / "gsm8k" / "test.jsonl"
    except Exception:  # no data folder configured or present
        gsm8k = None
    if gsm8k is not None and gsm8k.is_file():
        return [r.prompt for r in load_rows(str(gsm8k), limit=n)], str(gsm8k)
    return BUILTIN_PROMPTS[:n], "builtin"


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a one-turn chat, ready for the assistant's answer."""
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list | tuple) else {eos}


def teacher_continuations(
    teacher,
    tokenizer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    reporter: Reporter | None = None,
) -> list[list[int]]:
    """Greedy continuations (cut after the first end token), generated in left-padded
    batches of similar length."""
    reporter = reporter or Reporter()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = _eos_ids(teacher)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out: list[list[int]] = [[] for _ in prompt_ids]
    for start in range(0, len(order), batch_size):
        reporter.check()
        idx = order[start : start + batch_size]
        width = max(len(prompt_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            p = prompt_ids[i]
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.no_grad():
            gen = teacher.generate(
                ids.to(teacher.device),
                attention_mask=mask.to(teacher.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        for row, i in enumerate(idx):
            cont = gen[row, width:].tolist()
            for j, tok in enumerate(cont):
                if tok in eos:
                    cont = cont[: j + 1]
                    break
            out[i] = cont
        reporter.progress(prompts_done=start + len(idx), prompts_total=len(order))
    return out


def score_pair(teacher, student, prompt: list[int], cont: list[int]) -> dict:
    """Per-position KL and argmax matches along ``cont``, and the embedding cosine."""
    ids = torch.tensor([prompt + cont], device=teacher.device)
    with torch.no_grad():
        t = teacher(ids, output_hidden_states=True)
        s = student(ids.to(student.device), output_hidden_states=True)
    if t.logits.shape[-1] != s.logits.shape[-1]:
        raise ModelError(
            f"teacher and student vocabularies differ ({t.logits.shape[-1]} vs "
            f"{s.logits.shape[-1]}): agreement needs one tokenizer"
        )
    p, n = len(prompt), len(cont)
    # Logits at position i predict token i + 1.
    tl = t.logits[0, p - 1 : p + n - 1].float()
    sl = s.logits[0, p - 1 : p + n - 1].float().to(tl.device)
    t_arg = tl.argmax(-1)
    wrong = (t_arg != ids[0, p:]).nonzero()
    keep = int(wrong[0]) if len(wrong) else n
    lt = F.log_softmax(tl[:keep], -1)
    ls = F.log_softmax(sl[:keep], -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    match = sl[:keep].argmax(-1) == t_arg[:keep]
    th, sh = t.hidden_states[-1][0, : p + keep], s.hidden_states[-1][0, : p + keep]
    cosine = None
    if th.shape[-1] == sh.shape[-1]:
        cosine = float(F.cosine_similarity(th.float().mean(0), sh.float().mean(0).to(th.device), 0))
    return {
        "kl": kl.tolist(),
        "match": match.tolist(),
        "cosine": cosine,
        "truncated": keep < n,
    }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarise(scores: list[dict]) -> dict:
    kls = [v for s in scores for v in s["kl"]]
    matches = [v for s in scores for v in s["match"]]
    cosines = [s["cosine"] for s in scores if s["cosine"] is not None]
    return {
        "kl_mean": _mean(kls),
        "kl_max_prompt": max((_mean(s["kl"]) or 0.0 for s in scores), default=None),
        "top1": _mean([float(m) for m in matches]),
        "embedding_cosine": _mean(cosines),
        "embedding_cosine_min": min(cosines) if cosines else None,
        "tokens": len(kls),
        "prompts": len(scores),
        "truncated": sum(s["truncated"] for s in scores),
    }


def compare_models(
    student_ref: str,
    teacher_ref: str,
    prompts: int = 64,
    dataset: str | None = None,
    max_new_tokens: int = 64,
    k: int = 5,
    speedup_prompts: int = 4,
    reporter: Reporter | None = None,
    data_dir: Path | None = None,
    use_vllm: bool | None = None,
) -> dict:
    """``{"agreement": ..., "speculative": ...}`` for a student against its teacher.

    ``use_vllm``: also measure vLLM's draft-model speculative decoding (None: when vLLM
    and a GPU are there)."""
    from service.models import load_model, resolve_model
    from service.speculative import acceptance, assisted_speedup, vllm_available, vllm_speculative

    reporter = reporter or Reporter()
    texts, source = load_prompts(dataset, prompts, data_dir)
    reporter.event(f"agreement of {student_ref} with {teacher_ref} on {len(texts)} prompts")
    teacher, tok = load_model(teacher_ref)
    student, _ = load_model(student_ref)
    prompt_ids = [chat_ids(tok, t) for t in texts]
    conts = teacher_continuations(teacher, tok, prompt_ids, max_new_tokens, reporter=reporter)
    scores = []
    for p, c in zip(prompt_ids, conts, strict=True):
        reporter.check()
        scores.append(score_pair(teacher, student, p, c))
    agreement = {
        **summarise(scores),
        "teacher": teacher_ref,
        "source": source,
        "max_new_tokens": max_new_tokens,
        "hidden_states": "last layer after the final norm",
    }
    speculative = acceptance([s["match"] for s in scores], k)
    if speedup_prompts:
        reporter.event(f"timing assisted generation on {speedup_prompts} prompts")
        speculative["assisted"] = assisted_speedup(
            teacher, student, tok, prompt_ids[:speedup_prompts], max_new_tokens, k
        )
    del teacher, student
    gc.collect()
    if use_vllm is None:
        use_vllm = vllm_available()
    if use_vllm:
        reporter.event("vLLM draft-model speculative decoding")
        conversations = [[{"role": "user", "content": t}] for t in texts]
        speculative["vllm"] = vllm_speculative(
            str(resolve_model(teacher_ref)),
            str(resolve_model(student_ref)),
            conversations,
            k,
            max_new_tokens,
        )
    return {"agreement": agreement, "speculative": speculative}


def agreement_for_spec(
    spec, reporter: Reporter | None = None, data_dir: Path | None = None
) -> dict:
    """``compare_models`` with an EvaluateSpec's options (spec.model against spec.teacher);
    ``run_evaluate`` adds the result to its report when the spec names a teacher."""
    return compare_models(
        spec.model,
        spec.teacher,
        prompts=spec.agreement_prompts,
        dataset=spec.agreement_dataset,
        max_new_tokens=spec.agreement_max_new_tokens,
        k=spec.draft_k,
        speedup_prompts=spec.speedup_prompts,
        reporter=reporter,
        data_dir=data_dir,
    )
