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
    mergekit_run(config, str(tmp), options)
    result = {
        "models": list(spec.models),
        "t": spec.t,
        "method": "slerp (mergekit)",
        "seconds": round(time.monotonic() - started, 2),
    }
    (tmp / "merge_report.json").write_text(json.dumps(result, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return result
