"""FedLAW server: Flower's FedAvg whose aggregation learns (gamma, lambda) on a server proxy set.

Only ``aggregate_train`` changes. The proxy set is carved from train before partitioning
(``data.proxy_fraction``, class-balanced, disjoint from every client) or, in deployment, read from
the operator's ``algorithm.proxy_file`` (.npz with arrays ``x`` and ``y``). Without either the
strategy factory raises before round 1. Each round reports ``fedlaw-gamma``,
``fedlaw-lambda-entropy``, the proxy loss before (FedAvg weights) and after, and appends the full
lambda vector (keyed by partition id) to ``fedlaw_weights.jsonl`` in the run folder.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterable
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg, Strategy

from algorithms.fedlaw import FedLAWConfig, lambda_entropy, learn_aggregation
from clients.data import DatasetInfo, load_proxy
from clients.identity import reply_partition_id
from clients.seeding import derive_seed
from scenarios.config import Scenario
from server.fedld import reply_arrays
from server.strategies import ServerSetup, fedavg_kwargs

WEIGHTS_FILE = "fedlaw_weights.jsonl"


class FedLAWProxyError(ValueError):
    """FedLAW was asked to run without proxy data on the server."""


class FedLAW(FedAvg):
    """FedAvg whose aggregate is ``gamma* sum_i lambda*_i w_i`` learned on the proxy set."""

    def __init__(
        self,
        cfg: FedLAWConfig,
        model: torch.nn.Module,
        proxy_x: torch.Tensor,
        proxy_y: torch.Tensor,
        seed: int = 0,
        weights_log: Path | None = None,
        **fedavg_args,
    ) -> None:
        super().__init__(**fedavg_args)
        self.cfg = cfg
        self.model = model
        self.proxy_x, self.proxy_y = proxy_x, proxy_y
        self.seed = seed
        self.weights_log = weights_log

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _errors = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        counts = [
            float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents
        ]
        t0 = time.perf_counter()
        result = learn_aggregation(
            self.model,
            [reply_arrays(m).to_torch_state_dict() for m in valid],
            counts,
            self.proxy_x,
            self.proxy_y,
            self.cfg,
            torch.Generator().manual_seed(derive_seed(self.seed, server_round, 7)),
        )
        server_time = time.perf_counter() - t0
        lambdas = [float(v) for v in result.lambdas]
        entropy = lambda_entropy(result.lambdas)
        log(
            INFO,
            "fedlaw: gamma*=%.4f lambda entropy=%.3f (uniform %.3f) proxy loss %.4f -> %.4f",
            result.gamma,
            entropy,
            float(np.log(len(lambdas))),
            result.proxy_loss_before,
            result.proxy_loss_after,
        )
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["fedlaw-gamma"] = result.gamma
        metrics["fedlaw-lambda-entropy"] = entropy
        metrics["fedlaw-lambda-max"] = max(lambdas)
        metrics["fedlaw-proxy-loss-before"] = result.proxy_loss_before
        metrics["fedlaw-proxy-loss-after"] = result.proxy_loss_after
        metrics["fedlaw-proxy-size"] = len(self.proxy_y)
        metrics["fedlaw-server-time-s"] = server_time
        metrics["fedlaw-lambda"] = lambdas  # a list: kept in the record, not in metrics.csv
        if self.weights_log is not None:
            self._log_weights(server_round, valid, result.gamma, lambdas)
        return ArrayRecord(result.global_state), metrics

    def _log_weights(
        self, server_round: int, valid: list[Message], gamma: float, lambdas: list[float]
    ) -> None:
        ids = []
        for m in valid:
            pid = reply_partition_id(m)
            ids.append(pid if pid is not None else m.metadata.src_node_id)
        line = {
            "round": server_round,
            "gamma": gamma,
            "lambda": dict(zip(map(str, ids), lambdas, strict=True)),
        }
        self.weights_log.parent.mkdir(parents=True, exist_ok=True)
        with self.weights_log.open("a") as fh:
            fh.write(json.dumps(line) + "\n")


def load_fedlaw_proxy(scenario: Scenario, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """The proxy set: the operator's file if ``algorithm.proxy_file``, else the carved-out split."""
    cfg: FedLAWConfig = scenario.algorithm
    if cfg.proxy_file:
        path = Path(cfg.proxy_file).expanduser()
        if not path.is_file():
            raise FedLAWProxyError(f"algorithm.proxy_file={str(path)!r} does not exist")
        with np.load(path) as npz:
            if "x" not in npz or "y" not in npz:
                raise FedLAWProxyError(
                    f"{path}: a FedLAW proxy file must hold arrays 'x' and 'y' "
                    f"(np.savez(path, x=..., y=...)); found {sorted(npz.files)}"
                )
            x, y = npz["x"].astype(np.float32), npz["y"].astype(np.int64)
        if tuple(x.shape[1:]) != tuple(info.input_shape) or len(x) != len(y) or len(y) == 0:
            raise FedLAWProxyError(
                f"{path}: x has shape {x.shape} and y {y.shape}; expected (N, "
                f"{', '.join(map(str, info.input_shape))}) and (N,) with N > 0"
            )
        if y.min() < 0 or y.max() >= info.num_classes:
            raise FedLAWProxyError(f"{path}: labels must lie in [0, {info.num_classes})")
        return x, y
    if scenario.data.proxy_fraction <= 0:
        raise FedLAWProxyError(
            "FedLAW learns its aggregation weights on a server proxy set, but this scenario has "
            "none: set data.proxy_fraction (e.g. 0.02, the paper's 2% of train, carved out before "
            "partitioning) or, in deployment, algorithm.proxy_file (an .npz with x and y)"
        )
    return load_proxy(scenario.data, scenario.seed)


def make_fedlaw(setup: ServerSetup) -> Strategy:
    x, y = load_fedlaw_proxy(setup.scenario, setup.info)
    model = copy.deepcopy(setup.model).to(setup.device)
    return FedLAW(
        setup.scenario.algorithm,
        model,
        torch.from_numpy(np.ascontiguousarray(x)).to(setup.device),
        torch.from_numpy(np.ascontiguousarray(y)).to(setup.device),
        seed=setup.scenario.seed,
        weights_log=setup.run_dir / WEIGHTS_FILE if setup.run_dir is not None else None,
        **fedavg_kwargs(setup.scenario),
    )
