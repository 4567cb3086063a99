"""Bad input on the command line gets one clear message and exit code 2 (issue 18, items 2 and 5):
`fedge edge infer` on NaN/Inf/huge inputs, a corrupt model or --repeats 0; a mistyped command;
unknown --set keys and names with a "did you mean"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edge.export import export_onnx
from fedge.cli import app

runner = CliRunner()
QUICK = Path(__file__).parents[1] / "scenarios" / "quickstart.toml"


def _flat(output: str) -> str:
    return " ".join(output.split())  # rich wraps long lines


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(model, torch.zeros(2, 4), out).fp32_path


@pytest.mark.parametrize(
    ("value", "name"), [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf"), (1e300, "1e300")]
)
def test_infer_refuses_values_it_cannot_classify(
    value: float, name: str, onnx_model: Path, tmp_path: Path
) -> None:
    x = np.random.default_rng(0).normal(size=(6, 4))
    x[3, 1] = value
    np.save(tmp_path / "x.npy", x)
    result = runner.invoke(app, ["edge", "infer", str(onnx_model), str(tmp_path / "x.npy")])
    assert result.exit_code == 2, (name, result.output)
    assert "NaN, infinite or beyond float32's range (rows 3)" in _flat(result.output)
    assert "predictions" not in result.output


def test_infer_still_classifies_clean_inputs(onnx_model: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(6, 4)))
    result = runner.invoke(app, ["edge", "infer", str(onnx_model), str(tmp_path / "x.npy")])
    assert result.exit_code == 0, result.output
    assert len(result.output.split("predictions:")[1].split("latency")[0].split()) == 6


def test_infer_corrupt_model_and_zero_repeats(onnx_model: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 4)))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(onnx_model.read_bytes()[:100])  # a truncated download
    result = runner.invoke(app, ["edge", "infer", str(corrupt), str(tmp_path / "x.npy")])
    assert result.exit_code == 2, result.output
    assert "is not a readable ONNX model" in _flat(result.output), result.output
    assert "Traceback" not in result.output

    zero = runner.invoke(
        app, ["edge", "infer", str(onnx_model), str(tmp_path / "x.npy"), "--repeats", "0"]
    )
    assert zero.exit_code == 2 and "nan" not in zero.output, zero.output
    assert "--repeats" in zero.output


def test_infer_unreadable_inputs(onnx_model: Path, tmp_path: Path) -> None:
    (tmp_path / "x.npy").write_bytes(b"not numpy")
    result = runner.invoke(app, ["edge", "infer", str(onnx_model), str(tmp_path / "x.npy")])
    assert result.exit_code == 2 and "not a readable .npy array" in _flat(result.output)


def test_mistyped_command_suggests_once() -> None:
    for args, suggestion in ((["rnu"], "'run'"), (["deploy", "sumbit"], "'submit'")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert result.output.count("Did you mean") == 1, result.output
        assert suggestion in result.output


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.alpah=0.1", "data.alpah: unknown key (did you mean 'alpha'?)"),
        ("train.lrr=0.1", "train.lrr: unknown key (did you mean 'lr'?)"),
        ("federation.fraction_trian=0.5", "(did you mean 'fraction_train'?)"),
        ("model.name=mpl", "(did you mean 'mlp'?)"),
        ("algorithm.name=fedporx", "unknown algorithm 'fedporx' (did you mean 'fedprox'?)"),
        # optional tables ([devices]) and tables keyed by the user's names (devices.profiles.<x>)
        ("devices.polcy=deadline", "devices.polcy: unknown key (did you mean 'policy'?)"),
        ("devices.profiles.mine={peak_flopz=1}", "(did you mean 'peak_flops'?)"),
    ],
)
def test_unknown_keys_and_names_get_a_did_you_mean(override: str, expected: str) -> None:
    extra = ["--set", 'devices.classes=["t4"]'] if override.startswith("devices") else []
    result = runner.invoke(app, ["validate", str(QUICK), "--set", override, *extra])
    assert result.exit_code == 2
    assert expected in _flat(result.output), result.output
