"""Partitioning: the server's proxy carve-out, flwr-datasets partitioners over an index table,
and each client's local train/test split (see ``clients/data.py`` for the whole pipeline)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    ExponentialPartitioner,
    IidPartitioner,
    LinearPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
    SquarePartitioner,
)

from clients.datasets import DataError, DatasetInfo, Source, load_source, norm_seed, source_key
from scenarios.config import DataConfig

_PROXY_STREAM = 1  # independent numpy streams derived from the run seed


@dataclass(frozen=True)
class Federation:
    """The partitioned train set: the partitioner (dataset assigned, indices determined)."""

    source: Source
    partitioner: Partitioner
    proxy_rows: np.ndarray  # indices into source.x_train held by the server


# -- partitioning -------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def federation(cfg_json: str, seed: int) -> Federation:
    """Proxy carve-out + partitioner for one (config, seed); computed once per process."""
    cfg = DataConfig.model_validate_json(cfg_json)
    seed = norm_seed(seed)
    src = load_source(source_key(cfg, seed))
    num_classes = src.info.num_classes
    n_train = len(src.y_train)

    proxy_rows = np.empty(0, dtype=np.int64)
    if cfg.proxy_fraction > 0:
        n_proxy = max(1, round(cfg.proxy_fraction * n_train))
        rng = np.random.default_rng([seed, _PROXY_STREAM])
        proxy_rows = _class_balanced_sample(src.y_train, n_proxy, num_classes, rng)
    client_rows = np.setdiff1d(np.arange(n_train, dtype=np.int64), proxy_rows)
    _check_feasible(cfg, src.info, len(client_rows))

    columns: dict[str, Any] = {"row": client_rows, "label": src.y_train[client_rows]}
    features = {"row": Value("int64"), "label": ClassLabel(num_classes=num_classes)}
    if src.device is not None:
        columns["device"] = src.device[client_rows]
        features["device"] = Value("int64")
    table = Dataset.from_dict(columns, features=Features(features))

    partitioner = _make_partitioner(cfg, seed)
    if cfg.dataset != "synthetic" and cfg.partitioner in ("iid", "size"):
        table = table.shuffle(seed=seed)  # these partitioners split in order and take no seed
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():
            # Dirichlet warns on every redraw; if all redraws fail we raise below instead.
            warnings.simplefilter("ignore", UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module="pyarrow")
            num_partitions = partitioner.num_partitions
            partitioner.load_partition(0)  # determines every partition's indices now
    except (ValueError, ZeroDivisionError) as err:
        raise DataError(_partition_failure(cfg, src.info, len(client_rows), err)) from None
    if num_partitions != cfg.num_clients:
        raise DataError(
            f"data.num_clients={cfg.num_clients} but only {num_partitions} synthetic devices kept "
            f"training data after the proxy carve-out (data.proxy_fraction={cfg.proxy_fraction}); "
            "raise data.num_samples or lower data.proxy_fraction"
        )
    return Federation(source=src, partitioner=partitioner, proxy_rows=proxy_rows)


def _make_partitioner(cfg: DataConfig, seed: int) -> Partitioner:
    n = cfg.num_clients
    if cfg.dataset == "synthetic":
        return NaturalIdPartitioner(partition_by="device")
    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=n)
    if cfg.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=n,
            partition_by="label",
            alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size,
            self_balancing=True,
            seed=seed,
        )
    if cfg.partitioner == "pathological":
        return PathologicalPartitioner(
            num_partitions=n,
            partition_by="label",
            num_classes_per_partition=cfg.classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    if cfg.partitioner == "shard":
        return ShardPartitioner(
            num_partitions=n,
            partition_by="label",
            num_shards_per_partition=cfg.shards_per_client,
            seed=seed,
        )
    size_partitioners: dict[str, type[Partitioner]] = {
        "linear": LinearPartitioner,
        "square": SquarePartitioner,
        "exponential": ExponentialPartitioner,
    }
    return size_partitioners[cfg.size_skew](num_partitions=n)  # type: ignore[call-arg]


def check_partition_id(cfg: DataConfig, partition_id: int) -> None:
    if isinstance(partition_id, bool) or not isinstance(partition_id, int | np.integer):
        raise DataError(
            f"partition_id must be an int in [0, {cfg.num_clients}), got {partition_id!r}"
        )
    if not 0 <= partition_id < cfg.num_clients:
        raise DataError(
            f"partition_id={partition_id} is out of range for data.num_clients={cfg.num_clients} "
            f"(valid: 0..{cfg.num_clients - 1}); give every node a partition-id below "
            "data.num_clients or raise data.num_clients"
        )


def _check_feasible(cfg: DataConfig, info: DatasetInfo, n_rows: int) -> None:
    """Reject impossible requests before the partitioners try (and retry) them."""
    k = cfg.num_clients
    after_proxy = (
        f" after the proxy carve-out (data.proxy_fraction={cfg.proxy_fraction})"
        if cfg.proxy_fraction
        else ""
    )
    if k > n_rows:
        raise DataError(
            f"data.num_clients={k} but {info.name} has only {n_rows} training examples"
            f"{after_proxy}; lower data.num_clients (or raise data.num_samples / lower "
            "data.proxy_fraction)"
        )
    if cfg.dataset == "synthetic":
        return
    if cfg.partitioner == "pathological" and cfg.classes_per_client > info.num_classes:
        raise DataError(
            f"data.classes_per_client={cfg.classes_per_client} but {info.name} has "
            f"{info.num_classes} classes; set data.classes_per_client <= {info.num_classes}"
        )
    if cfg.partitioner == "shard" and k * cfg.shards_per_client > n_rows:
        raise DataError(
            f"data.shards_per_client={cfg.shards_per_client} x data.num_clients={k} shards exceed "
            f"the {n_rows} training examples of {info.name}{after_proxy}; lower "
            "data.shards_per_client or data.num_clients"
        )
    if cfg.partitioner == "dirichlet" and k * cfg.min_partition_size > n_rows:
        raise DataError(
            f"data.min_partition_size={cfg.min_partition_size} x data.num_clients={k} exceeds the "
            f"{n_rows} training examples of {info.name}{after_proxy}; lower "
            "data.min_partition_size or data.num_clients"
        )


def _partition_failure(cfg: DataConfig, info: DatasetInfo, n_rows: int, err: Exception) -> str:
    where = f"{info.name} ({n_rows} training examples, data.num_clients={cfg.num_clients})"
    if cfg.dataset == "synthetic":
        return f"could not split synthetic data by device for {where}: {err}"
    fixes = {
        "iid": "lower data.num_clients",
        "dirichlet": (
            f"no Dirichlet(data.alpha={cfg.alpha}) draw in 10 tries gave every client "
            f"data.min_partition_size={cfg.min_partition_size} examples; lower "
            "data.min_partition_size, raise data.alpha, or lower data.num_clients"
        ),
        "pathological": (
            f"data.classes_per_client={cfg.classes_per_client} cannot be served to every client; "
            "lower data.classes_per_client or data.num_clients"
        ),
        "shard": "lower data.shards_per_client or data.num_clients",
        "size": f"data.size_skew={cfg.size_skew!r} leaves some client empty; lower "
        "data.num_clients or use a milder data.size_skew",
    }
    return (
        f"data.partitioner={cfg.partitioner!r} failed on {where}: {fixes[cfg.partitioner]} ({err})"
    )


def local_split(
    partition: Dataset, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a partition's local train and test splits (``datasets.train_test_split``)."""
    n = len(partition)
    if n < 2:
        return _rows(partition), np.empty(0, dtype=np.int64)
    try:
        split = partition.train_test_split(test_size=test_fraction, seed=seed)
    except ValueError:  # tiny partition where the fraction rounds train or test to zero
        n_test = min(max(1, math.ceil(test_fraction * n)), n - 1)
        split = partition.train_test_split(test_size=n_test, seed=seed)
    return _rows(split["train"]), _rows(split["test"])


def _rows(ds: Dataset) -> np.ndarray:
    return np.asarray(ds["row"], dtype=np.int64)


def _class_balanced_sample(
    y: np.ndarray, n: int, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """Sorted indices of ``n`` examples, as equal per class as availability allows.

    Classes too small for an equal share give everything they have; the rest is spread evenly
    over the remaining classes (the +1 remainders go to randomly chosen classes).
    """
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(num_classes)]
    available = np.array([len(rows) for rows in by_class])
    quota = np.zeros(num_classes, dtype=np.int64)
    remaining = min(n, int(available.sum()))
    while remaining > 0:
        open_classes = np.flatnonzero(quota < available)
        share = max(remaining // len(open_classes), 1)
        for c in rng.permutation(open_classes):
            take = min(share, int(available[c] - quota[c]), remaining)
            quota[c] += take
            remaining -= take
            if remaining == 0:
                break
    picked = [rows[:q] for rows, q in zip(by_class, quota, strict=True)]
    return np.sort(np.concatenate(picked)).astype(np.int64)
