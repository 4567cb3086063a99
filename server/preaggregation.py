"""Steps that transform the round's validated replies before the algorithm's own rule, so they
compose with every strategy (FedAvg and its robust rules, FedProx, FedLD, FedLAW, the clustered
family): a :class:`RoundPlugin` placed after the reply validator. In order:

0. **Direction check** (``robustness.direction_check``, on by default): a reply whose update
   points the wrong way is excluded (logged, counted as ``num_excluded_direction``): updates of
   honest norm (a ×1 sign flip, IPM) pass the norm bound but not this. ``direction_reference``
   chooses what an update is compared with: ``"median"``, the round's coordinate-wise median
   update; ``"previous"``, the server's previous step for the group (the model sent this round
   minus the one sent the round before to the most of the same nodes, a cluster's own
   predecessor; the median when there is none, e.g. in round 1); or ``"both"`` (the default):
   excluded only if the cosine is below ``direction_threshold`` (default -0.15) against the
   median *and* that step. Under strong label skew (Dirichlet 0.1) honest clients whose rare
   classes pull the body away from the median point against it (the median alone at threshold
   0 cost 11.6 points of clean accuracy on digits), but still agree with the server's last
   step, which they helped make; at -0.15 against both no clean cost was measured on the
   quickstart or on digits at 0.5 and 0.1 (docs/results/robustness.md). The sent models of the
   last round travel in the plugin's state, so a resumed run compares with the same step.
   ``direction_scope = "body"`` compares every array before the model's last weight matrix (the
   output layer, where label-skewed clients legitimately pull apart: on the quickstart 3-9 % of
   clean updates point against the median over all arrays, none over the body). Per group of at
   least 3 replies; never more than ⌊(n − 1)/2⌋ of a group (``algorithms/robust_rules.py``).
   Sparse (``lora_sparse``) replies are not checked.
1. **Weight cap** (``robustness.max_weight_share``, on by default): no reply's ``num-examples``
   exceeds the given share of the round's total (water filling, ``algorithms/robust_rules.py``);
   ``"auto"`` = 1.5 / the number of replies (at most 1.5 equal shares: on the quickstart a cap of
   0.2 let one client claiming 10⁹ examples cost 2.1 points, 0.15 cost 0.8).
2. **Trust scoring** (``robustness.trust_scoring``, FLTrust): the server trains the model it sent
   on its proxy set (``data.proxy_fraction``) as a client would (``train`` settings, for the
   replies' median ``num-steps``), giving g₀;
   each update is rescaled to ‖g₀‖ and its ``num-examples`` replaced by its trust score
   ReLU(cos(Δᵢ, g₀)); replies scoring 0 are dropped. With a weighted mean this is FLTrust.
3. **Pre-aggregation** (``robustness.preaggregation``): ``bucketing`` replaces the replies by
   ⌈n/s⌉ bucket means (each carried by its bucket's first reply, ``num-examples`` summed);
   ``nnm`` replaces each update by the mean of its n − f nearest (f = ``num_malicious``).

Updates are taken per group of replies sent the same model (``server/update_stack.py``).
Strategies that aggregate unweighted (FedLD) see steps 2-3's arrays but ignore the weights.
"""

from __future__ import annotations

import copy
import math
from logging import WARNING

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from algorithms.robust_rules import (
    bucketing,
    capped_weights,
    direction_scores,
    lowest_below,
    nearest_neighbour_mixing,
    rescale_to,
    trust_scores,
)
from clients.arrays import as_numpy, records_of
from clients.data import ClientData, load_proxy
from clients.seeding import derive_seed
from clients.training import TrainJob, local_sgd
from scenarios.config import Scenario
from server.plugins import Metrics, RoundPlugin
from server.strategies import ServerSetup
from server.update_stack import (
    UpdateGroup,
    flatten,
    float_keys,
    group_updates,
    set_update,
    single_record,
)

WEIGHT_KEY = "num-examples"
AUTO_SHARE_FACTOR = 1.5  # "auto" cap: at most 1.5 equal shares
PREAGGREGATION_SEED_TAG = 0xB0C7


def max_share_of(setting: float | str, num_replies: int) -> float:
    if setting == "auto":
        return min(1.0, AUTO_SHARE_FACTOR / max(num_replies, 1))
    return float(setting)


def _metrics_of(reply: Message) -> tuple[str, MetricRecord]:
    return next(iter(records_of(reply.content, MetricRecord).items()))


def _set_weight(reply: Message, weight: float) -> None:
    name, metrics = _metrics_of(reply)
    new = MetricRecord(dict(metrics.items()))
    new[WEIGHT_KEY] = weight
    content = RecordDict(dict(reply.content.items()))
    content[name] = new
    reply.content = content


def _weight(reply: Message) -> float:
    return float(_metrics_of(reply)[1][WEIGHT_KEY])


class UpdateTransform(RoundPlugin):
    """Weight cap, trust scoring and pre-aggregation (see the module docstring)."""

    def __init__(self, setup: ServerSetup) -> None:
        self.scenario = setup.scenario
        rob = setup.scenario.robustness
        self.max_weight_share = rob.max_weight_share
        self.preaggregation = rob.preaggregation
        self.bucket_size = rob.bucket_size
        self.num_malicious = rob.num_malicious
        self.trust_scoring = rob.trust_scoring
        self.direction_check = checks_directions(setup.scenario)
        self.direction_threshold = rob.direction_threshold
        self.direction_scope = rob.direction_scope
        self.direction_reference = rob.direction_reference
        self.total_excluded_direction = 0
        # direction_reference "previous"/"both": the models sent this round and the round before
        # (per group of nodes sent the same record), whose difference is the server's last step
        self._sent_models: list[dict] = []
        self._previous_models: list[dict] = []
        self.device = setup.device
        self._model = copy.deepcopy(setup.model) if rob.trust_scoring else None
        self._proxy: ClientData | None = None
        if rob.trust_scoring:
            x, y = load_proxy(setup.scenario.data, setup.scenario.seed)
            empty_x, empty_y = x[:0], y[:0]
            self._proxy = ClientData(-1, x, y, empty_x, empty_y)
        self._sent: dict[int, RecordDict] = {}

    @classmethod
    def wanted(cls, scenario: Scenario) -> bool:
        rob = scenario.robustness
        return (
            rob.max_weight_share != 1.0
            or rob.trust_scoring
            or rob.preaggregation != "none"
            or checks_directions(scenario)
        )

    def observe_train_instructions(self, server_round: int, instructions: list[Message]) -> None:
        self._sent = {m.metadata.dst_node_id: m.content for m in instructions}
        if self._tracks_steps:
            self._previous_models = self._sent_models
            self._sent_models = sent_models(instructions)

    @property
    def _tracks_steps(self) -> bool:
        return self.direction_check and self.direction_reference != "median"

    def filter_train_replies(
        self, server_round: int, replies: list[Message]
    ) -> tuple[list[Message], Metrics]:
        if not replies:
            return replies, {}
        metrics: Metrics = {}
        if self.direction_check:
            replies, metrics["num_excluded_direction"] = self._check_directions(
                server_round, replies
            )
            if not replies:
                return replies, metrics
        share = max_share_of(self.max_weight_share, len(replies))
        if share < 1.0:
            metrics["num_weight_capped"] = self._cap_weights(replies, share)
        if not self.trust_scoring and self.preaggregation == "none":
            return replies, metrics
        keep = [True] * len(replies)
        for g, group in enumerate(group_updates(replies, self._sent)):
            if self.trust_scoring:
                self._score(server_round, replies, group, keep)
            group_replies = [i for i in group.indices if keep[i]]
            if not group_replies:
                continue
            rows = group.updates[[group.indices.index(i) for i in group_replies]]
            if self.preaggregation == "nnm":
                f = min(self.num_malicious, len(group_replies) - 1)
                mixed = nearest_neighbour_mixing(rows, f)
                for i, row in zip(group_replies, mixed, strict=True):
                    set_update(replies[i], group, row)
            elif self.preaggregation == "bucketing":
                generator = torch.Generator().manual_seed(
                    derive_seed(self.scenario.seed, server_round, g, PREAGGREGATION_SEED_TAG)
                )
                means, buckets = bucketing(rows, self.bucket_size, generator)
                for mean, bucket in zip(means, buckets, strict=True):
                    members = [group_replies[b] for b in bucket]
                    carrier = min(members)  # the reply order is sorted: keep it deterministic
                    set_update(replies[carrier], group, mean)
                    _set_weight(replies[carrier], sum(_weight(replies[m]) for m in members))
                    for m in members:
                        keep[m] = m == carrier
        kept = [r for r, k in zip(replies, keep, strict=True) if k]
        metrics["num_after_preaggregation"] = len(kept)
        return kept, metrics

    def _check_directions(
        self, server_round: int, replies: list[Message]
    ) -> tuple[list[Message], int]:
        """Drop the replies the direction check flags (``algorithms/robust_rules.py``'s
        :func:`direction_outliers`, scored once here for the log too), group by group (step 0)."""
        excluded: set[int] = set()
        for group in group_updates(replies, self._sent):
            if len(group.indices) < 3:
                continue
            rows = group.updates
            step = None
            if self._tracks_steps:
                nodes = {replies[i].metadata.src_node_id for i in group.indices}
                step = previous_step(group, nodes, self._previous_models)
            if self.direction_scope == "body":
                body = body_size(group.sent, group.keys)
                rows = rows[:, :body]
                step = None if step is None else step[:body]
            if step is not None and float(step.norm()) == 0.0:
                step = None  # the server did not move: no direction to compare with
            reference, also = None, None  # the median alone
            if step is not None and self.direction_reference == "previous":
                reference = step
            elif step is not None and self.direction_reference == "both":
                also = step
            scores = direction_scores(rows, reference, also)
            flagged = lowest_below(scores, self.direction_threshold)
            if not bool(flagged.any()):
                continue
            against = {
                (True, False): "the server's previous step",
                (False, True): "the round's median update and the server's previous step (max)",
            }.get((reference is not None, also is not None), "the round's median update")
            for row, i in enumerate(group.indices):
                if not bool(flagged[row]):
                    continue
                excluded.add(i)
                log(
                    WARNING,
                    "round %d: excluded reply from node %d (direction): cos(update, %s)=%.3f < "
                    "robustness.direction_threshold=%g (scope %s)",
                    server_round,
                    replies[i].metadata.src_node_id,
                    against,
                    float(scores[row]),
                    self.direction_threshold,
                    self.direction_scope,
                )
        self.total_excluded_direction += len(excluded)
        return [r for i, r in enumerate(replies) if i not in excluded], len(excluded)

    def state(self) -> dict:
        state: dict = {"total_excluded_direction": self.total_excluded_direction}
        if self._tracks_steps:  # the last round's sent models: the next round's step needs them
            state["sent_models"] = [dict(m) for m in self._sent_models]
        return state

    def load_state(self, state: dict) -> None:
        self.total_excluded_direction = int(state.get("total_excluded_direction", 0))
        self._sent_models = [
            {"nodes": [int(n) for n in m["nodes"]], "keys": list(m["keys"]), "model": m["model"]}
            for m in state.get("sent_models", [])
        ]
        self._previous_models = []

    def _cap_weights(self, replies: list[Message], share: float) -> int:
        weights = torch.tensor([_weight(r) for r in replies], dtype=torch.float64)
        capped = capped_weights(weights, share)
        changed = 0
        for reply, before, after in zip(replies, weights.tolist(), capped.tolist(), strict=True):
            if after < before:
                _set_weight(reply, after)
                changed += 1
        return changed

    def _score(
        self, server_round: int, replies: list[Message], group: UpdateGroup, keep: list[bool]
    ) -> None:
        steps = [float(_metrics_of(replies[i])[1].get("num-steps", 0)) for i in group.indices]
        reference = self.reference_update(server_round, group, int(np.median(steps)))
        scores = trust_scores(group.updates, reference)
        rescaled = rescale_to(group.updates, float(reference.norm()))
        for row, i in enumerate(group.indices):
            if float(scores[row]) <= 0.0:
                keep[i] = False
                continue
            set_update(replies[i], group, rescaled[row])
            _set_weight(replies[i], float(scores[row]))
        group.updates = rescaled

    def reference_update(
        self, server_round: int, group: UpdateGroup, steps: int = 0
    ) -> torch.Tensor:
        """g₀: the sent model trained on the proxy set with the clients' ``train`` settings, for
        ``steps`` SGD steps (the clients' median, as FLTrust's server runs the clients' number of
        local iterations: g₀'s norm sets every update's) or, when 0, ``train.epochs`` epochs."""
        assert self._model is not None and self._proxy is not None
        model = self._model
        state = model.state_dict()
        sent = {k: torch.from_numpy(np.array(v)) for k, v in group.sent.items()}
        model.load_state_dict({k: sent.get(k, t) for k, t in state.items()})
        model.to(self.device)
        generator = torch.Generator().manual_seed(
            derive_seed(self.scenario.seed, server_round, -1, PREAGGREGATION_SEED_TAG)
        )
        job = TrainJob(
            model, self._proxy, self.scenario, ConfigRecord(), RecordDict(), generator, self.device
        )
        cfg = self.scenario.train
        if steps > 0:
            per_epoch = math.ceil(len(self._proxy.x_train) / cfg.batch_size)
            cfg = cfg.model_copy(update={"epochs": math.ceil(steps / per_epoch)})
        local_sgd(job, cfg=cfg, max_steps=steps or None)
        trained = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        return flatten(trained, group.keys) - flatten(group.sent, group.keys)


def checks_directions(scenario: Scenario) -> bool:
    """Whether step 0 runs: the direction check is on and the replies are dense (sparse
    ``lora_sparse`` packets are not checked)."""
    sparse = getattr(scenario.algorithm, "sparse_replies", False)
    return scenario.robustness.direction_check and not sparse


def sent_models(instructions: list[Message]) -> list[dict]:
    """The round's distinct sent models (by record identity, as ``group_updates`` groups
    replies): per model the nodes it went to, its float keys and its flattened float64 arrays.
    Nodes sent several records (IFCA candidates) are left out."""
    by_record: dict[int, dict] = {}
    for m in instructions:
        single = single_record(m.content)
        if single is None:
            continue
        record = single[1]
        if id(record) not in by_record:
            arrays = as_numpy(record)
            keys = float_keys(arrays)
            by_record[id(record)] = {"nodes": [], "keys": keys, "model": flatten(arrays, keys)}
        by_record[id(record)]["nodes"].append(int(m.metadata.dst_node_id))
    return list(by_record.values())


def previous_step(group: UpdateGroup, nodes: set[int], previous: list[dict]) -> torch.Tensor | None:
    """The server's last step for ``group``: its sent model minus the one sent the round before
    to the most of the same ``nodes`` (a cluster's previous model), or to everyone when the
    previous round sent one model; None when none fits (first round, new layout)."""
    fitting = [
        m
        for m in previous
        if m["keys"] == group.keys
        and m["model"].numel() == sum(group.sent[k].size for k in group.keys)
    ]
    if not fitting:
        return None
    overlap = [len(nodes.intersection(m["nodes"])) for m in fitting]
    best = max(range(len(fitting)), key=lambda j: (overlap[j], -j))
    if overlap[best] == 0 and len(previous) != 1:
        return None
    return flatten(group.sent, group.keys) - fitting[best]["model"]


def body_size(sent: dict[str, np.ndarray], keys: list[str]) -> int:
    """Entries of the flattened update (``keys``' order) before the last array of two or more
    dimensions (the output layer's weight matrix in fedge's models, whose state dicts end with
    the head): the model's body. All entries when no array comes before that matrix."""
    matrices = [i for i, k in enumerate(keys) if np.ndim(sent[k]) >= 2]
    if not matrices or matrices[-1] == 0:
        return sum(int(np.size(sent[k])) for k in keys)
    return sum(int(np.size(sent[k])) for k in keys[: matrices[-1]])


def small_federation_warnings(scenario: Scenario) -> list[str]:
    """Why the configured defences cannot do their job with this few clients per round."""
    rob = scenario.robustness
    sampled = max(1, math.ceil(scenario.federation.fraction_train * scenario.data.num_clients))
    warnings = []
    if sampled < 3:
        warnings.append(
            f"only {sampled} client(s) train per round: no defence can outvote one attacker "
            "(the relative norm bound and every robust rule need an honest majority of 3+); "
            "raise data.num_clients or federation.fraction_train"
        )
    if rob.aggregation == "trimmed_mean" and math.floor(rob.trim_beta * sampled) == 0:
        warnings.append(
            f"robustness.trim_beta={rob.trim_beta:g} trims nothing from {sampled} replies; raise "
            f"it to at least {1 / sampled:.2f}"
        )
    if rob.preaggregation == "bucketing" and math.ceil(sampled / rob.bucket_size) < 3:
        warnings.append(
            f"bucketing {sampled} replies by {rob.bucket_size} leaves fewer than 3 buckets for "
            "the rule to choose between; lower robustness.bucket_size"
        )
    attackers = len(scenario.attack.clients) if scenario.attack.kind != "none" else 0
    if attackers and 2 * attackers >= sampled:
        warnings.append(
            f"{attackers} attackers among {sampled} clients per round are no minority: "
            "robust aggregation assumes fewer than half"
        )
    return warnings


def warn_small_federation(scenario: Scenario) -> None:
    for text in small_federation_warnings(scenario):
        log(WARNING, "defence: %s", text)
