"""LoRA sparse: wire format, honest byte counts, error feedback, the adapter-only downlink."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from algorithms.lora_sparse import (
    PACKET_KEY,
    LoraSparseConfig,
    decode_packet,
    encode_packet,
    layout_topk,
    sparsify_with_feedback,
    unflatten,
)
from clients.data import dataset_info, load_client_data
from clients.models import build_model
from clients.training import TrainJob
from edge.lora import (
    ADAPTERS_KEY,
    FLAT,
    RESIDUAL_KEY,
    apply_downlink,
    initial_factors,
    linear_names,
    merged_state,
    train_lora,
    wrap_lora,
)
from scenarios.config import validate_scenario

CPU = torch.device("cpu")
HEADER = 14


def lora_scenario(density: float, value_type: str = "float16", **train):
    return validate_scenario(
        {
            "data": {"dataset": "digits", "num_clients": 1, "proxy_fraction": 0.05},
            "model": {"name": "mlp", "hidden": [64]},
            "algorithm": {
                "name": "lora_sparse",
                "rank": 4,
                "density": density,
                "value_type": value_type,
            },
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9, **train},
        }
    )


def train_once(sc, state: RecordDict):
    info = dataset_info(sc.data)
    torch.manual_seed(0)
    model = build_model(sc.model, info.input_shape, info.num_classes)
    data = load_client_data(sc.data, sc.seed, 0)
    gen = torch.Generator().manual_seed(0)
    return model, train_lora(TrainJob(model, data, sc, ConfigRecord(), state, gen, CPU))


# -- wire format ------------------------------------------------------------------------------
def test_dense_packet_is_values_only() -> None:
    v = torch.randn(1000)
    packet, sent = encode_packet(v, None, "float32")
    assert packet.nbytes == HEADER + 4 * 1000  # no index array at density 100 %
    torch.testing.assert_close(sent, v)
    torch.testing.assert_close(decode_packet(packet, 1000), v)


@pytest.mark.parametrize(("k", "index_bytes"), [(10, 2 * 10), (400, 1000 // 8)])
def test_sparse_packet_picks_the_smaller_index_code(k: int, index_bytes: int) -> None:
    """Few entries: uint16 positions; many: a bitmap of n bits — whichever is smaller."""
    v = torch.randn(1000)
    idx = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:k].sort().values
    packet, sent = encode_packet(v, idx, "float16")
    assert packet.nbytes == HEADER + index_bytes + 2 * k
    expected = torch.zeros(1000)
    expected[idx] = v[idx].half().float()
    torch.testing.assert_close(decode_packet(packet, 1000), expected)
    torch.testing.assert_close(sent, expected)


def test_int8_packet_carries_its_scale() -> None:
    v = torch.tensor([0.5, -2.0, 1.0, 0.0])
    packet, sent = encode_packet(v, torch.tensor([0, 1, 2]), "int8")
    out = decode_packet(packet, 4)
    assert out[3] == 0 and float(out[1]) == pytest.approx(-2.0)
    assert (out[:3] - v[:3]).abs().max() <= 2.0 / 127 / 2 + 1e-6  # half a quantization step
    torch.testing.assert_close(sent, out)


def test_malformed_packets_are_refused() -> None:
    packet, _ = encode_packet(torch.randn(50), torch.tensor([3, 7]), "float16")
    with pytest.raises(ValueError, match="for 50 adapter entries, this model has 60"):
        decode_packet(packet, 60)
    with pytest.raises(ValueError, match="bytes, its header implies"):
        decode_packet(packet[:-1])
    bad = packet.copy()
    bad[HEADER : HEADER + 2] = np.frombuffer(np.uint16(50).tobytes(), np.uint8)  # index 50 of 0..49
    with pytest.raises(ValueError, match="outside 0..49"):
        decode_packet(bad)
    with pytest.raises(ValueError, match="shorter than its header"):
        decode_packet(packet[:5])


def test_topk_is_per_tensor_and_error_feedback_telescopes() -> None:
    """Σ sent + final residual = Σ updates exactly: nothing is lost, only delayed; dropping the
    residual (no error feedback) breaks this identity."""
    shapes = {"a": torch.Size([4, 5]), "b": torch.Size([10])}
    flat = torch.cat([torch.full((20,), 100.0), torch.full((10,), 0.01)])
    idx = layout_topk(flat, shapes, 0.1)
    assert (idx >= 20).sum() == 1 and (idx < 20).sum() == 2  # b gets its share despite its scale
    gen = torch.Generator().manual_seed(0)
    residual, total_sent, total_update = None, torch.zeros(30), torch.zeros(30)
    for _ in range(5):
        update = torch.randn(30, generator=gen)
        packet, residual = sparsify_with_feedback(update, residual, shapes, 0.1, "float16")
        total_sent += decode_packet(packet, 30)
        total_update += update
    torch.testing.assert_close(total_sent + residual, total_update, atol=1e-5, rtol=0)


# -- the client ---------------------------------------------------------------------------------
def test_dense_reply_has_no_index_array_and_sparse_is_over_10x_smaller() -> None:
    dense_model, dense = train_once(lora_scenario(1.0, "float32"), RecordDict())
    _, sparse = train_once(lora_scenario(0.05, "float16"), RecordDict())
    n = int(dense.metrics["lora_dense_bytes"]) // 4
    assert set(dense.reply_arrays.keys()) == {PACKET_KEY}
    dense_packet = dense.reply_arrays[PACKET_KEY].numpy()
    assert dense_packet.nbytes == HEADER + 4 * n  # values only
    overhead = dense.reply_arrays.count_bytes() - dense_packet.nbytes  # npy header + key
    sparse_packet = sparse.reply_arrays[PACKET_KEY].numpy()
    assert sparse.reply_arrays.count_bytes() - sparse_packet.nbytes == overhead
    assert dense.reply_arrays.count_bytes() > 10 * sparse.reply_arrays.count_bytes()
    decoded = decode_packet(dense_packet, n)
    assert decoded.abs().max() > 0


def test_error_feedback_sends_the_residual_when_the_update_is_zero() -> None:
    """Round 2 with lr ≈ 0 has no update: with error feedback the reply is the top-k of round 1's
    residual; a client that drops the residual would send zeros."""
    state = RecordDict()
    _, first = train_once(lora_scenario(0.05), state)
    residual = torch.from_numpy(state[RESIDUAL_KEY][FLAT].numpy()).clone()
    assert first.metrics["lora_residual_norm"] == pytest.approx(float(residual.norm()), rel=1e-5)
    assert residual.norm() > 0
    _, second = train_once(lora_scenario(0.05, lr=1e-12, momentum=0.0), state)
    sent = decode_packet(second.reply_arrays[PACKET_KEY].numpy())
    assert sent.abs().max() > 0
    nonzero = sent != 0
    torch.testing.assert_close(sent[nonzero], residual[nonzero].half().float())


def test_merged_state_equals_peft_merge_and_unload() -> None:
    sc = lora_scenario(1.0)
    cfg = sc.algorithm
    assert isinstance(cfg, LoraSparseConfig)
    info = dataset_info(sc.data)
    model = build_model(sc.model, info.input_shape, info.num_classes)
    names = linear_names(model)
    factors = initial_factors(model, cfg, sc.seed)
    factors = {k: v + torch.randn_like(v) for k, v in factors.items()}
    peft_model = wrap_lora(model, cfg, sc.seed)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for key, value in factors.items():
            name, part = key.rsplit(".", 1)
            getattr(inner.get_submodule(name), part)["default"].weight.copy_(value)
    expected = peft_model.merge_and_unload().state_dict()
    got = merged_state(model.state_dict(), factors, names, cfg.scaling)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0)


def test_downlink_out_of_step_is_refused_and_names_the_fix() -> None:
    sc = lora_scenario(0.05)
    info = dataset_info(sc.data)
    model = build_model(sc.model, info.input_shape, info.num_classes)
    base = ArrayRecord(torch_state_dict=model.state_dict())
    n = sum(v.numel() for v in initial_factors(model, sc.algorithm, sc.seed).values())
    empty = ArrayRecord(
        {
            PACKET_KEY: Array(
                encode_packet(torch.zeros(n), torch.zeros(0, dtype=torch.long), "float32")[0]
            )
        }
    )
    state = RecordDict()
    sync = ConfigRecord({"from": 0, "to": 0, "base-version": 0})
    with pytest.raises(ValueError, match="lora-base-missing"):
        apply_downlink(RecordDict({"lora-sync": sync, "arrays": empty}), state, sc)
    with pytest.raises(ValueError, match="carries its adapter packet"):
        apply_downlink(RecordDict({"lora-sync": sync, "lora-base": base}), state, sc)
    arrays = apply_downlink(
        RecordDict({"lora-sync": sync, "lora-base": base, "arrays": empty}), state, sc
    )
    assert set(arrays.keys()) == set(model.state_dict())
    jump = ConfigRecord({"from": 3, "to": 4, "base-version": 0})
    with pytest.raises(ValueError, match="from version 3, this node holds version 0"):
        apply_downlink(RecordDict({"lora-sync": jump, "arrays": empty}), state, sc)
    assert ADAPTERS_KEY in state


# -- the whole protocol through Flower ----------------------------------------------------------
def test_federation_sends_base_once_then_adapter_packets(tmp_path: Path) -> None:
    """In-process run of 3 LoRA clients: after round 1 (the base, once per node) a node receives
    only adapter packets, far below the model's size; accuracy improves on the pre-trained base."""
    from fedge.engines import run_engine
    from scenarios.results import load_run

    sc = validate_scenario(
        {
            "seed": 1,
            "num_rounds": 3,
            "output_dir": str(tmp_path),
            "data": {"dataset": "digits", "num_clients": 3, "proxy_fraction": 0.1},
            "model": {"name": "mlp", "hidden": [32]},
            "algorithm": {"name": "lora_sparse", "rank": 4, "density": 0.25, "pretrain_epochs": 2},
            "train": {"epochs": 2, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
            "edge": {"export_onnx": False},
        }
    )
    run_engine(sc, tmp_path / "run", show_progress=False)
    rounds = load_run(tmp_path / "run").rounds
    info = dataset_info(sc.data)
    model = build_model(sc.model, info.input_shape, info.num_classes)
    from flwr.app import ArrayRecord

    model_bytes = ArrayRecord(torch_state_dict=model.state_dict()).count_bytes()
    assert rounds[1]["bytes_down"] >= 3 * model_bytes  # the base, once per node
    for r in rounds[2:]:
        assert r["num_replies"] == 3
        assert r["bytes_down"] < 0.3 * 3 * model_bytes
        assert r["bytes_up"] < 0.3 * 3 * model_bytes
    assert max(r["central_accuracy"] for r in rounds[1:]) > rounds[0]["central_accuracy"]


def test_unflatten_round_trip() -> None:
    shapes = {"a": torch.Size([2, 3]), "b": torch.Size([4])}
    flat = torch.arange(10.0)
    parts = unflatten(flat, shapes)
    assert parts["b"].tolist() == [6.0, 7.0, 8.0, 9.0]
    with pytest.raises(ValueError, match="11 entries, the layout 10"):
        unflatten(torch.zeros(11), shapes)


def test_strategy_state_survives_a_checkpoint_and_resyncs_nodes(tmp_path: Path) -> None:
    """Resume: base, global and broadcast adapters and versions come back from checkpoint.pt;
    which node holds what does not, so every node gets the adapters (and base) whole again."""
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord
    from flwr.supercore.task_identity import TaskIdentity

    from fedge.engines import SERVER_NODE_ID
    from server.checkpoint import capture_run_state, load_checkpoint, save_checkpoint
    from server.lora_sparse import make_lora_sparse
    from server.strategies import ServerSetup

    sc = validate_scenario(
        {
            "data": {"dataset": "digits", "num_clients": 2, "proxy_fraction": 0.1},
            "model": {"name": "mlp", "hidden": [16]},
            "algorithm": {"name": "lora_sparse", "rank": 2, "density": 0.2, "pretrain_epochs": 0},
        }
    )
    info = dataset_info(sc.data)
    model = build_model(sc.model, info.input_shape, info.num_classes)
    strategy = make_lora_sparse(ServerSetup(sc, info, model, CPU))
    strategy.downlink(7, ConfigRecord())  # node 7 synced at version 0
    packet, _ = encode_packet(torch.linspace(-1, 1, strategy.n), None, "float32")
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
    ins = Message(RecordDict({"config": ConfigRecord()}), 7, MessageType.TRAIN)
    ins.metadata.__dict__["_message_id"] = "m7"
    content = RecordDict(
        {
            "arrays": ArrayRecord({PACKET_KEY: Array(packet)}),
            "metrics": MetricRecord({"num-examples": 5}),
        }
    )
    strategy.aggregate_train(1, [Message(content, reply_to=ins)])
    assert strategy.version == 1
    before = strategy.model_state()
    arrays = ArrayRecord(torch_state_dict=before)
    save_checkpoint(tmp_path, capture_run_state(1, arrays, strategy, []))

    fresh = make_lora_sparse(
        ServerSetup(sc, info, build_model(sc.model, info.input_shape, 10), CPU)
    )
    fresh.load_state_dict(load_checkpoint(tmp_path).strategy_state)
    after = fresh.model_state()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value)
    assert fresh.version == 1
    resent = fresh.downlink(7, ConfigRecord())
    assert int(resent["lora-sync"]["from"]) == -1 and "lora-base" in resent
    assert resent["lora-sync"]["arrays"] == "model"  # the merged model, whole
    torch.testing.assert_close(
        decode_packet(resent["lora-adapters"][PACKET_KEY].numpy()), fresh.broadcast_flat
    )


def test_mixed_federation_keeps_its_backprop_client(tmp_path: Path) -> None:
    """3 LoRA clients + 1 backprop client: every reply passes validation every round (the dense
    client first answers the merged model, then keeps getting it), and the dense client's update
    reaches the base, which the LoRA nodes then receive again."""
    from fedge.engines import run_engine
    from scenarios.results import load_run

    sc = validate_scenario(
        {
            "seed": 2,
            "num_rounds": 3,
            "output_dir": str(tmp_path),
            "data": {"dataset": "digits", "num_clients": 4, "proxy_fraction": 0.1},
            "model": {"name": "mlp", "hidden": [32]},
            "algorithm": {"name": "lora_sparse", "rank": 4, "density": 0.25, "pretrain_epochs": 2},
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
            "edge": {"trainers": {"3": "fedavg"}, "export_onnx": False},
        }
    )
    run_engine(sc, tmp_path / "run", show_progress=False)
    rounds = load_run(tmp_path / "run").rounds
    info = dataset_info(sc.data)
    model_bytes = ArrayRecord(
        torch_state_dict=build_model(sc.model, info.input_shape, 10).state_dict()
    ).count_bytes()
    for r in rounds[1:]:
        assert r["num_replies"] == 4 and r.get("num_invalid", 0) == 0, r
        # the dense client's model + the changed base to each LoRA node, every round
        assert r["bytes_down"] >= 4 * model_bytes
    assert max(r["central_accuracy"] for r in rounds[1:]) > rounds[0]["central_accuracy"]
