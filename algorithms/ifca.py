"""IFCA (Ghosh et al. 2020): k cluster models go to every client; each client trains the one with
the lowest loss on its own train split and the server averages per cluster."""

from typing import ClassVar, Literal

from pydantic import Field

from algorithms.base import AlgorithmConfig


class IFCAConfig(AlgorithmConfig):
    name: Literal["ifca"] = "ifca"
    server_factory: ClassVar[str] = "server.ifca:make_ifca"
    client_trainer: ClassVar[str] = "clients.ifca:train_ifca"
    packable: ClassVar[bool] = True
    num_clusters: int = Field(3, ge=1, le=64, description="k cluster models")
