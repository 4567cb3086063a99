"""Concept-shift federations: clients in planted groups, each group with its own task.

``data.concept_shift`` transforms every client's train and local test rows by its group's
transform, after partitioning (the partitions, and their disk cache, are those of the same
federation without a shift). Clients are split evenly into ``data.num_groups`` contiguous
blocks of partition ids: client ``p`` of ``N`` is in group ``p * G // N``. **Group 0 keeps the
original task**, as the central test set (never transformed) does; group ``g > 0`` gets:

================== ===========================================================================
label_permutation  labels ``y -> perm_g[y]``; ``perm_g`` a permutation drawn from the run seed,
                   distinct from the identity and from every other group's
rotation           1-D inputs (mnist1d, synthetic): a flip for odd ``g`` and a circular shift
                   by ``(g // 2) * L // ceil(G / 2)`` positions; image inputs ``(C, H, W)``
                   (digits): ``g % 4`` quarter turns, mirrored for ``g >= 4`` (at most 8 groups)
feature_shift      ``x -> scale_g * x + offset_g * s + noise``, ``noise ~ N(0, (sigma_g * s)^2)``
                   drawn once per row; ``s`` is the source's train std; ``scale_g = exp(U(-0.7,
                   0.7))``, ``offset_g ~ U(-1, 1)``, ``sigma_g ~ U(0.1, 0.5)`` from the run seed
================== ===========================================================================

Everything is a pure function of (data config, seed, partition id), so every engine -- and
every process of one -- builds the same shifted rows. Rotations take no seed: as in IFCA's
rotated MNIST, the groups are the fixed symmetries in a fixed order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from clients.datasets import DataError, norm_seed
from scenarios.config import DataConfig

SHIFT_FIELDS = frozenset({"concept_shift", "num_groups"})
# independent numpy streams derived from the run seed (clients/partitions.py uses 1)
_LABEL_STREAM = 11
_FEATURE_STREAM = 12
_NOISE_STREAM = 13
# which rows a feature-shift noise draw is for
TRAIN_ROWS, LOCAL_TEST_ROWS, CENTRAL_TEST_ROWS = 0, 1, 2


def partition_json(cfg: DataConfig) -> str:
    """The data config without its shift fields: what the partitions (and their cache) depend on."""
    return cfg.model_dump_json(exclude=set(SHIFT_FIELDS))


def group_of(cfg: DataConfig, partition_id: int) -> int:
    """The planted group of client ``partition_id`` (0 for every client without a shift)."""
    return int(partition_id) * cfg.num_groups // cfg.num_clients


def client_groups(cfg: DataConfig) -> np.ndarray:
    """Every client's group, indexed by partition id."""
    return np.arange(cfg.num_clients, dtype=np.int64) * cfg.num_groups // cfg.num_clients


@dataclass(frozen=True)
class FeatureShift:
    """One group's input transform ``scale * x + offset * std + N(0, (sigma * std)^2)``."""

    scale: float
    offset: float
    sigma: float


def label_permutations(num_classes: int, num_groups: int, seed: int) -> np.ndarray:
    """``(num_groups, num_classes)``: row 0 the identity, the others distinct seeded permutations
    (drawn in order, so the first groups' permutations do not depend on ``num_groups``)."""
    if num_groups > math.factorial(min(num_classes, 20)):
        raise DataError(
            f"data.num_groups={num_groups} distinct label permutations do not exist for "
            f"{num_classes} classes; lower data.num_groups"
        )
    rng = np.random.default_rng([norm_seed(seed), _LABEL_STREAM])
    perms = [np.arange(num_classes, dtype=np.int64)]
    seen = {tuple(perms[0])}
    while len(perms) < num_groups:
        perm = rng.permutation(num_classes).astype(np.int64)
        if tuple(perm) not in seen:
            seen.add(tuple(perm))
            perms.append(perm)
    return np.stack(perms)


def feature_shifts(num_groups: int, seed: int) -> list[FeatureShift]:
    """Each group's feature shift; group 0's is the identity."""
    out = [FeatureShift(1.0, 0.0, 0.0)]
    for group in range(1, num_groups):
        rng = np.random.default_rng([norm_seed(seed), _FEATURE_STREAM, group])
        out.append(
            FeatureShift(
                scale=float(np.exp(rng.uniform(-0.7, 0.7))),
                offset=float(rng.uniform(-1.0, 1.0)),
                sigma=float(rng.uniform(0.1, 0.5)),
            )
        )
    return out


def rotate(x: np.ndarray, group: int, num_groups: int) -> np.ndarray:
    """Group ``group``'s rotation of a batch ``x`` of shape ``(n, *input_shape)``."""
    sample_shape = x.shape[1:]
    if len(sample_shape) == 1:
        length = sample_shape[0]
        shifts = math.ceil(num_groups / 2)
        if shifts > length:
            raise DataError(
                f"data.concept_shift='rotation' has 2 x {length} distinct flips/circular shifts "
                f"of {length}-long inputs, fewer than data.num_groups={num_groups}; lower "
                "data.num_groups"
            )
        out = x[:, ::-1] if group % 2 else x
        return np.roll(out, (group // 2) * length // shifts, axis=1).copy()
    if num_groups > 8:
        raise DataError(
            f"data.concept_shift='rotation' on images has 8 distinct quarter turns and mirrors, "
            f"fewer than data.num_groups={num_groups}; lower data.num_groups to <= 8"
        )
    height, width = sample_shape[-2:]
    if height != width and num_groups > 2:
        raise DataError(
            f"data.concept_shift='rotation' turns images by 90 degrees, which needs square "
            f"images (these are {height}x{width}); lower data.num_groups to 2 (a half turn) or "
            "use data.concept_shift='feature_shift'"
        )
    turns = (group % 4) * (2 if height != width else 1)
    out = np.rot90(x, k=turns, axes=(-2, -1))
    return (out[..., ::-1] if group >= 4 else out).copy()


@lru_cache(maxsize=8)
def _label_permutations(num_classes: int, num_groups: int, seed: int) -> np.ndarray:
    return label_permutations(num_classes, num_groups, seed)


def apply_shift(
    cfg: DataConfig,
    seed: int,
    group: int,
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    feature_std: float,
    rows_id: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` as group ``group`` sees them (new arrays; the inputs are not modified).

    ``rows_id`` = (:data:`TRAIN_ROWS` / :data:`LOCAL_TEST_ROWS` / :data:`CENTRAL_TEST_ROWS`,
    partition id) seeds the feature-shift noise of these rows."""
    if cfg.concept_shift == "none" or group == 0:
        return x, y
    if cfg.concept_shift == "label_permutation":
        perm = _label_permutations(num_classes, cfg.num_groups, norm_seed(seed))[group]
        return x, perm[y]
    if cfg.concept_shift == "rotation":
        return rotate(x, group, cfg.num_groups), y
    shift = feature_shifts(cfg.num_groups, seed)[group]
    rng = np.random.default_rng([norm_seed(seed), _NOISE_STREAM, group, *rows_id])
    noise = rng.normal(0.0, shift.sigma * feature_std, size=x.shape)
    shifted = shift.scale * x + shift.offset * feature_std + noise
    return shifted.astype(x.dtype), y
