"""SLERP-merge two models of the same shape (e.g. recovered on two different data sets;
the paper reports that merging self-distilled models helps).

    distillery merge --models recovered_alpaca/ recovered_gsm8k/ --t 0.5 --out merged/

mergekit does the merge (it installs cleanly beside the pinned transformers): its
``slerp`` method interpolates each tensor (flattened) along the great circle and falls
back to linear interpolation when the two rows are nearly parallel (|cos| > 0.9995).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

from service.errors import ModelError
from service.models import resolve_model
from service.progress import Reporter
from service.specs import MergeSpec


def _shape_of(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    keys = ("architectures", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    return {k: cfg.get(k) for k in keys}


def tensor_names(model_dir: Path) -> set[str]:
    """The tensor names of a safetensors checkpoint, from its headers (no weights read)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            names |= set(st.keys())
    return names


def slerp_checkpoints(paths: list[Path], t: float, out: Path) -> None:
    """SLERP every tensor of two checkpoints of one layout with mergekit's own ``slerp``
    (its per-tensor formula), written with the first model's config and tokenizer.

    Ours, beside mergekit's run: mergekit reads a model through a JSON description of its
    architecture, and for some families it names tensors this transformers does not write
    (GPT-NeoX's ``attention.bias`` buffer; Qwen3-MoE's experts fused), while its
    name-inferring fallback leaves tensors out (GPT-NeoX's untied ``embed_out``, every
    Qwen3-MoE expert). Tensor by tensor over the checkpoints themselves, nothing is left
    out; the whole model is held in memory, twice."""
    import torch
    from mergekit.merge_methods.slerp import slerp
    from safetensors.torch import load_file, save_file

    def load(p: Path) -> dict:
        out: dict = {}
        for f in sorted(p.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = load(paths[0]), load(paths[1])
    if a.keys() != b.keys():
        raise ModelError(
            f"the two models hold different tensors: {sorted(a.keys() ^ b.keys())[:5]}"
        )
    merged = {}
    for k, v0 in a.items():
        if v0.is_floating_point() and v0.shape == b[k].shape:
            v = slerp(torch.tensor(t), v0.float(), b[k].float()).to(v0.dtype)
            merged[k] = v.contiguous()
        else:
            merged[k] = v0
    out.mkdir(parents=True)
    save_file(merged, out / "model.safetensors", metadata={"format": "pt"})
    # The config, generation config and tokenizer; not the first model's own reports.
    skip = ("train_log.json", "prune_report.json", "merge_report.json")
    for f in paths[0].iterdir():
        if f.is_file() and f.suffix in (".json", ".model", ".txt", ".jinja"):
            if f.name not in skip and not f.name.endswith(".index.json"):
                shutil.copy2(f, out / f.name)


def run_merge(spec: MergeSpec, out: Path, reporter: Reporter | None = None) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_run

    reporter = reporter or Reporter()
    started = time.monotonic()
    paths = [resolve_model(ref) for ref in spec.models]
    shapes = [_shape_of(p) for p in paths]
    if shapes[0] != shapes[1]:
        raise ModelError(f"models differ in shape: {shapes[0]} vs {shapes[1]}")
    layers = shapes[0]["num_hidden_layers"]
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "slerp",
            "base_model": str(paths[0]),
            "slices": [
                {
                    "sources": [
                        {"model": str(paths[0]), "layer_range": [0, layers]},
                        {"model": str(paths[1]), "layer_range": [0, layers]},
                    ]
                }
            ],
            "parameters": {"t": spec.t},
            "dtype": "float32",
        }
    )
    reporter.event(f"SLERP t={spec.t}: {spec.models[0]} + {spec.models[1]}")
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:6]}")
    options = MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True, device="cpu")
    method = "slerp (mergekit)"
    try:
        mergekit_run(config, str(tmp), options)
        complete = tensor_names(tmp) == tensor_names(paths[0])
    except RuntimeError as exc:
        if "required but not present" not in str(exc):
            raise
        complete = False
    if not complete:  # see slerp_checkpoints: mergekit's layout does not fit
        shutil.rmtree(tmp, ignore_errors=True)
        reporter.event(f"mergekit's layout of {shapes[0]['architectures']} does not fit; "
                       "merging tensor by tensor")  # fmt: skip
        slerp_checkpoints(paths, spec.t, tmp)
        method = "slerp (mergekit's formula, tensor by tensor)"
        if tensor_names(tmp) != tensor_names(paths[0]):
            raise ModelError("the merged model does not hold every tensor of its inputs")
    result = {
        "models": list(spec.models),
        "t": spec.t,
        "method": method,
        "seconds": round(time.monotonic() - started, 2),
    }
    (tmp / "merge_report.json").write_text(json.dumps(result, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return result
