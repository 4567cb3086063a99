"""FedProx (Li et al. 2020): local objective f_i(w) + mu/2 * ||w - w_global||^2."""

from collections.abc import Iterable
from typing import ClassVar, Literal

import torch
from pydantic import Field

from algorithms.base import AlgorithmConfig


class FedProxConfig(AlgorithmConfig):
    name: Literal["fedprox"] = "fedprox"
    server_factory: ClassVar[str] = "server.fedprox:make_fedprox"
    client_trainer: ClassVar[str] = "clients.fedprox:train_fedprox"
    packable: ClassVar[bool] = True
    fedavg_aggregation: ClassVar[bool] = True
    mu: float = Field(0.01, ge=0.0, description="proximal coefficient mu")


def proximal_term(
    params: Iterable[torch.Tensor], global_params: Iterable[torch.Tensor], mu: float
) -> torch.Tensor:
    """mu/2 * sum_l ||w_l - w_global_l||^2, differentiable in ``params`` only."""
    total = torch.zeros(())
    for w, g in zip(params, global_params, strict=True):
        total = total + (w - g.detach()).pow(2).sum()
    return 0.5 * mu * total
