"""Omniscient model-poisoning attacks: what colluding attackers send when they see the honest
updates of their round. Pure math on stacks of flattened updates (one row per honest client).

- :func:`alie_update` — "A little is enough" (Baruch, Baruch & Goldberg, NeurIPS 2019): every
  attacker sends μ − z·σ (coordinate-wise mean and sample standard deviation of the honest
  updates), small enough per coordinate to hide among the honest ones; z from
  :func:`alie_default_z`.
- :func:`ipm_update` — inner-product manipulation (Xie, Koyejo & Gupta, UAI 2019): every attacker
  sends −ε·μ, so that the aggregate's inner product with the true mean turns small or negative.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

# ε of Karimireddy, He & Jaggi (ICLR 2022), whose experiments the robustness table follows
IPM_DEFAULT_EPSILON = 0.1


def alie_default_z(num_clients: int, num_attackers: int) -> float:
    r"""Baruch et al.'s z: :math:`s = \lfloor n/2 + 1\rfloor - f` honest supporters are needed
    for a majority, and :math:`z = \Phi^{-1}((n - s)/n)` is the largest shift that keeps the
    attackers closer to the mean than that many honest clients (0 when that quantile is ≤ 1/2)."""
    if num_clients < 1 or not 0 <= num_attackers <= num_clients:
        raise ValueError(f"need 0 <= attackers <= clients, got {num_attackers} of {num_clients}")
    supporters = math.floor(num_clients / 2 + 1) - num_attackers
    quantile = (num_clients - supporters) / num_clients
    if quantile <= 0.5:
        return 0.0
    return NormalDist().inv_cdf(min(quantile, 1 - 1e-12))


def alie_update(honest: torch.Tensor, z: float) -> torch.Tensor:
    """μ − z·σ over the rows of ``honest`` (σ: sample standard deviation, n − 1; 0 for one row)."""
    if honest.dim() != 2 or honest.shape[0] == 0:
        raise ValueError("ALIE needs at least one honest update, stacked as (n, d)")
    mean = honest.mean(dim=0)
    if honest.shape[0] == 1:
        return mean
    return mean - z * honest.std(dim=0, correction=1)


def ipm_update(honest: torch.Tensor, epsilon: float = IPM_DEFAULT_EPSILON) -> torch.Tensor:
    """−ε·μ of the rows of ``honest``."""
    if honest.dim() != 2 or honest.shape[0] == 0:
        raise ValueError("IPM needs at least one honest update, stacked as (n, d)")
    return -epsilon * honest.mean(dim=0)
