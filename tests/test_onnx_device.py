"""The exported ONNX file as a device developer gets it: raw inputs, its contract in
metadata_props and a sidecar JSON, and runnable with nothing but onnxruntime + numpy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from sklearn.datasets import load_digits

from clients.data import dataset_info
from clients.models import build_model
from edge.export import read_metadata, run_onnx, session
from edge.runner import infer
from scenarios.config import validate_scenario
from server.app import export_edge_models

ROOT = Path(__file__).resolve().parents[1]
DEVICE_APP = ROOT / "examples" / "device_infer.py"
# The forbidden imports of a "clean" device process: anything of fedge, torch or Flower.
GUARD = """
import importlib.abc, runpy, sys
BLOCKED = {"torch", "fedge", "clients", "edge", "server", "scenarios", "algorithms", "flwr",
           "sklearn", "peft", "onnx"}
class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"clean device process imported {name}")
        return None
sys.meta_path.insert(0, Guard())
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A digits MLP exported the way a run exports it (server.app.export_edge_models)."""
    tmp = tmp_path_factory.mktemp("onnx")
    sc = validate_scenario(
        {
            "data": {"dataset": "digits", "num_clients": 2},
            "model": {"name": "mlp", "hidden": [32]},
            "edge": {"trainers": {"1": "tpsgd"}},
        }
    )
    info = dataset_info(sc.data)
    torch.manual_seed(0)
    model = build_model(sc.model, info.input_shape, info.num_classes).eval()
    export_edge_models(sc, info, ArrayRecord(torch_state_dict=model.state_dict()), tmp)
    return tmp / "model.onnx", model


def raw_digits(n: int = 40) -> np.ndarray:
    """Raw inputs built as the sidecar's how_to_build says (pixel values 0..16, not scaled)."""
    return load_digits().data[-n:].reshape(-1, 1, 8, 8).astype(np.float32)


def test_file_carries_its_contract_and_takes_raw_inputs(exported) -> None:
    path, model = exported
    meta = read_metadata(path)
    assert meta["dataset"] == "digits"
    assert json.loads(meta["input_shape"]) == ["batch", 1, 8, 8]
    assert meta["input_dtype"] == "float32"
    assert json.loads(meta["input_observed_train_range"]) == [0.0, 16.0]
    assert float(meta["input_range_tolerance"]) == 4.0  # a quarter of the observed span
    assert float(meta["input_scaling_in_graph"]) == 1 / 16
    assert json.loads(meta["class_names"]) == [str(c) for c in range(10)]
    assert read_metadata(path.with_name("model.int8.onnx"))["dataset"] == "digits"
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["input"]["shape"] == ["batch", 1, 8, 8]
    assert sidecar["input"]["observed_train_range"] == [0.0, 16.0]
    assert sidecar["input"]["accepted_range"] == [-4.0, 20.0]
    assert "not a hard limit" in sidecar["input"]["range_note"]
    assert "load_digits" in sidecar["input"]["how_to_build"]
    assert sidecar["model_file"] == "model.onnx" and sidecar["int8_file"] == "model.int8.onnx"
    assert "dynamo=True" in sidecar["exporter"]
    # raw pixels in, the same scores as the PyTorch model on fedge's scaled inputs (x / 16)
    x = raw_digits()
    expected = model(torch.from_numpy(x / 16.0)).detach().numpy()
    got = run_onnx(session(path), x)
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_runner_refuses_nonfinite_and_out_of_range_and_warns_on_scaled(exported) -> None:
    path, _ = exported
    x = raw_digits(8)
    assert infer(path, x, repeats=1).warnings == []
    assert infer(path, x, repeats=1).class_names == [str(c) for c in range(10)]
    warned = infer(path, x / 16.0, repeats=1).warnings
    assert warned and "already scaled" in warned[0]
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 values are NaN"):
        infer(path, bad, repeats=1)
    with pytest.raises(ValueError, match="far outside the raw range"):
        infer(path, x * 1000, repeats=1)


def _device_run(python: str, path: Path, x: np.ndarray, tmp: Path, isolated: bool) -> list[str]:
    np.save(tmp / "inputs.npy", x)
    cmd = [python, "-I", "-c", GUARD, str(DEVICE_APP)] if isolated else [python, str(DEVICE_APP)]
    out = subprocess.run(
        [*cmd, str(path), str(tmp / "inputs.npy")],
        cwd=tmp,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.parametrize("with_sidecar", [True, False])
def test_clean_process_classifies_raw_inputs_from_the_file_alone(
    exported, tmp_path: Path, with_sidecar: bool
) -> None:
    """A process that may import only onnxruntime + numpy (isolated mode, no PYTHONPATH, an import
    guard refusing torch/fedge/Flower/onnx) classifies raw inputs with the file (+ sidecar, or the
    metadata alone) and agrees with PyTorch on the scaled inputs."""
    path, model = exported
    device_dir = tmp_path / "device"
    device_dir.mkdir()
    files = ["model.onnx", "model.json"] if with_sidecar else ["model.onnx"]
    for name in files:
        (device_dir / name).write_bytes((path.parent / name).read_bytes())
    x = raw_digits()
    names = _device_run(sys.executable, device_dir / "model.onnx", x, tmp_path, isolated=True)
    expected = model(torch.from_numpy(x / 16.0)).argmax(1).tolist()
    assert names == [str(c) for c in expected]


@pytest.mark.slow
def test_fresh_venv_with_only_onnxruntime_and_numpy(exported, tmp_path: Path) -> None:
    """A real, separate venv (no system site-packages) with ``pip install onnxruntime numpy``
    (~30 s from PyPI) runs the example device app on the exported file."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "onnxruntime", "numpy"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if pip.returncode != 0:
        pytest.skip(f"pip could not install onnxruntime + numpy here: {pip.stderr[-300:]}")
    path, model = exported
    x = raw_digits()
    names = _device_run(str(venv / "bin" / "python"), path, x, tmp_path, isolated=False)
    assert names == [str(c) for c in model(torch.from_numpy(x / 16.0)).argmax(1).tolist()]


def test_new_mnist1d_inputs_just_outside_the_observed_range_pass_wild_ones_do_not(
    tmp_path: Path,
) -> None:
    """mnist1d samples the run never saw (the generator with another seed) reach a little beyond
    the training set's min/max; the runner and the on-device example accept them, and refuse
    inputs scaled ×10 (before, the sidecar called the min/max "raw_range" and an app that kept
    to it refused good inputs)."""
    import importlib.util

    from mnist1d.data import get_dataset_args, make_dataset

    sc = validate_scenario(
        {
            "data": {"dataset": "mnist1d", "num_clients": 2, "num_samples": 200},
            "model": {"name": "mlp", "hidden": [16]},
            "edge": {"trainers": {"1": "tpsgd"}},
        }
    )
    info = dataset_info(sc.data)
    torch.manual_seed(0)
    model = build_model(sc.model, info.input_shape, info.num_classes).eval()
    export_edge_models(sc, info, ArrayRecord(torch_state_dict=model.state_dict()), tmp_path)
    path = tmp_path / "model.onnx"
    lo, hi = json.loads(path.with_suffix(".json").read_text())["input"]["observed_train_range"]

    args = get_dataset_args()
    args.num_samples, args.seed = 2000, 1234  # new samples, same generator
    fresh = np.asarray(make_dataset(args)["x"], dtype=np.float32)
    outside = fresh[(fresh.min(axis=1) < lo) | (fresh.max(axis=1) > hi)]
    assert len(outside) > 0  # the point: legitimate inputs beyond the observed min/max exist

    spec = importlib.util.spec_from_file_location("device_infer", DEVICE_APP)
    device_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(device_app)
    assert len(infer(path, outside, repeats=1).predictions) == len(outside)
    assert len(device_app.classify(path, outside)) == len(outside)
    with pytest.raises(ValueError, match="far outside the raw range"):
        infer(path, outside * 10, repeats=1)
    with pytest.raises(SystemExit, match="beyond the training range"):
        device_app.classify(path, outside * 10)
