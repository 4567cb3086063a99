"""Classify raw inputs with a model fedge exported, using nothing but onnxruntime and numpy.

What an on-device app does: read the input contract from the model's sidecar JSON
(``<model>.json``, written beside ``model.onnx``) or, without it, from the ONNX file's own
metadata_props (keys ``fedge.*``), check the inputs against it, run the graph, and name the classes.

Usage: ``python device_infer.py model.onnx inputs.npy``. Build ``inputs.npy`` as the contract's
``how_to_build`` says (raw values; the graph applies fedge's scaling itself), e.g. for digits:

    from sklearn.datasets import load_digits
    np.save("inputs.npy", load_digits().data[:8].reshape(-1, 1, 8, 8).astype(np.float32))
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def contract(model_path: Path, sess: ort.InferenceSession) -> dict:
    """Input name/shape/dtype/range, output name and class names: sidecar first, else metadata."""
    sidecar = model_path.with_suffix(".json")
    if sidecar.is_file():
        d = json.loads(sidecar.read_text(encoding="utf-8"))
        return {
            "input_name": d["input"]["name"],
            "shape": d["input"]["shape"][1:],
            "dtype": d["input"]["dtype"],
            "observed_train_range": d["input"]["observed_train_range"],
            "range_tolerance": d["input"]["range_tolerance"],
            "output_name": d["output"]["name"],
            "class_names": d["class_names"],
        }
    meta = sess.get_modelmeta().custom_metadata_map
    return {
        "input_name": meta["fedge.input_name"],
        "shape": json.loads(meta["fedge.input_shape"])[1:],
        "dtype": meta["fedge.input_dtype"],
        "observed_train_range": json.loads(meta["fedge.input_observed_train_range"]),
        "range_tolerance": float(meta["fedge.input_range_tolerance"]),
        "output_name": meta["fedge.output_name"],
        "class_names": json.loads(meta["fedge.class_names"]),
    }


def classify(model_path: str | Path, x: np.ndarray) -> list[str]:
    model_path = Path(model_path)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    c = contract(model_path, sess)
    x = np.ascontiguousarray(x, dtype=c["dtype"])
    if list(x.shape[1:]) != c["shape"]:
        raise SystemExit(f"inputs are {list(x.shape[1:])} per sample, the model takes {c['shape']}")
    if not np.isfinite(x).all():
        raise SystemExit("inputs hold NaN or Inf")
    # the training data's min/max, not a limit: new inputs of the same kind fall a little outside
    lo, hi = c["observed_train_range"]
    tol = c["range_tolerance"]
    if x.min() < lo - tol or x.max() > hi + tol:
        raise SystemExit(
            f"inputs span [{x.min()}, {x.max()}], beyond the training range [{lo}, {hi}] ± {tol}"
        )
    scores = sess.run([c["output_name"]], {c["input_name"]: x})[0]
    return [c["class_names"][i] for i in scores.argmax(axis=1)]


if __name__ == "__main__":
    model, inputs = sys.argv[1], sys.argv[2]
    print("\n".join(classify(model, np.load(inputs))))
