"""Tests that notice when a method is replaced by a simpler stand-in that still runs (issue #14).

Each test names the stand-in it catches. Tiny data, seeded; the whole file runs in seconds.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from algorithms.fedld import margin_control_loss, principal_gradient_aggregate
from clients.data import dataset_info, load_central_test, load_client_data
from clients.models import build_model
from clients.trainers import get_trainer
from clients.training import TrainJob, evaluate
from edge import tpsgd
from edge.forward_forward import FFMLP, ff_step
from fedge.engines import SERVER_NODE_ID
from scenarios.config import validate_scenario
from server.strategies import ServerSetup

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread is fastest and immune to a busy machine's oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scenario(**extra):
    raw = {
        "seed": 0,
        "data": {"dataset": "digits", "num_clients": 1},
        "model": {"name": "mlp", "hidden": [128, 128]},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
    }
    raw.update(extra)
    return validate_scenario(raw)


def train(sc, trainer: str, epochs: int, config: ConfigRecord | None = None, model=None):
    info = dataset_info(sc.data)
    if model is None:
        torch.manual_seed(0)
        model = build_model(sc.model, info.input_shape, info.num_classes)
    data = load_client_data(sc.data, sc.seed, 0)
    for epoch in range(epochs):
        gen = torch.Generator().manual_seed(epoch)
        get_trainer(trainer)(
            TrainJob(model, data, sc, config or ConfigRecord(), RecordDict(), gen, CPU)
        )
    x, y = load_central_test(sc.data, sc.seed)
    return model, evaluate(model, x, y, CPU)[1]


def reply(node: int, arrays: dict[str, np.ndarray], metrics: dict) -> Message:
    """A training reply from ``node`` as the strategy receives it."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
    ins = Message(RecordDict({"config": ConfigRecord()}), node, MessageType.TRAIN)
    ins.metadata.__dict__["_message_id"] = f"m{node}"
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord(metrics),
        }
    )
    return Message(content, reply_to=ins)


# -- tpSGD: stand-in "hidden-layer loss × 0" (only the output layer learns) ----------------------
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_tpsgd_beats_an_untrained_hidden_layers_control(monkeypatch, loss: str) -> None:
    sc = scenario(edge={"tpsgd_loss": loss})
    _, acc = train(sc, "tpsgd", 5)
    original = tpsgd.local_loss
    monkeypatch.setattr(tpsgd, "local_loss", lambda *args: 0.0 * original(*args))
    _, control = train(sc, "tpsgd", 5)
    assert acc > control + 0.05, (acc, control)  # measured: ce 0.89, mse 0.97 vs 0.78


# -- forward-forward: stand-in "no normalisation between layers" ---------------------------------
def test_ff_next_layer_cannot_read_the_previous_layers_goodness() -> None:
    """Scaling layer 0 by 3 (ReLU is positively homogeneous) scales its activity by 3; with the
    normalisation between layers, layer 1's activity and its training gradient do not change."""
    torch.manual_seed(0)
    model = FFMLP((20,), 4, [16, 16])
    x, y = torch.randn(8, 20), torch.randint(0, 4, (8,))
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.layers[0].weight.mul_(3.0)
        scaled.layers[0].bias.mul_(3.0)
    z = model.embed(x, y)
    torch.testing.assert_close(model.layer_outputs(z)[1], scaled.layer_outputs(z)[1])
    grads = []
    for m in (model, scaled):
        ff_step(m, x, y, 0.5, torch.Generator().manual_seed(1))
        grads.append(m.layers[1].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(model.layer_outputs(z)[0], scaled.layer_outputs(z)[0])


# -- clustered: stand-ins "every cluster model = the global average" and "no meta step" -----------
def clustered_strategy(meta: str, epsilon: float = 0.5):
    from server.clustered import ClusteredPersonalization
    from server.strategies import fedavg_kwargs

    sc = validate_scenario(
        {
            "data": {"dataset": "mnist1d", "num_clients": 4},
            "model": {"name": "softmax"},
            "algorithm": {
                "name": "clustered",
                "warmup_rounds": 1,
                "meta": meta,
                "reptile_epsilon": epsilon,
            },
        }
    )
    info = dataset_info(sc.data)
    model = build_model(sc.model, info.input_shape, info.num_classes)
    strategy = ClusteredPersonalization(ServerSetup(sc, info, model, CPU), **fedavg_kwargs(sc))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    start = {
        c: {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for c in (0, 1)
    }
    strategy.set_clusters(
        {c: ArrayRecord({k: Array(v) for k, v in start[c].items()}) for c in (0, 1)},
        {0: 0, 1: 0, 2: 1, 3: 1},
    )
    members = {
        pid: {
            k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in start[pid // 2].items()
        }
        for pid in range(4)
    }
    weights = {0: 10, 1: 30, 2: 20, 3: 20}
    replies = [
        reply(
            100 + pid,
            members[pid],
            {"num-examples": weights[pid], "partition-id": pid, "cluster-id": pid // 2},
        )
        for pid in range(4)
    ]
    return strategy, start, members, weights, replies


@pytest.mark.parametrize(("meta", "epsilon"), [("none", 1.0), ("reptile", 0.5), ("reptile", 0.2)])
def test_each_cluster_model_is_the_update_of_its_own_members(meta: str, epsilon: float) -> None:
    strategy, start, members, weights, replies = clustered_strategy(meta, epsilon)
    strategy.aggregate_train(3, replies)  # after the warm-up: clusters train separately
    for cid, pids in ((0, [0, 1]), (1, [2, 3])):
        got = {k: v.numpy() for k, v in strategy.models[cid].items()}
        for key, base in start[cid].items():
            mean = sum(weights[p] * members[p][key] for p in pids) / sum(weights[p] for p in pids)
            np.testing.assert_allclose(
                got[key], base + epsilon * (mean - base), rtol=1e-5, atol=1e-6
            )
    key = next(iter(start[0]))
    assert not np.allclose(strategy.models[0][key].numpy(), strategy.models[1][key].numpy())


# -- FedLD: stand-ins "margin term ignored", "no eigen filtering"; the sign vote is a no-op ------
def test_fedld_margin_term_changes_the_local_training() -> None:
    sc = scenario(algorithm={"name": "fedld", "margin_lambda": 0.5})
    with_margin, _ = train(sc, "fedld", 1)
    without, _ = train(scenario(algorithm={"name": "fedld", "margin_lambda": 0.0}), "fedld", 1)
    diffs = [
        float((a - b).abs().max())
        for a, b in zip(
            with_margin.state_dict().values(), without.state_dict().values(), strict=True
        )
    ]
    assert max(diffs) > 1e-3
    logits, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    assert float(margin_control_loss(logits, y, 0.5)) > float(margin_control_loss(logits, y, 0.0))


def test_fedld_eigen_filtering_changes_the_aggregate() -> None:
    updates = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    kept_all = principal_gradient_aggregate(updates, k_prop=1.0)
    kept_half = principal_gradient_aggregate(updates, k_prop=0.5)
    assert float((kept_all - kept_half).norm()) > 0.1 * float(kept_all.norm())


def _aggregate_without_sign_vote(updates: torch.Tensor, k_prop: float) -> torch.Tensor:
    """principal_gradient_aggregate's formula with the majority sign flip left out."""
    g = updates.to(torch.float64)
    evals, evecs = torch.linalg.eigh(g @ g.T / len(g))
    evals, evecs = evals.flip(0), evecs.flip(1)
    total, k = evals.clamp_min(0).sum(), max(1, int(len(g) * k_prop))
    s, e = evals[:k], evecs[:, :k]
    directions = e.T @ g
    coeffs = g @ directions.T
    unit = directions / directions.norm(dim=1, keepdim=True)
    weight = (torch.sign(coeffs) * g.norm(dim=1)[:, None]).mean(0) * (s / total)
    return (weight @ unit).to(updates.dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedld_majority_sign_vote_cannot_change_the_aggregate(seed: int) -> None:
    """sign(C_ij)·w_j is unchanged when w_j flips (C_ij flips with it): the vote is a no-op, so
    FedLD's departures from the mean come from elsewhere (norm-weighted signs, the s_j/Σs scale)."""
    updates = torch.randn(7, 30, generator=torch.Generator().manual_seed(seed))
    updates[:5] += 2.0  # a majority on one side of the first direction
    with_vote = principal_gradient_aggregate(updates, k_prop=0.8)
    torch.testing.assert_close(with_vote, _aggregate_without_sign_vote(updates, 0.8))
    torch.testing.assert_close(
        principal_gradient_aggregate(-updates, 0.8), -with_vote
    )  # and the aggregate is odd in the updates


# -- FedProx: stand-in "proximal term ignored" ----------------------------------------------------
def test_fedprox_proximal_term_pulls_toward_the_global_model() -> None:
    distances = {}
    for mu in (0.0, 1.0):
        sc = scenario(algorithm={"name": "fedprox", "mu": mu})
        info = dataset_info(sc.data)
        torch.manual_seed(0)
        start = build_model(sc.model, info.input_shape, info.num_classes)
        model, _ = train(sc, "fedprox", 1, ConfigRecord({"proximal-mu": mu}), copy.deepcopy(start))
        distances[mu] = (
            float(
                sum(
                    (a - b).pow(2).sum()
                    for a, b in zip(model.parameters(), start.parameters(), strict=True)
                )
            )
            ** 0.5
        )
    assert distances[1.0] < 0.8 * distances[0.0], distances


# -- FedLAW: stand-in "γ learned but not applied" --------------------------------------------------
def test_fedlaw_strategy_applies_the_learned_gamma_and_lambdas() -> None:
    from server.fedlaw import make_fedlaw

    sc = validate_scenario(
        {
            "seed": 0,
            "data": {"dataset": "digits", "num_clients": 3, "proxy_fraction": 0.1},
            "model": {"name": "softmax"},
            "algorithm": {"name": "fedlaw", "server_lr": 0.05},
        }
    )
    info = dataset_info(sc.data)
    torch.manual_seed(0)
    model = build_model(sc.model, info.input_shape, info.num_classes)
    strategy = make_fedlaw(ServerSetup(sc, info, model, CPU))
    trained = [train(sc, "fedavg", 2, model=copy.deepcopy(model))[0] for _ in range(1)]
    base = {k: v.numpy() for k, v in trained[0].state_dict().items()}
    # three clients: the trained model scaled by different factors
    clients = [{k: (f * v).astype(np.float32) for k, v in base.items()} for f in (3.0, 4.0, 5.0)]
    replies = [
        reply(100 + i, c, {"num-examples": 10 * (i + 1), "partition-id": i})
        for i, c in enumerate(clients)
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    gamma, lambdas = float(metrics["fedlaw-gamma"]), list(metrics["fedlaw-lambda"])
    assert abs(gamma - 1.0) > 0.05  # the proxy set asks for a rescale: applying it is visible
    got = {k: v.numpy() for k, v in arrays.items()}
    for key in base:
        expected = gamma * sum(lam * c[key] for lam, c in zip(lambdas, clients, strict=True))
        np.testing.assert_allclose(got[key], expected, rtol=1e-4, atol=1e-5)
