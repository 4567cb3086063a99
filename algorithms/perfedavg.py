"""Per-FedAvg, first-order (Fallah, Mokhtari, Ozdaglar 2020): FedAvg aggregation of a MAML-style
local objective; the personalized model is the global one after a few local steps."""

from typing import ClassVar, Literal

from algorithms.meta import PerFedAvgParams


class PerFedAvgConfig(PerFedAvgParams):
    name: Literal["perfedavg"] = "perfedavg"
    server_factory: ClassVar[str] = "server.perfedavg:make_perfedavg"
    client_trainer: ClassVar[str] = "clients.perfedavg:train_perfedavg"
    packable: ClassVar[bool] = True
