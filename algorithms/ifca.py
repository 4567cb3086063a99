"""IFCA (Ghosh et al. 2020): k cluster models go to every client; each client trains the one with
the lowest loss on its own train split and the server averages per cluster."""

from typing import Literal

from pydantic import Field

from algorithms.base import AlgorithmConfig, register_algorithm


@register_algorithm
class IFCAConfig(AlgorithmConfig):
    name: Literal["ifca"] = "ifca"
    num_clusters: int = Field(3, ge=1, le=64, description="k cluster models")
