"""The GPU teacher engine: vLLM's offline ``LLM.chat`` on whole batches.

    engine = make_engine("vllm", "builtin:smollm2-135m-instruct",
                         tensor_parallel_size=1, draft_model="mdl_...", num_speculative_tokens=5)

``vllm`` is imported only when an engine is built (it is the ``gpu`` extra; CPU machines
never import it). One ``LLM`` lives as long as the engine: a teacher worker builds it
once and keeps it between jobs. vLLM frees GPU memory only when its process ends
(vLLM #1908, #6544), so :meth:`VLLMEngine.close` drops the reference and the worker
that must release the GPU ends its process.

- Batching: every request of a ``generate`` call goes to one ``LLM.chat`` call; vLLM's
  scheduler does continuous batching and prefix caching itself. Results come back in
  input order.
- Prefill: requests with a prefill go in a second call with the assistant turn as the last
  message and ``continue_final_message=True, add_generation_prompt=False``.
- Sampling: one ``SamplingParams`` per request with ``seed=seeds[i]``, so a row's sample
  does not depend on its batch (vLLM seeds per request).
- Speculative decoding with a draft model (e.g. the pruned-and-recovered student):
  ``speculative_config={"model": draft, "num_speculative_tokens": k, "method":
  "draft_model"}``; draft and target must share the vocabulary. :meth:`acceptance` reads
  ``vllm:spec_decode_*`` counters from ``LLM.get_metrics()``.
"""

from __future__ import annotations

from service.teacher.base import Generation, GenParams, Request, TeacherEngine


def speculative_config(draft: str | None, k: int) -> dict | None:
    if not draft:
        return None
    return {"model": draft, "num_speculative_tokens": int(k), "method": "draft_model"}


class VLLMEngine(TeacherEngine):
    name = "vllm"

    def __init__(
        self,
        model_ref: str,
        tensor_parallel_size: int = 1,
        draft_model: str | None = None,
        num_speculative_tokens: int = 5,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        llm_kwargs: dict | None = None,
        **_options,  # batch_size, device: vLLM schedules its own batches on its own GPUs
    ):
        from vllm import LLM  # the gpu extra; imported only here

        from service.models import resolve_model

        kwargs: dict = {
            "model": str(resolve_model(model_ref)),
            "tensor_parallel_size": int(tensor_parallel_size),
            "gpu_memory_utilization": gpu_memory_utilization,
            "dtype": dtype,
            "seed": seed,
        }
        if max_model_len:
            kwargs["max_model_len"] = int(max_model_len)
        spec = speculative_config(
            str(resolve_model(draft_model)) if draft_model else None, num_speculative_tokens
        )
        if spec:
            kwargs["speculative_config"] = spec
        kwargs.update(llm_kwargs or {})
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(
        self, requests: list[Request], params: GenParams, seeds: list[int] | None = None
    ) -> list[Generation]:
        from vllm import SamplingParams

        if not requests:
            return []
        seeds = list(seeds) if seeds is not None else list(range(len(requests)))
        sampling = [
            SamplingParams(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=int(s) if params.temperature > 0 else None,
            )
            for s in seeds
        ]
        results: list[Generation | None] = [None] * len(requests)
        plain = [i for i, r in enumerate(requests) if not r.prefill]
        prefilled = [i for i, r in enumerate(requests) if r.prefill]
        for idx, cont in ((plain, False), (prefilled, True)):
            if not idx:
                continue
            conversations = [conversation(requests[i]) for i in idx]
            outs = self.llm.chat(
                conversations,
                [sampling[i] for i in idx],
                use_tqdm=False,
                add_generation_prompt=not cont,
                continue_final_message=cont,
            )
            for i, out in zip(idx, outs, strict=True):
                c = out.outputs[0]
                results[i] = Generation(
                    text=c.text,
                    tokens=len(c.token_ids),
                    prompt_tokens=len(out.prompt_token_ids or []),
                    finish_reason="length" if c.finish_reason == "length" else "stop",
                )
        return results  # type: ignore[return-value]

    def acceptance(self) -> dict:
        """Speculative-decoding counters so far: drafts, drafted and accepted tokens, the
        acceptance rate and the mean accepted length (1 + accepted / drafts)."""
        totals = {"drafts": 0.0, "draft_tokens": 0.0, "accepted_tokens": 0.0}
        names = {
            "vllm:spec_decode_num_drafts": "drafts",
            "vllm:spec_decode_num_draft_tokens": "draft_tokens",
            "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
        }
        for metric in self.llm.get_metrics():
            key = names.get(metric.name)
            if key:
                totals[key] += float(getattr(metric, "value", 0) or 0)
        drafted, drafts = totals["draft_tokens"], totals["drafts"]
        totals["acceptance_rate"] = totals["accepted_tokens"] / drafted if drafted else None
        totals["mean_accepted_length"] = 1 + totals["accepted_tokens"] / drafts if drafts else None
        return totals

    def close(self) -> None:
        # Only ending the process gives the GPU memory back (vLLM #1908, #6544).
        self.llm = None


def conversation(req: Request) -> list[dict[str, str]]:
    messages = req.as_openai()
    if req.prefill:
        messages.append({"role": "assistant", "content": req.prefill})
    return messages
