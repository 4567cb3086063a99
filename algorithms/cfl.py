"""Clustered FL (Sattler, Müller, Samek 2020): start with one cluster; split a cluster in two by the
cosine similarity of its clients' updates once it is near a stationary point of the joint objective
(‖mean Δ‖ < ε1) while some client is not (max ‖Δ_i‖ > ε2)."""

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from algorithms.base import AlgorithmConfig


class CFLConfig(AlgorithmConfig):
    name: Literal["cfl"] = "cfl"
    server_factory: ClassVar[str] = "server.cfl:make_cfl"
    client_trainer: ClassVar[str] = "clients.cfl:train_cfl"
    packable: ClassVar[bool] = True
    eps1: float = Field(
        0.4, gt=0.0, description="split only when the cluster's mean update norm is below ε1"
    )
    eps2: float = Field(
        0.6, gt=0.0, description="... and its largest client update norm is above ε2"
    )
    warmup_rounds: int = Field(5, ge=1, description="no split before this round")
    min_cluster_size: int = Field(2, ge=1, description="each side of a split keeps this many")
    max_clusters: int = Field(8, ge=1, le=1000, description="stop splitting at this many clusters")

    @model_validator(mode="after")
    def _ordered(self) -> "CFLConfig":
        if self.eps2 <= self.eps1:
            raise ValueError(f"cfl needs eps2 > eps1 (got eps1={self.eps1}, eps2={self.eps2})")
        return self
