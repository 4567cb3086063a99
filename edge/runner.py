"""The on-device path: load a ``.onnx`` model, classify a file of inputs, report latency.

Files fedge exported carry their input contract in ``metadata_props`` (see ``edge/export.py``):
the runner refuses non-finite inputs and inputs far outside the raw range the model was trained
on, and warns when inputs look already scaled (the graph scales raw inputs itself).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.export import METADATA_PREFIX, run_onnx, session


@dataclass(frozen=True)
class InferenceReport:
    predictions: np.ndarray
    scores: np.ndarray
    batch_latency_ms: float  # whole-file inference, median over ``repeats``
    per_sample_ms: float
    warnings: list[str] = field(default_factory=list)
    class_names: list[str] | None = None


def load_inputs(path: str | Path) -> np.ndarray:
    """A ``.npy`` array of inputs, batch first, float32."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".npy":
        raise ValueError(f"inputs must be an existing .npy file (np.save(path, x)); got {path}")
    return np.load(path).astype(np.float32)


def model_metadata(sess) -> dict[str, str]:
    """The ``fedge.*`` entries of the model's metadata_props (empty for foreign files)."""
    meta = sess.get_modelmeta().custom_metadata_map
    return {
        k.removeprefix(METADATA_PREFIX): v for k, v in meta.items() if k.startswith(METADATA_PREFIX)
    }


def check_inputs(x: np.ndarray, meta: dict[str, str]) -> list[str]:
    """``ValueError`` for inputs the model cannot classify meaningfully; warnings for suspicious
    ones. Checks what the file declares (raw range, in-graph scaling)."""
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise ValueError(f"inputs hold {bad} NaN/Inf values; every input must be a finite number")
    warnings: list[str] = []
    if "input_raw_range" not in meta or x.size == 0:
        return warnings
    lo, hi = json.loads(meta["input_raw_range"])
    span = max(hi - lo, 1e-12)
    how = meta.get("input_how_to_build", "")
    if float(x.min()) < lo - span or float(x.max()) > hi + span:
        raise ValueError(
            f"inputs span [{float(x.min()):.4g}, {float(x.max()):.4g}], far outside the raw range "
            f"[{lo:.4g}, {hi:.4g}] the model was trained on; build them as: {how}"
        )
    scale = float(meta.get("input_scaling_in_graph", "1.0"))
    if scale < 1.0 and float(x.max()) <= hi * scale * 1.0001 and hi * scale < hi / 2:
        warnings.append(
            f"inputs look already scaled (max {float(x.max()):.4g}); this model takes raw values in "
            f"[{lo:.4g}, {hi:.4g}] and multiplies them by {scale:.4g} itself ({how})"
        )
    return warnings


def infer(model_path: str | Path, x: np.ndarray, repeats: int = 5) -> InferenceReport:
    """Run the model on ``x`` ``repeats`` times; predictions are the argmax of the scores."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ValueError(f"no ONNX model at {model_path} (runs with edge clients write model.onnx)")
    sess = session(model_path)
    expected = sess.get_inputs()[0].shape[1:]
    if list(x.shape[1:]) != [d for d in expected]:
        raise ValueError(
            f"inputs have per-sample shape {tuple(x.shape[1:])} but the model expects {tuple(expected)}"
        )
    meta = model_metadata(sess)
    warnings = check_inputs(x, meta)
    scores = run_onnx(sess, x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_onnx(sess, x)
        times.append(time.perf_counter() - start)
    ms = float(np.median(times) * 1000)
    names = json.loads(meta["class_names"]) if "class_names" in meta else None
    return InferenceReport(scores.argmax(1), scores, ms, ms / max(len(x), 1), warnings, names)
