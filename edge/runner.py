"""The on-device path: load a ``.onnx`` model, classify a file of inputs, report latency."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.export import run_onnx, session


@dataclass(frozen=True)
class InferenceReport:
    predictions: np.ndarray
    scores: np.ndarray
    batch_latency_ms: float  # whole-file inference, median over ``repeats``
    per_sample_ms: float


def load_inputs(path: str | Path) -> np.ndarray:
    """A ``.npy`` array of inputs, batch first, float32."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".npy":
        raise ValueError(f"inputs must be an existing .npy file (np.save(path, x)); got {path}")
    return np.load(path).astype(np.float32)


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
    scores = run_onnx(sess, x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_onnx(sess, x)
        times.append(time.perf_counter() - start)
    ms = float(np.median(times) * 1000)
    return InferenceReport(scores.argmax(1), scores, ms, ms / max(len(x), 1))
