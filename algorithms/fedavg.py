"""FedAvg (McMahan et al. 2017): plain local SGD; the aggregation is Flower's own FedAvg."""

from typing import ClassVar, Literal

from algorithms.base import AlgorithmConfig


class FedAvgConfig(AlgorithmConfig):
    name: Literal["fedavg"] = "fedavg"
    server_factory: ClassVar[str] = "server.fedavg:make_fedavg"
    client_trainer: ClassVar[str] = "clients.fedavg:train_fedavg"
    packable: ClassVar[bool] = True
    fedavg_aggregation: ClassVar[bool] = True
