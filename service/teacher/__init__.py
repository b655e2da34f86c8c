"""Teacher engines: the unpruned model generating the rewrites.

``make_engine(name, model_ref, ...)`` returns a :class:`~service.teacher.base.TeacherEngine`.
Engines: ``hf`` (plain transformers ``generate``, the reference), ``fast`` (the fast CPU
engine), ``vllm`` (GPU), ``openai`` (any OpenAI-compatible server, by URL).
"""

from service.teacher.base import Generation, GenParams, Request, TeacherEngine, make_engine

__all__ = ["GenParams", "Generation", "Request", "TeacherEngine", "make_engine"]
