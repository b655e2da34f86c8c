"""Which engine and which dtype ``auto`` means (service/teacher/factory.py), on any machine:
the CPU flags and the GPU check are replaced here.

    .venv/bin/python -m pytest -q tests/test_teacher_factory.py
"""

from __future__ import annotations

import pytest
import torch

from service.teacher import factory
from service.teacher.factory import ENGINES, make_engine, pick_dtype, pick_engine

AMX = "fpu vme sse sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"


def machine(monkeypatch, tmp_path, *, gpu: bool, cpuinfo: str | None) -> None:
    """A machine with or without a bf16 GPU whose /proc/cpuinfo reads ``cpuinfo`` (None:
    no such file)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: gpu)
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    monkeypatch.setattr(factory, "CPUINFO", path)


def cpu(flags: str) -> str:
    return f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n"


def test_auto_and_the_retired_fast_engine_mean_vllm():
    assert ENGINES == ("hf", "vllm", "openai")
    assert pick_engine("auto") == pick_engine("auto", rows=10**6) == "vllm"
    assert pick_engine("auto", dtype="bfloat16") == pick_engine("auto", dtype="auto") == "vllm"
    assert pick_engine("fast") == pick_engine("fast", rows=10, dtype="float32") == "vllm"
    for name in ENGINES:
        assert pick_engine(name, rows=10**6) == name
    with pytest.raises(ValueError, match="unknown teacher engine"):
        make_engine("nope", "builtin:smollm2-135m-instruct")


@pytest.mark.parametrize("flags", ["avx2 avx512f avx512_bf16", "avx2 amx_bf16 amx_tile", AMX])
def test_auto_dtype_is_bf16_on_a_cpu_with_bf16_units(monkeypatch, tmp_path, flags):
    machine(monkeypatch, tmp_path, gpu=False, cpuinfo=cpu(flags))
    assert pick_dtype("auto") == "bfloat16"


@pytest.mark.parametrize(
    "cpuinfo",
    [
        cpu("fpu sse2 avx avx2 fma"),  # AVX2 only
        cpu("avx2 avx512f avx512bw avx512_vnni"),  # AVX-512 without BF16
        "processor\t: 0\nFeatures\t: fp asimd bf16\n",  # no x86 flags line (an Arm CPU)
        "",
        None,  # no /proc/cpuinfo at all
    ],
)
def test_auto_dtype_is_fp32_elsewhere(monkeypatch, tmp_path, cpuinfo):
    machine(monkeypatch, tmp_path, gpu=False, cpuinfo=cpuinfo)
    assert pick_dtype("auto") == "float32"


def test_auto_dtype_is_bf16_on_a_gpu(monkeypatch, tmp_path):
    machine(monkeypatch, tmp_path, gpu=True, cpuinfo=cpu("avx2"))
    assert pick_dtype("auto") == "bfloat16"
    machine(monkeypatch, tmp_path, gpu=True, cpuinfo=None)
    assert pick_dtype("auto") == "bfloat16"


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("cpuinfo", [cpu(AMX), cpu("avx2"), None])
def test_explicit_dtypes_pass_through(monkeypatch, tmp_path, gpu, cpuinfo):
    machine(monkeypatch, tmp_path, gpu=gpu, cpuinfo=cpuinfo)
    assert pick_dtype("float32") == "float32"
    assert pick_dtype("bfloat16") == "bfloat16"


def test_make_engine_resolves_the_vllm_dtype(monkeypatch, tmp_path):
    """make_engine hands vLLM the dtype pick_dtype resolves; the retired ``fast`` builds
    vLLM, and its old options are left to the engine (VLLMEngine ignores them)."""
    import service.teacher.vllm_engine as vllm_engine

    built = []

    class Recorder:
        def __init__(self, model_ref, **options):
            built.append((model_ref, options))

    monkeypatch.setattr(vllm_engine, "VLLMEngine", Recorder)
    monkeypatch.setattr(factory.importlib.util, "find_spec", lambda name: object())
    machine(monkeypatch, tmp_path, gpu=False, cpuinfo=cpu(AMX))
    make_engine("auto", "m", dtype="auto")
    make_engine("vllm", "m", dtype="float32")
    make_engine("fast", "m", slots=4)
    machine(monkeypatch, tmp_path, gpu=False, cpuinfo=cpu("avx2"))
    make_engine("vllm", "m", dtype="auto")
    assert built == [
        ("m", {"dtype": "bfloat16"}),
        ("m", {"dtype": "float32"}),
        ("m", {"slots": 4}),
        ("m", {"dtype": "float32"}),
    ]
