"""A third-party algorithm, as a plug-in package would ship it (registered in the tests through the
``fedge.algorithms`` entry-point group; fedge's own files know nothing of it).

``tinyavg``: FedAvg whose clients scale their update by ``step`` (w_sent + step * (w_local - w_sent)),
and report ``tiny-step`` so a test can see that this trainer ran.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from flwr.serverapp.strategy import FedAvg, Strategy
from pydantic import Field

from algorithms.base import AlgorithmConfig
from clients.training import TrainJob, TrainResult, local_sgd
from server.strategies import ServerSetup, fedavg_kwargs


class TinyAvgConfig(AlgorithmConfig):
    name: Literal["tinyavg"] = "tinyavg"
    server_factory: ClassVar[str] = "tiny_algorithm:make_server"
    client_trainer: ClassVar[str] = "tiny_algorithm:train"
    step: float = Field(0.5, gt=0.0, le=1.0, description="share of the local update sent")


def make_server(setup: ServerSetup) -> Strategy:
    return FedAvg(**fedavg_kwargs(setup.scenario))


def train(job: TrainJob) -> TrainResult:
    sent = [p.detach().clone() for p in job.model.parameters()]
    result = local_sgd(job)
    step = job.scenario.algorithm.step
    with torch.no_grad():
        for p, s in zip(job.model.parameters(), sent, strict=True):
            p.copy_(s + step * (p - s))
    result.metrics["tiny-step"] = step
    return result
