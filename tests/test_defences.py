"""Defences for heterogeneous data and the omniscient attacks (#24), safe defaults (#23).

Each rule and attack: a hand-computed case against its paper's definition, and a behavioural
check (the defence beats the mean against an attack; the attack hurts what it targets), first on
synthetic update stacks (milliseconds), then a few tiny end-to-end runs through the plugins."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from algorithms.attacks import alie_default_z, alie_update, ipm_update
from algorithms.robust_rules import (
    bucketing,
    capped_weights,
    centered_clipping,
    direction_cosines,
    direction_outliers,
    direction_scores,
    geometric_median,
    nearest_neighbour_mixing,
    rescale_to,
    trust_scores,
)
from fedge.engines import SERVER_NODE_ID, run_engine
from scenarios.config import ScenarioError, validate_scenario
from scenarios.results import load_run
from server.omniscient_attack import OmniscientAttack
from server.preaggregation import max_share_of, small_federation_warnings

T = torch.tensor


def f64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- definitions, by hand
def test_geometric_median_hand_cases() -> None:
    # collinear: the middle point; a square's corners: its centre; a point holding half the weight
    assert torch.allclose(geometric_median(f64([[0, 0], [1, 0], [10, 0]])), f64([1, 0]), atol=1e-4)
    square = f64([[0, 0], [2, 0], [0, 2], [2, 2]])
    assert torch.allclose(geometric_median(square), f64([1, 1]), atol=1e-6)
    # a triangle: its Fermat point, (3 - sqrt 3) / 6 on the diagonal of the right isosceles one
    fermat = (3 - math.sqrt(3)) / 6
    triangle = geometric_median(f64([[0, 0], [1, 0], [0, 1]]))
    assert torch.allclose(triangle, f64([fermat, fermat]), atol=1e-3)
    heavy = geometric_median(f64([[0, 0], [4, 0], [0, 4]]), weights=f64([2, 1, 1]))
    assert torch.allclose(heavy, f64([0, 0]), atol=1e-4)


def test_centered_clipping_hand_cases() -> None:
    updates = f64([[3, 0], [0, 4], [0, 0]])
    # radius 1 around 0: (1,0), (0,1), (0,0) -> mean (1/3, 1/3)
    got = centered_clipping(updates, torch.zeros(2, dtype=torch.float64), radius=1.0)
    assert torch.allclose(got, f64([1 / 3, 1 / 3]))
    # adaptive radius: median distance to the centre, here 3 -> (3,0), (0,3), (0,0) -> (1, 1)
    assert torch.allclose(
        centered_clipping(updates, torch.zeros(2, dtype=torch.float64)), f64([1, 1])
    )
    # around a centre: v + mean(clip(x - v)); x - v = (2,-1), (-1,3), (-1,-1) with v = (1,1)
    centred = centered_clipping(updates, f64([1, 1]), radius=100.0)
    assert torch.allclose(centred, updates.mean(dim=0))  # nothing clipped: the mean


def test_bucketing_means_its_buckets() -> None:
    updates = f64([[0], [1], [2], [3], [4]])
    means, groups = bucketing(updates, 2, torch.Generator().manual_seed(0))
    assert sorted(len(g) for g in groups) == [1, 2, 2]
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    for mean, group in zip(means, groups, strict=True):
        assert float(mean) == pytest.approx(sum(group) / len(group))


def test_nearest_neighbour_mixing_hand_case() -> None:
    updates = f64([[0, 0], [1, 0], [10, 0]])
    # f = 1: each row and its nearest other row
    assert torch.allclose(nearest_neighbour_mixing(updates, 1), f64([[0.5, 0], [0.5, 0], [5.5, 0]]))
    assert torch.allclose(nearest_neighbour_mixing(updates, 0), updates.mean(0).expand(3, 2))
    with pytest.raises(ValueError, match="num_malicious"):
        nearest_neighbour_mixing(updates, 3)


def test_trust_scores_and_rescaling_hand_case() -> None:
    updates = f64([[1, 0], [0, 1], [-1, 0], [1, 1], [0, 0]])
    scores = trust_scores(updates, f64([2, 0]))
    assert torch.allclose(scores, f64([1, 0, 0, 1 / math.sqrt(2), 0]))
    rescaled = rescale_to(updates, 2.0)
    assert torch.allclose(rescaled[3], f64([math.sqrt(2), math.sqrt(2)]))
    assert torch.equal(rescaled[4], f64([0, 0]))  # a zero update stays zero


def test_capped_weights_hand_cases() -> None:
    # one client claiming 10**9 among four of 100: capped so that its share is exactly 1/4
    capped = capped_weights(f64([1e9, 100, 100, 100, 100]), 0.25)
    assert torch.allclose(capped / capped.sum(), f64([0.25, 0.1875, 0.1875, 0.1875, 0.1875]))
    # two above the cap: T = c * rest / (1 - c k) = 0.4 * 20 / 0.2 ... water filling
    capped = capped_weights(f64([50, 30, 20]), 0.4)
    assert torch.allclose(capped / capped.sum(), f64([0.4, 0.36, 0.24]))
    assert torch.equal(capped_weights(f64([1, 2, 3]), 1.0), f64([1, 2, 3]))  # 1: off
    assert torch.equal(capped_weights(f64([5, 1]), 0.4), f64([5, 5]))  # c < 1/n: all equal
    assert max_share_of("auto", 10) == pytest.approx(0.15) and max_share_of("auto", 2) == 0.75


def test_direction_check_hand_case() -> None:
    updates = f64([[2, 0], [1, 1], [0, 2], [-3, -1], [1, -1]])
    # coordinate-wise median (1, 0); cosines 1, 1/sqrt2, 0, -3/sqrt10, 1/sqrt2
    expected = f64([1, 1 / math.sqrt(2), 0, -3 / math.sqrt(10), 1 / math.sqrt(2)])
    assert torch.allclose(direction_cosines(updates), expected)
    # threshold 0: only the row pointing against the median (cosine 0 is kept)
    assert direction_outliers(updates, 0.0).tolist() == [False, False, False, True, False]
    # threshold 0.8: four rows below it, but at most (5 - 1) // 2 = 2 go, the lowest first
    assert direction_outliers(updates, 0.8).tolist() == [False, False, True, True, False]
    # an explicit reference (0, 1): cosines 0, 1/sqrt2, 1, -1/sqrt10, -1/sqrt2
    assert direction_outliers(updates, 0.0, f64([0, 1])).tolist() == [
        False,
        False,
        False,
        True,
        True,
    ]
    # a zero row scores 0; fewer than 3 rows: no majority to define a consensus, nothing goes
    assert float(direction_cosines(f64([[0, 0], [1, 0], [2, 0]]))[0]) == 0.0
    assert not direction_outliers(f64([[1, 0], [-1, 0]]), 0.0).any()


def test_direction_check_against_both_references_hand_case() -> None:
    """robustness.direction_reference = "both": a row goes only if its cosine is below the
    threshold against the median AND the server's previous step s (the max of the two)."""
    # rows: A, B, C, an honest row D pointing against the median, a flipper E
    updates = f64([[0, 1], [0.2, 1], [-0.2, 1], [1, -0.3], [-1, -1]])
    step = f64([1, 0])
    # coordinate-wise median (0, 1): cosines 1, 1/sqrt1.04, 1/sqrt1.04, -0.3/sqrt1.09, -1/sqrt2
    # against s = (1, 0): 0, 0.2/sqrt1.04, -0.2/sqrt1.04, 1/sqrt1.09, -1/sqrt2
    r104, r109, r2 = math.sqrt(1.04), math.sqrt(1.09), math.sqrt(2)
    expected = f64([1, 1 / r104, 1 / r104, 1 / r109, -1 / r2])
    assert torch.allclose(direction_scores(updates, None, step), expected)
    assert direction_outliers(updates, 0.0).tolist() == [False, False, False, True, True]
    assert direction_outliers(updates, 0.0, step).tolist() == [False, False, True, False, True]
    assert direction_outliers(updates, 0.0, None, step).tolist() == [
        False,
        False,
        False,
        False,
        True,
    ]
    # a zero previous step (the server did not move) is no direction: the median alone
    zero = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(direction_scores(updates, None, zero), direction_cosines(updates))


def test_alie_hand_case_and_z() -> None:
    honest = f64([[1, 2], [3, 2], [2, 5]])
    # mean (2, 3); sample std (1, sqrt(3))
    assert torch.allclose(alie_update(honest, 1.0), f64([1, 3 - math.sqrt(3)]))
    # Baruch et al.: s = floor(n/2 + 1) - f, z = Phi^-1((n - s) / n)
    assert alie_default_z(10, 2) == pytest.approx(0.2533471, abs=1e-6)  # s = 4, Phi^-1(0.6)
    assert alie_default_z(50, 10) == pytest.approx(0.4676988, abs=1e-6)  # s = 16, Phi^-1(0.68)
    assert alie_default_z(10, 0) == 0.0  # quantile 0.4: no shift


def test_ipm_hand_case() -> None:
    assert torch.allclose(ipm_update(f64([[1, 2], [3, 4]]), 0.5), f64([-1, -1.5]))


# ---------------------------------------------------------------- behaviour on synthetic stacks
def _honest(n: int, d: int = 20, spread: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Heterogeneous honest updates around a common direction."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.ones(d, dtype=torch.float64)
    return direction + spread * torch.randn(n, d, generator=g, dtype=torch.float64)


def _error(aggregate: torch.Tensor, honest: torch.Tensor) -> float:
    return float((aggregate - honest.mean(dim=0)).norm())


@pytest.mark.parametrize(
    "rule", ["geometric_median", "centered_clipping", "bucketing+gm", "nnm+gm"]
)
def test_each_rule_beats_the_mean_against_boosted_sign_flips(rule: str) -> None:
    honest = _honest(8)
    attackers = -10 * honest[:2]  # two sign-flippers x10
    stack = torch.cat([honest, attackers])
    if rule == "geometric_median":
        robust = geometric_median(stack)
    elif rule == "centered_clipping":
        robust = centered_clipping(stack, torch.zeros(stack.shape[1], dtype=torch.float64))
    elif rule == "bucketing+gm":
        robust = geometric_median(bucketing(stack, 2, torch.Generator().manual_seed(1))[0])
    else:
        robust = geometric_median(nearest_neighbour_mixing(stack, 2))
    mean = stack.mean(dim=0)
    assert _error(robust, honest) < 0.5 * _error(mean, honest)
    assert float(robust @ honest.mean(0)) > 0  # still points the honest way; the mean does not
    assert float(mean @ honest.mean(0)) < 0


def test_trust_scoring_beats_the_mean_against_sign_flips() -> None:
    honest = _honest(8)
    stack = torch.cat([honest, -3 * honest[:2]])
    reference = honest.mean(0) + 0.3 * _honest(1, seed=5)[0]  # a noisy clean-set update
    scores = trust_scores(stack, reference)
    assert torch.all(scores[8:] == 0)  # the flipped updates get no weight
    scaled = rescale_to(stack, float(reference.norm()))
    fltrust = (scores @ scaled) / scores.sum()
    assert _error(fltrust, honest) < 0.5 * _error(stack.mean(0), honest)


@pytest.mark.parametrize("attack", ["sign_flip", "ipm"])
def test_direction_check_beats_the_mean_against_honest_norm_attacks(attack: str) -> None:
    """Two of ten attackers with honest norms (x1 sign flip) or a small one (IPM): the norm
    bound keeps them, the direction check drops exactly them, and the mean of what it keeps is
    closer to the honest mean than the plain mean (which a ×1 flip and IPM drag backwards)."""
    honest = _honest(8, spread=1.0)  # heterogeneous: every honest row's cosine is below 0.9
    attackers = -honest[:2] if attack == "sign_flip" else ipm_update(honest).expand(2, -1)
    stack = torch.cat([honest, attackers])
    norms = stack.norm(dim=1)
    assert float(norms[8:].max()) <= 3 * float(norms.median())  # the norm bound keeps them
    excluded = direction_outliers(stack, 0.0)
    assert excluded.tolist() == [False] * 8 + [True, True]
    checked = stack[~excluded].mean(dim=0)
    assert _error(checked, honest) < 0.5 * _error(stack.mean(dim=0), honest)


def test_alie_passes_the_norm_bound_and_moves_the_median() -> None:
    """ALIE hides inside the honest spread: its norm is honest-like (a 3x-median bound keeps it)
    yet two of ten attackers (z = 1) push the coordinate-wise median further from the honest mean
    than two more honest clients would leave it."""
    g = torch.Generator().manual_seed(0)
    clients = 1 + torch.randn(10, 2000, generator=g, dtype=torch.float64)
    honest = clients[2:]
    stack = torch.cat([honest, alie_update(honest, 1.0).expand(2, -1)])
    norms = stack.norm(dim=1)
    assert float(norms[8:].max()) <= 3 * float(norms.median())
    attacked = _error(stack.median(dim=0).values, honest)
    assert attacked > 1.5 * _error(clients.median(dim=0).values, honest)


def test_ipm_turns_a_trimmed_aggregate_against_the_honest_direction() -> None:
    """IPM with a large epsilon: the mean's inner product with the honest mean turns negative."""
    honest = _honest(8)
    stack = torch.cat([honest, ipm_update(honest, 10.0).expand(2, -1)])
    assert float(stack.mean(0) @ honest.mean(0)) < 0 < float(honest.mean(0) @ honest.mean(0))


def test_bucketing_lifts_the_median_under_heterogeneity() -> None:
    """Karimireddy et al.'s point: a coordinate-wise median of very different honest updates is
    biased; of bucket means (less different) it is closer to the mean."""
    g = torch.Generator().manual_seed(3)
    honest = torch.cat(
        [
            torch.randn(7, 30, generator=g, dtype=torch.float64) + 3,
            torch.zeros(5, 30, dtype=torch.float64),
        ]
    )
    plain = honest.median(dim=0).values
    errors = []
    for seed in range(20):
        means, _ = bucketing(honest, 3, torch.Generator().manual_seed(seed))
        errors.append(_error(means.median(dim=0).values, honest))
    assert np.mean(errors) < _error(plain, honest)


# ---------------------------------------------------------------- the omniscient attack plugin
def _exchange(node: int, sent: RecordDict, reply: RecordDict) -> tuple[Message, Message]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
    instruction = Message(sent, node, MessageType.TRAIN)
    instruction.metadata.__dict__["_message_id"] = f"m{node}"
    return instruction, Message(reply, reply_to=instruction)


def _reply(values: list[float], pid: int) -> RecordDict:
    from flwr.app import ConfigRecord

    return RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.array(values, dtype=np.float32))}),
            "metrics": MetricRecord({"num-examples": 10}),
            "client": ConfigRecord({"partition-id": pid}),
        }
    )


@pytest.mark.parametrize("kind", ["alie", "ipm"])
def test_omniscient_attack_replaces_the_attackers_replies_only(kind: str) -> None:
    sent = RecordDict({"arrays": ArrayRecord({"w": Array(np.array([1.0, 1.0], dtype=np.float32))})})
    updates = {0: [0.0, 0.0], 1: [2.0, 3.0], 2: [4.0, 3.0], 3: [3.0, 6.0]}  # 0 attacks
    pairs = [_exchange(10 + p, sent, _reply([1 + u for u in up], p)) for p, up in updates.items()]
    plugin = OmniscientAttack(kind, {0}, 1.0 if kind == "alie" else 0.5)
    plugin.observe_train_instructions(1, [i for i, _ in pairs])
    replies, metrics = plugin.filter_train_replies(1, [r for _, r in pairs])
    assert metrics == {"num_poisoned": 1}
    honest = f64([updates[1], updates[2], updates[3]])  # mean (3, 4), sample std (1, sqrt(3))
    expected = alie_update(honest, 1.0) if kind == "alie" else ipm_update(honest, 0.5)
    got = replies[0].content["arrays"]["w"].numpy() - 1.0
    assert np.allclose(got, expected.numpy(), atol=1e-6)
    assert np.allclose(replies[1].content["arrays"]["w"].numpy(), [3.0, 4.0])  # honest untouched


# ---------------------------------------------------------------- schema
def _plugin_round(plugin, server_round: int, sent: list[float], updates: list[list[float]]):
    """One round through the pre-aggregation plugin: every node sent ``sent`` (one shared record,
    as FedAvg sends), node 10 + i answers sent + updates[i]; returns the excluded rows."""
    record = RecordDict({"arrays": ArrayRecord({"w": Array(np.array(sent, dtype=np.float32))})})
    pairs = [
        _exchange(10 + i, record, _reply([s + u for s, u in zip(sent, up, strict=True)], i))
        for i, up in enumerate(updates)
    ]
    plugin.observe_train_instructions(server_round, [i for i, _ in pairs])
    kept, metrics = plugin.filter_train_replies(server_round, [r for _, r in pairs])
    kept_nodes = {r.metadata.src_node_id for r in kept}
    excluded = [i for i in range(len(updates)) if 10 + i not in kept_nodes]
    assert metrics["num_excluded_direction"] == len(excluded)
    return excluded


def _checkpointed(state: dict) -> dict:
    """``state`` through the checkpoint's encoding (tensors + JSON), as a resume reads it."""
    import json

    from server.checkpoint import _decode, _Encoder

    encoder = _Encoder()
    meta = json.dumps(encoder.encode(state))
    return _decode(json.loads(meta), encoder.tensors)


def test_direction_reference_both_carries_the_servers_step_across_a_resume(
    tmp_path: Path,
) -> None:
    """Round 1 has no previous step: the median alone drops the honest row D (against the
    median) and the flipper E. The server then steps by s = (1, 0); in round 2 (the plugin
    rebuilt from its checkpointed state, as a resume does) D agrees with s and stays, E goes.
    Fails if the reference is the median alone, or if the sent model is not carried across."""
    from types import SimpleNamespace

    from server.preaggregation import UpdateTransform

    robustness = {
        "direction_check": True,
        "direction_reference": "both",
        "direction_scope": "all",
        "relative_norm_bound": 0.0,
    }
    setup = SimpleNamespace(
        scenario=_scenario(tmp_path, robustness=robustness), device="cpu", model=None
    )
    rows = [[0, 1], [0.2, 1], [-0.2, 1], [1, -0.3], [-1, -1]]  # the hand case's A-E
    first = UpdateTransform(setup)
    assert _plugin_round(first, 1, [0.0, 0.0], rows) == [3, 4]
    resumed = UpdateTransform(setup)
    resumed.load_state(_checkpointed(first.state()))
    assert _plugin_round(resumed, 2, [1.0, 0.0], rows) == [4]
    assert resumed.state()["total_excluded_direction"] == 3
    # without the first round's sent model there is no step: the median alone, D goes again
    assert _plugin_round(UpdateTransform(setup), 2, [1.0, 0.0], rows) == [3, 4]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"robustness": {"trust_scoring": True}}, "proxy_fraction"),
        ({"robustness": {"preaggregation": "nnm", "num_malicious": 6}}, "num_malicious"),
        ({"robustness": {"max_weight_share": 0.0}}, "max_weight_share"),
        ({"robustness": {"preaggregation": "bucket"}}, "did you mean 'bucketing'"),
        ({"attack": {"kind": "alie"}}, "needs attack.clients"),
        ({"robustness": {"direction_threshold": 1.0}}, "direction_threshold=1.0 must be a cosine"),
        ({"robustness": {"direction_scope": "head"}}, "direction_scope"),
        ({"robustness": {"direction_reference": "mean"}}, "'median', 'previous', 'both'"),
        (
            {"algorithm": {"name": "fedld"}, "robustness": {"aggregation": "geometric_median"}},
            "relative_norm_bound",
        ),
    ],
)
def test_bad_defence_settings_are_refused(tmp_path: Path, raw: dict, needle: str) -> None:
    with pytest.raises(ScenarioError, match=needle):
        _scenario(tmp_path, **raw)


def test_sparse_replies_skip_the_default_direction_check(tmp_path: Path) -> None:
    """The check is on by default and compares dense updates: a lora_sparse scenario validates
    with the defaults and its plugin does not check directions."""
    from types import SimpleNamespace

    from server.preaggregation import UpdateTransform

    sparse = _scenario(tmp_path, algorithm={"name": "lora_sparse"}, data={"proxy_fraction": 0.05})
    assert sparse.robustness.direction_check
    plugin = UpdateTransform(SimpleNamespace(scenario=sparse, device="cpu", model=None))
    assert not plugin.direction_check
    assert UpdateTransform.wanted(_scenario(tmp_path))  # dense: on by default


def test_small_federations_are_warned_about(tmp_path: Path) -> None:
    two = _scenario(tmp_path, data={"num_clients": 2})
    assert any("no defence can outvote" in w for w in small_federation_warnings(two))
    assert small_federation_warnings(_scenario(tmp_path)) == []
    buckets = _scenario(tmp_path, robustness={"preaggregation": "bucketing", "bucket_size": 3})
    assert any("fewer than 3 buckets" in w for w in small_federation_warnings(buckets))


# ---------------------------------------------------------------- end to end, tiny
def _scenario(tmp_path: Path, **extra):
    raw = {
        "name": "defence",
        "seed": 1,
        "num_rounds": 3,
        "output_dir": str(tmp_path),
        "data": {"dataset": "mnist1d", "num_clients": 6, "partitioner": "iid", "num_samples": 2000},
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "federation": {"fraction_evaluate": 0.0},
        "robustness": {"checkpoint": False},
    }
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_scenario(raw)


def _accuracy(tmp_path: Path, name: str, **extra) -> float:
    summary = run_engine(_scenario(tmp_path, **extra), tmp_path / name, show_progress=False)
    return summary["final_accuracy"]


def test_default_norm_bound_and_weight_cap_hold_against_one_client(tmp_path: Path) -> None:
    """Defaults on (#23): a x10 sign-flipper is excluded by the relative norm bound; with both
    defences off (the old defaults) it wrecks the model."""
    attack = {"kind": "sign_flip", "clients": [0], "strength": 10.0}
    off = {"relative_norm_bound": 0.0, "max_weight_share": 1.0, "direction_check": False}
    defended = _accuracy(tmp_path, "defaults", attack=attack)
    undefended = _accuracy(tmp_path, "off", attack=attack, robustness=off)
    clean = _accuracy(tmp_path, "clean")
    assert defended >= clean - 0.02
    assert undefended < clean - 0.05
    rounds = load_run(tmp_path / "defaults").rounds[1:]
    assert [r["num_invalid_norm"] for r in rounds] == [1, 1, 1]


@pytest.mark.parametrize(
    "on",
    [
        {"direction_check": True, "direction_reference": "median", "direction_threshold": 0.0},
        {},  # fedge's default: against the median and the previous step, threshold -0.15
    ],
    ids=["median", "default"],
)
def test_direction_check_excludes_sign_flippers_end_to_end(tmp_path: Path, on: dict) -> None:
    """Two of six x1 sign-flippers (honest norms: the norm bound keeps them): the direction
    check excludes both in every round and the model stays near the clean one; without it they
    cost accuracy. Fails if the check is off or its sign inverted (it would then drop two honest
    replies and keep the flippers)."""
    attack = {"kind": "sign_flip", "clients": [0, 1], "strength": 1.0}
    checked = _accuracy(tmp_path, "checked", attack=attack, robustness=on)
    unchecked = _accuracy(
        tmp_path, "unchecked", attack=attack, robustness={"direction_check": False}
    )
    clean = _accuracy(tmp_path, "clean", robustness=on)
    assert checked > unchecked + 0.05
    assert checked >= clean - 0.03
    rounds = load_run(tmp_path / "checked").rounds[1:]
    assert [r["num_excluded_direction"] for r in rounds] == [2, 2, 2]
    assert [r["num_excluded_direction"] for r in load_run(tmp_path / "clean").rounds[1:]] == [
        0,
        0,
        0,
    ]


@pytest.mark.parametrize("algorithm", ["fedld", "clustered"])
def test_trust_scoring_holds_for_algorithms_with_their_own_rule(
    tmp_path: Path, algorithm: str
) -> None:
    """Two of six sign-flippers (x1, honest norms: the norm bound cannot see them) against FedLD
    and the clustered strategy: FLTrust scores drop them; without it they cost accuracy."""
    algo = {"name": algorithm}
    if algorithm == "clustered":
        algo["warmup_rounds"] = 5  # stays in its FedAvg phase for these 3 rounds
    attack = {"kind": "sign_flip", "clients": [0, 1], "strength": 2.0}
    data = {"proxy_fraction": 0.05}
    off = {"direction_check": False}  # FLTrust alone: the default direction check would see them
    plain = _accuracy(tmp_path, "plain", algorithm=algo, attack=attack, data=data, robustness=off)
    trusted = _accuracy(
        tmp_path,
        "trusted",
        algorithm=algo,
        attack=attack,
        data=data,
        robustness={"trust_scoring": True, **off},
    )
    assert trusted > plain + 0.05
    rounds = load_run(tmp_path / "trusted").rounds[1:]
    assert all(r["num_after_preaggregation"] <= 4 for r in rounds)  # the flippers scored 0


def test_alie_through_the_plugin_and_centered_clipping_with_bucketing(tmp_path: Path) -> None:
    """ALIE runs end to end (its attackers poisoned each round) and the update-space rule runs
    with bucketing on top, keeping the clean run's accuracy within 5 points."""
    attack = {"kind": "alie", "clients": [0, 1], "strength": 3.0}
    defence = {"aggregation": "centered_clipping", "preaggregation": "bucketing"}
    acc = _accuracy(tmp_path, "cc", attack=attack, robustness=defence)
    rounds = load_run(tmp_path / "cc").rounds[1:]
    assert all(r["num_poisoned"] == 2 for r in rounds)
    assert all(r["num_after_preaggregation"] == 3 for r in rounds)
    assert acc >= _accuracy(tmp_path, "clean") - 0.05


def test_weight_cap_plugin_caps_a_client_claiming_1e9_examples(tmp_path: Path) -> None:
    """The default cap ('auto' = 1.5 / replies): among six replies one claiming 10**9 examples
    ends with a quarter of the weight, the others keep theirs; cap 1 changes nothing."""
    from clients.data import dataset_info
    from clients.models import build_model
    from server.preaggregation import UpdateTransform
    from server.strategies import ServerSetup

    sent = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})})
    for share, expected in (("auto", 0.25), (1.0, 1e9 / (1e9 + 500))):
        sc = _scenario(tmp_path, robustness={"max_weight_share": share})
        info = dataset_info(sc.data)
        model = build_model(sc.model, info.input_shape, info.num_classes)
        plugin = UpdateTransform(ServerSetup(sc, info, model, torch.device("cpu")))
        pairs = [_exchange(20 + p, sent, _reply([1.0, 1.0], p)) for p in range(6)]
        pairs[0][1].content["metrics"]["num-examples"] = 10**9
        plugin.observe_train_instructions(1, [i for i, _ in pairs])
        replies, _ = plugin.filter_train_replies(1, [r for _, r in pairs])
        weights = [float(r.content["metrics"]["num-examples"]) for r in replies]
        assert weights[0] / sum(weights) == pytest.approx(expected)
        assert weights[1:] == [10.0] * 5
