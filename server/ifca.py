"""IFCA server (Ghosh et al. 2020): k cluster models, all sent to every sampled client each round
(one RecordDict, several ArrayRecords); each client trains the lowest-loss one and reports its
choice; models are averaged per cluster. Cluster 0 starts from the run's initial model, cluster
c > 0 from an independent initialization seeded by (seed, c)."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from clients.models import build_model
from clients.seeding import derive_seed
from server.cluster_base import ClusterStrategy
from server.strategies import ServerSetup, fedavg_kwargs

_INIT_STREAM = 5


class IFCA(ClusterStrategy):
    offer_all_clusters = True

    def __init__(self, setup: ServerSetup, **fedavg_kw: Any) -> None:
        super().__init__(setup, **fedavg_kw)
        sc = setup.scenario
        models = {0: ArrayRecord(setup.model.state_dict())}
        for c in range(1, sc.algorithm.num_clusters):
            torch.manual_seed(derive_seed(sc.seed, c, _INIT_STREAM))
            init = build_model(sc.model, setup.info.input_shape, setup.info.num_classes)
            models[c] = ArrayRecord(init.state_dict())
        self.set_clusters(models, {})


def make_ifca(setup: ServerSetup) -> Strategy:
    return IFCA(setup, **fedavg_kwargs(setup.scenario))
