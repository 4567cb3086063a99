"""Per-FedAvg, first-order (Fallah, Mokhtari, Ozdaglar 2020): FedAvg aggregation of a MAML-style
local objective; the personalized model is the global one after a few local steps."""

from typing import Literal

from algorithms.base import register_algorithm
from algorithms.meta import PerFedAvgParams


@register_algorithm
class PerFedAvgConfig(PerFedAvgParams):
    name: Literal["perfedavg"] = "perfedavg"
