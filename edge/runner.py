"""The on-device path: load a ``.onnx`` model, classify a file of inputs, report latency.

Files fedge exported carry their input contract in ``metadata_props`` (see ``edge/export.py``):
the runner refuses inputs far outside the raw range the model was trained on, and warns when
inputs look already scaled (the graph scales raw inputs itself); :func:`check_inputs` refuses
non-numbers, NaN/Inf and values beyond float32 for any file.
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
    """A ``.npy`` array of inputs, batch first, float32 (see :func:`check_inputs`)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".npy":
        raise ValueError(f"inputs must be an existing .npy file (np.save(path, x)); got {path}")
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(
            f"{path} is not a readable .npy array ({err}); write it with np.save"
        ) from None
    return check_inputs(x, str(path)).astype(np.float32)


def check_inputs(x: np.ndarray, where: str = "inputs") -> np.ndarray:
    """Refuse what a float32 model cannot classify meaningfully: non-numbers, NaN/Inf, and values
    beyond float32's range (1e300 becomes Inf in float32); the argmax of NaN scores is class 0, a
    confident-looking answer to garbage."""
    x = np.asarray(x)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise ValueError(f"{where}: expected a numeric array, got dtype {x.dtype}")
    values = x.astype(np.float64, copy=False)
    bad = ~np.isfinite(values) | (np.abs(values) > np.finfo(np.float32).max)
    if bad.any():
        rows = np.nonzero((bad.reshape(len(x), -1) if x.ndim else bad.reshape(1, 1)).any(1))[0]
        shown = ", ".join(str(int(r)) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise ValueError(
            f"{where}: {int(bad.sum())} values are NaN, infinite or beyond float32's range "
            f"(rows {shown}); the model cannot classify them: clean or drop those rows"
        )
    return x


def _onnx_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile")
    return tuple(getattr(state, n) for n in names if hasattr(state, n))


def model_metadata(sess) -> dict[str, str]:
    """The ``fedge.*`` entries of the model's metadata_props (empty for foreign files)."""
    meta = sess.get_modelmeta().custom_metadata_map
    return {
        k.removeprefix(METADATA_PREFIX): v for k, v in meta.items() if k.startswith(METADATA_PREFIX)
    }


def check_contract(x: np.ndarray, meta: dict[str, str]) -> list[str]:
    """Inputs against what the file declares (raw range, in-graph scaling): ``ValueError`` beyond
    the observed training range widened by its tolerance, a warning when they look already
    scaled."""
    warnings: list[str] = []
    if "input_observed_train_range" not in meta or x.size == 0:
        return warnings
    lo, hi = json.loads(meta["input_observed_train_range"])
    tolerance = float(meta.get("input_range_tolerance", repr(hi - lo)))
    how = meta.get("input_how_to_build", "")
    if float(x.min()) < lo - tolerance or float(x.max()) > hi + tolerance:
        raise ValueError(
            f"inputs span [{float(x.min()):.4g}, {float(x.max()):.4g}], far outside the raw range "
            f"[{lo:.4g}, {hi:.4g}] observed in training (accepted: ± {tolerance:.4g}); build "
            f"them as: {how}"
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
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1 (got {repeats}): latency is their median")
    if not model_path.is_file():
        raise ValueError(f"no ONNX model at {model_path} (runs with edge clients write model.onnx)")
    x = check_inputs(x)
    try:
        sess = session(model_path)
    except _onnx_errors() as err:
        raise ValueError(
            f"{model_path} is not a readable ONNX model ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); pass the model.onnx or model.int8.onnx of a run"
        ) from None
    expected = sess.get_inputs()[0].shape[1:]
    if list(x.shape[1:]) != [d for d in expected]:
        raise ValueError(
            f"inputs have per-sample shape {tuple(x.shape[1:])} but the model expects {tuple(expected)}"
        )
    meta = model_metadata(sess)
    warnings = check_contract(x, meta)
    scores = run_onnx(sess, x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_onnx(sess, x)
        times.append(time.perf_counter() - start)
    ms = float(np.median(times) * 1000)
    names = json.loads(meta["class_names"]) if "class_names" in meta else None
    return InferenceReport(scores.argmax(1), scores, ms, ms / max(len(x), 1), warnings, names)
