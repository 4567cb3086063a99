"""Poisoning defences on the server: Flower's own robust strategies, chosen by the scenario.

``robustness.aggregation`` replaces FedAvg's weighted mean, for ``fedavg`` and ``fedprox`` (the
algorithms whose server *is* FedAvg), by one of Flower's strategies, used as they are:

=================  ======================================================================
``median``         :class:`~flwr.serverapp.strategy.FedMedian`: coordinate-wise median
``trimmed_mean``   :class:`~flwr.serverapp.strategy.FedTrimmedAvg`: coordinate-wise mean
                   without the ``trim_beta`` share at each end
``krum``           :class:`~flwr.serverapp.strategy.Krum`: the one reply closest to its
                   n - f - 2 nearest neighbours (f = ``num_malicious``)
``multikrum``      :class:`~flwr.serverapp.strategy.MultiKrum`: mean of the n - f best
``bulyan``         :class:`~flwr.serverapp.strategy.Bulyan`: MultiKrum selection, then a
                   coordinate-wise trimmed mean around the median
``geometric_median``  fedge's RFA rule (``server/update_rules.py``)
``centered_clipping`` fedge's centered clipping around the previous aggregate
=================  ======================================================================

Pre-aggregation (bucketing, NNM), FLTrust trust scores and the weight cap are round plugins
(``server/preaggregation.py``) and compose with every rule and algorithm.

FedLD, FedLAW, the clustered family, Per-FedAvg and LoRA aggregate in their own way, so the
scenario schema refuses ``aggregation`` for them; ``robustness.relative_norm_bound`` (in the reply
validator) works with every algorithm. FedProx keeps its proximal term: the robust strategy is
given FedProx's one change, sending ``proximal-mu`` with each instruction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from clients.concept_shift import group_of
from scenarios.config import Scenario
from scenarios.results import RunWriter
from server.strategies import ServerSetup, fedavg_kwargs
from server.update_rules import UPDATE_RULES, UpdateRuleFedAvg

ROBUST_STRATEGIES: dict[str, type[FedAvg]] = {
    "median": FedMedian,
    "trimmed_mean": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
}


def with_proximal_term(cls: type[FedAvg], mu: float) -> type[FedAvg]:
    """``cls`` sending FedProx's ``proximal-mu`` (what :class:`~flwr.serverapp.strategy.FedProx`
    adds to FedAvg), so a robust rule and the proximal term combine."""

    class Proximal(cls):  # type: ignore[misc, valid-type]
        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> Iterable[Message]:
            config["proximal-mu"] = mu
            return super().configure_train(server_round, arrays, config, grid)

    Proximal.__name__ = Proximal.__qualname__ = f"FedProx{cls.__name__}"
    return Proximal


def defended_strategy(
    setup: ServerSetup, plain: type[FedAvg], proximal_mu: float | None = None
) -> Strategy:
    """FedAvg/FedProx as the scenario's ``[robustness]`` asks: ``plain`` (FedAvg or FedProx) or
    the robust rule, wrapped in Flower's server-side DP clipping when ``dp_clipping_norm > 0``."""
    scenario = setup.scenario
    rob = scenario.robustness
    kwargs = fedavg_kwargs(scenario)
    if proximal_mu is not None and rob.aggregation == "mean":
        kwargs["proximal_mu"] = proximal_mu
    strategy = robust_strategy(setup, proximal_mu) or plain(**kwargs)
    if rob.dp_clipping_norm <= 0:
        return strategy
    sampled = max(1, math.ceil(scenario.federation.fraction_train * scenario.data.num_clients))
    return DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=rob.dp_noise_multiplier,
        clipping_norm=rob.dp_clipping_norm,
        num_sampled_clients=sampled,
    )


def robust_strategy(setup: ServerSetup, proximal_mu: float | None = None) -> Strategy | None:
    """The scenario's robust aggregation strategy, or None for the plain mean."""
    scenario = setup.scenario
    rob = scenario.robustness
    if rob.aggregation == "mean":
        return None
    kwargs = fedavg_kwargs(scenario)
    if rob.aggregation in UPDATE_RULES:
        cls: type[FedAvg] = UpdateRuleFedAvg
        kwargs.update(
            rule=rob.aggregation,
            clip_radius=rob.clip_radius,
            clip_iterations=rob.clip_iterations,
        )
    else:
        cls = ROBUST_STRATEGIES[rob.aggregation]
    if rob.aggregation == "trimmed_mean":
        kwargs["beta"] = rob.trim_beta
    if rob.aggregation in ("krum", "multikrum", "bulyan"):
        kwargs["num_malicious_nodes"] = rob.num_malicious
    if rob.aggregation == "multikrum":
        sampled = max(1, math.ceil(scenario.federation.fraction_train * scenario.data.num_clients))
        kwargs["num_nodes_to_select"] = max(1, sampled - rob.num_malicious)
    if proximal_mu is not None:
        cls = with_proximal_term(cls, proximal_mu)
    return cls(**kwargs)


class ClientTaggingWriter(RunWriter):
    """Adds what the scenario says about each client to its ``clients.jsonl`` rows: ``attacker``
    (1 for ``attack.clients``), so a run's per-client log says who poisoned it, and ``group``
    (the planted group of ``data.concept_shift``)."""

    def __init__(self, run_dir, resume: bool, tags: Callable[[int], dict[str, int]]) -> None:
        super().__init__(run_dir, resume=resume)
        self.tags = tags

    def log_clients(self, server_round: int, rows: list[dict]) -> None:
        tagged = [{**row, **self.tags(int(row.get("partition_id", -1)))} for row in rows]
        super().log_clients(server_round, tagged)


def run_writer(run_dir, scenario: Scenario, resume: bool) -> RunWriter:
    """The run's writer: tagging attackers when the scenario simulates an attack, and each
    client's group in a concept-shift federation."""
    attackers = set(scenario.attack.clients) if scenario.attack.kind != "none" else None
    data = scenario.data
    if attackers is None and data.concept_shift == "none":
        return RunWriter(run_dir, resume=resume)

    def tags(pid: int) -> dict[str, int]:
        out = {} if attackers is None else {"attacker": int(pid in attackers)}
        if data.concept_shift != "none" and 0 <= pid < data.num_clients:
            out["group"] = group_of(data, pid)
        return out

    return ClientTaggingWriter(run_dir, resume, tags)
