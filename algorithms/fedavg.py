"""FedAvg (McMahan et al. 2017): plain local SGD; the aggregation is Flower's own FedAvg."""

from typing import Literal

from algorithms.base import AlgorithmConfig, register_algorithm


@register_algorithm
class FedAvgConfig(AlgorithmConfig):
    name: Literal["fedavg"] = "fedavg"
