"""Teacher engines: the unpruned model generating the rewrites.

``make_engine(name, model_ref, ...)`` (``factory.py``) returns a :class:`~service.teacher.base.TeacherEngine`.
Engines: ``hf`` (plain transformers ``generate``, the reference), ``fast`` (the fast CPU
engine), ``vllm`` (vLLM, on CPU or GPU), ``openai`` (any OpenAI-compatible server, by URL).
"""

from service.teacher.base import Generation, GenParams, Request, TeacherEngine
from service.teacher.factory import make_engine

__all__ = ["GenParams", "Generation", "Request", "TeacherEngine", "make_engine"]
