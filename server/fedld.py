"""FedLD server: Flower's FedAvg with its aggregation replaced by principal-gradient aggregation.

Only ``aggregate_train`` changes (sampling, messages, validation and metric averaging are FedAvg's).
The reference aggregates *unweighted*; so do we. ``algorithm.aggregation = "mean"`` gives the
margin-loss-only ablation (FedLD clients, plain unweighted mean of the client models).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from algorithms.fedld import FedLDConfig, agreement_with_mean, fedld_aggregate_state
from server.strategies import ServerSetup, fedavg_kwargs


def reply_arrays(msg: Message) -> ArrayRecord:
    """The single ArrayRecord of a validated train reply."""
    return next(iter(msg.content.array_records.values()))


class FedLD(FedAvg):
    """FedAvg whose aggregation is FedLD's principal-gradient aggregation (per state-dict tensor)."""

    def __init__(self, cfg: FedLDConfig, buffer_names: Iterable[str] = (), **fedavg_args) -> None:
        super().__init__(**fedavg_args)
        self.cfg = cfg
        self.buffer_names = frozenset(buffer_names)
        self.num_aggregations = 0  # the reference's "has history" test: 0 => first round => mean
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays  # the updates Delta_i = w_i - w_global need the weights sent out
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _errors = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        if self._global is None:
            raise RuntimeError("FedLD.aggregate_train called before configure_train")
        global_state = self._global.to_torch_state_dict()
        client_states = [reply_arrays(m).to_torch_state_dict() for m in valid]
        new_state = fedld_aggregate_state(
            global_state,
            client_states,
            k_prop=self.cfg.k_prop,
            server_lr=self.cfg.server_lr,
            first_round=self.num_aggregations == 0,
            buffer_names=self.buffer_names,
            principal=self.cfg.aggregation == "principal",
        )
        self.num_aggregations += 1
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        metrics = metrics if metrics is not None else MetricRecord()
        cos, ratio = agreement_with_mean(global_state, new_state, client_states, self.buffer_names)
        metrics["fedld_cos_to_mean"] = cos  # 1.0 on the first round and in the mean ablation
        metrics["fedld_norm_ratio_to_mean"] = ratio
        return ArrayRecord(new_state), metrics

    # checkpoints: without the count a resumed run's first round would take the plain mean
    def state_dict(self) -> dict[str, int]:
        return {"num_aggregations": self.num_aggregations}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.num_aggregations = int(state["num_aggregations"])


def make_fedld(setup: ServerSetup) -> Strategy:
    buffers = [name for name, _ in setup.model.named_buffers()]
    return FedLD(setup.scenario.algorithm, buffers, **fedavg_kwargs(setup.scenario))
