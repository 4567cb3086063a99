"""Edge trainers (tpSGD, forward-forward, LoRA sparse), ONNX export/runner, mixed federations."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from typer.testing import CliRunner

from clients.data import dataset_info, load_central_test, load_client_data
from clients.models import build_model
from clients.trainers import get_trainer, trainer_name_for
from clients.training import TrainJob, evaluate
from edge.export import export_onnx, run_onnx, session
from edge.forward_forward import FFMLP, ff_step
from edge.lora import wrap_lora
from edge.memory import measure_training_memory
from edge.tpsgd import block_optimizers, projection_matrices, split_blocks, tpsgd_step
from scenarios.config import ModelConfig, validate_scenario

CPU = torch.device("cpu")


def scenario(**extra):
    raw = {
        "data": {"dataset": "digits", "num_clients": 1},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
    }
    raw.update(extra)
    return validate_scenario(raw)


def train_alone(sc, trainer: str, epochs: int, state: RecordDict | None = None):
    info = dataset_info(sc.data)
    torch.manual_seed(0)
    model = build_model(sc.model, info.input_shape, info.num_classes)
    data = load_client_data(sc.data, sc.seed, 0)
    state = state if state is not None else RecordDict()
    for epoch in range(epochs):
        job = TrainJob(
            model, data, sc, ConfigRecord(), state, torch.Generator().manual_seed(epoch), CPU
        )
        result = get_trainer(trainer)(job)
    x, y = load_central_test(sc.data, sc.seed)
    return model, evaluate(model, x, y, CPU)[1], result


@pytest.mark.parametrize(
    ("name", "shape"), [("mlp", (40,)), ("cnn1d", (40,)), ("cnn2d", (1, 8, 8)), ("softmax", (40,))]
)
def test_tpsgd_blocks_reproduce_the_zoo_forward(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(ModelConfig(name=name), shape, 10)
    x = torch.randn(5, *shape)
    out = x
    for block in split_blocks(model):
        out = block(out)
    torch.testing.assert_close(out, model(x))


def test_tpsgd_and_ff_gradients_stay_inside_one_layer() -> None:
    """The first layer's gradient must not depend on any later layer's weights."""
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    for trainer in ("tpsgd", "ff"):
        grads = []
        for scale in (1.0, 3.0):
            torch.manual_seed(0)
            if trainer == "tpsgd":
                model = build_model(ModelConfig(name="cnn1d", channels=4), (40,), 10)
                blocks = split_blocks(model)
                with torch.no_grad():
                    blocks[-1].layer.weight.mul_(scale)
                tpsgd_step(blocks, projection_matrices(blocks, 10, 0), x, y, "mse")
                grads.append(blocks[0].layer.weight.grad.clone())
            else:
                model = FFMLP((40,), 10, [32, 32])
                with torch.no_grad():
                    model.layers[1].weight.mul_(scale)
                ff_step(model, x, y, 0.5, torch.Generator().manual_seed(0))
                grads.append(model.layers[0].weight.grad.clone())
        torch.testing.assert_close(grads[0], grads[1])


def test_tpsgd_per_block_steps_equal_one_step_at_the_end() -> None:
    """Stepping each block right after its backward (to free its grads) is the same update."""
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    torch.manual_seed(0)
    per_block = build_model(ModelConfig(name="mlp"), (40,), 10)
    together = copy.deepcopy(per_block)
    blocks = split_blocks(per_block)
    proj = projection_matrices(blocks, 10, 0)
    tpsgd_step(blocks, proj, x, y, "ce", block_optimizers(blocks, lr=0.1))
    opt = torch.optim.SGD(together.parameters(), lr=0.1)
    tpsgd_step(split_blocks(together), proj, x, y, "ce")
    opt.step()
    for a, b in zip(per_block.parameters(), together.parameters(), strict=True):
        torch.testing.assert_close(a, b)
        assert a.grad is None  # freed after its block's step


def test_projection_matrices_are_shared_by_seed() -> None:
    blocks = split_blocks(build_model(ModelConfig(name="mlp"), (40,), 10))
    a, b = projection_matrices(blocks, 10, 3), projection_matrices(blocks, 10, 3)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], projection_matrices(blocks, 10, 4)[0])


def test_tpsgd_learns_digits_above_chance() -> None:
    _, acc, _ = train_alone(scenario(model={"name": "mlp", "hidden": [128, 128]}), "tpsgd", 2)
    assert acc > 0.6  # chance is 0.1


def test_forward_forward_learns_digits_above_chance() -> None:
    sc = scenario(model={"name": "ff_mlp", "hidden": [128, 128]})
    _, acc, _ = train_alone(sc, "forward_forward", 4)
    assert acc > 0.5


def test_forward_forward_needs_its_model() -> None:
    with pytest.raises(ValueError, match="ff_mlp"):
        train_alone(scenario(), "forward_forward", 1)


def test_measured_memory_per_trainer() -> None:
    shape = (40,)
    x, y = torch.zeros(32, *shape), torch.zeros(32, dtype=torch.long)
    mlp = build_model(ModelConfig(name="mlp", hidden=[256, 256]), shape, 10)
    ff = build_model(ModelConfig(name="ff_mlp", hidden=[256, 256]), shape, 10)
    bp = measure_training_memory("backprop", mlp, x, y)
    lora = measure_training_memory("lora", mlp, x, y)
    ff_report = measure_training_memory("forward_forward", ff, x, y)
    assert bp.grad_bytes == bp.trainable_bytes == bp.param_bytes  # every weight trains
    assert lora.trainable_bytes < bp.param_bytes // 10  # adapters only
    assert lora.peak_bytes < bp.peak_bytes
    assert ff_report.with_optimizer(2) == ff_report.peak_bytes + 2 * ff_report.param_bytes
    with pytest.raises(ValueError, match="model.name = 'ff_mlp'"):
        measure_training_memory("forward_forward", mlp, x, y)
    with pytest.raises(ValueError, match="unknown trainer 'sgd'"):
        measure_training_memory("sgd", mlp, x, y)


def test_trainer_selection_per_client() -> None:
    sc = scenario(
        data={"dataset": "digits", "num_clients": 10},
        edge={"trainers": {"3": "forward_forward", "0-4": "tpsgd", "*": "fedprox"}},
    )
    names = [trainer_name_for(sc, pid) for pid in range(10)]
    assert names == ["tpsgd"] * 3 + ["forward_forward"] + ["tpsgd"] + ["fedprox"] * 5
    assert trainer_name_for(scenario(), 0) == "fedavg"
    with pytest.raises(ValueError, match="selector"):
        scenario(edge={"trainers": {"phones": "tpsgd"}})


# -- LoRA sparse ------------------------------------------------------------------------------
def lora_scenario(density: float):
    return scenario(
        data={"dataset": "digits", "num_clients": 1, "proxy_fraction": 0.05},
        model={"name": "mlp", "hidden": [64]},
        algorithm={"name": "lora_sparse", "rank": 4, "density": density},
    )


# -- ONNX ---------------------------------------------------------------------------------------
def assert_parity(model: torch.nn.Module, x: torch.Tensor, tmp_path: Path):
    result = export_onnx(model, x[:2], tmp_path / "m.onnx")
    ort_scores = run_onnx(session(result.fp32_path), x.numpy())
    torch_scores = model.eval()(x).detach().numpy()
    assert np.abs(ort_scores - torch_scores).max() <= 1e-4
    assert (ort_scores.argmax(1) == torch_scores.argmax(1)).all()
    int8_scores = run_onnx(session(result.int8_path), x.numpy())
    assert np.isfinite(int8_scores).all() and result.int8_bytes < result.fp32_bytes
    return result, ort_scores, int8_scores


@pytest.mark.parametrize(
    ("trainer", "model_name"),
    [("fedavg", "mlp"), ("tpsgd", "mlp"), ("tpsgd", "cnn2d"), ("forward_forward", "ff_mlp")],
)
def test_onnx_parity_for_every_trainer(trainer: str, model_name: str, tmp_path: Path) -> None:
    sc = scenario(model={"name": model_name, "hidden": [64, 64], "channels": 4})
    model, acc, _ = train_alone(sc, trainer, 1)
    x, y = load_central_test(sc.data, sc.seed)
    _, _, int8_scores = assert_parity(model, torch.from_numpy(x[:97]), tmp_path)
    int8_acc = float((int8_scores.argmax(1) == y[:97]).mean())
    assert np.isfinite(int8_acc)


def test_onnx_parity_lora_merged_dynamo(tmp_path: Path) -> None:
    sc = lora_scenario(1.0)
    info = dataset_info(sc.data)
    torch.manual_seed(0)
    peft_model = wrap_lora(build_model(sc.model, info.input_shape, 10), sc.algorithm, 0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    x = torch.randn(9, *info.input_shape)
    expected = peft_model(x).detach()
    result = export_onnx(peft_model, x[:2], tmp_path / "m.onnx")
    got = run_onnx(session(result.fp32_path), x.numpy())
    assert np.abs(got - expected.numpy()).max() <= 1e-4


def test_ff_export_equals_pytorch_predictor_and_cli(tmp_path: Path) -> None:
    from fedge.cli import app

    sc = scenario(model={"name": "ff_mlp", "hidden": [32, 32]})
    model, _, _ = train_alone(sc, "forward_forward", 1)
    x, _ = load_central_test(sc.data, sc.seed)
    result, ort_scores, _ = assert_parity(model, torch.from_numpy(x[:50]), tmp_path)
    np.save(tmp_path / "x.npy", x[:50])
    out = CliRunner().invoke(app, ["edge", "infer", str(result.fp32_path), str(tmp_path / "x.npy")])
    assert out.exit_code == 0, out.output
    printed = out.output.split("predictions:")[1].split("latency")[0]  # rich may wrap lines
    predicted = [int(v) for v in printed.split()]
    assert predicted == model(torch.from_numpy(x[:50])).argmax(1).tolist()
    assert "latency" in out.output
    bad = CliRunner().invoke(
        app, ["edge", "infer", str(result.fp32_path), str(tmp_path / "no.npy")]
    )
    assert bad.exit_code == 2


# -- federations ----------------------------------------------------------------------------------
def test_mixed_federation_backprop_and_tpsgd_writes_onnx(tmp_path: Path) -> None:
    from fedge.engines import run_engine
    from scenarios.results import load_run

    sc = validate_scenario(
        {
            "name": "mixed",
            "seed": 7,
            "num_rounds": 2,
            "output_dir": str(tmp_path),
            "data": {"dataset": "mnist1d", "num_clients": 3, "num_samples": 600},
            "model": {"name": "mlp", "hidden": [32]},
            "train": {"epochs": 1, "batch_size": 16, "lr": 0.1},
            "edge": {"trainers": {"1-2": "tpsgd"}},
        }
    )
    run_engine(sc, tmp_path / "run", show_progress=False)
    rounds = load_run(tmp_path / "run").rounds
    assert rounds[-1]["num_replies"] == 3 and rounds[-1]["num_failures"] == 0
    assert rounds[-1]["central_accuracy"] > rounds[0]["central_accuracy"]
    sess = session(tmp_path / "run" / "model.onnx")
    x, _ = load_central_test(sc.data, sc.seed)
    assert run_onnx(sess, x[:4]).shape == (4, 10)
    assert (tmp_path / "run" / "model.int8.onnx").stat().st_size > 0


def test_mcu_boards_train_with_tpsgd_but_not_with_backprop(tmp_path: Path) -> None:
    """scenarios/edge_mcu.toml: on 1 MiB boards backprop's measured need (1.3 MiB) fails the device
    memory check; tpSGD's (950 KiB) fits, so every client trains."""
    from fedge.engines import run_engine
    from scenarios.config import load_scenario
    from scenarios.results import load_run

    sets = ["num_rounds=1", "edge.export_onnx=false"]
    for trainers, oom in (("{'4-7' = 'tpsgd'}", 0), ("{}", 4)):
        run_dir = tmp_path / f"oom{oom}"
        scenario = load_scenario("scenarios/edge_mcu.toml", [*sets, f"edge.trainers={trainers}"])
        run_engine(scenario, run_dir, show_progress=False)
        last = load_run(run_dir).rounds[-1]
        assert last["num_out_of_memory"] == oom
        assert last["num_replies"] == 8 - oom
