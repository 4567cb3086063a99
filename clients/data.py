"""Client data: load a dataset, carve out the server's proxy set, partition it with flwr-datasets.

The pipeline is one straight line, and every step is a pure function of ``(DataConfig, seed)``:

1. **Source arrays** (``clients/datasets.py``): a fixed train/test pair of numpy arrays per dataset.

   ``mnist1d`` (generated, cached on disk), ``digits`` (scikit-learn), ``synthetic`` (LEAF
   Synthetic(alpha, beta), whose natural per-device split is the partition) and ``hub`` (Hugging
   Face ``datasets``, offline from local files); each is described there.

2. **Proxy carve-out** (``data.proxy_fraction > 0``): before partitioning, a class-balanced,
   seeded sample of ``round(proxy_fraction * n_train)`` (at least one) train examples is removed
   for the server (FedLAW); no client ever sees those rows.

3. **Partitioning** (``clients/partitions.py``) with a ``flwr_datasets.partitioner`` over an index table
   ``Dataset.from_dict({"row", "label"[, "device"]})``: the partitioners only look at labels (or
   device ids), so the features stay in numpy and each partition's ``row`` column indexes them.

   ========== ================================================================================
   iid        ``IidPartitioner`` on the table shuffled with the seed (it splits contiguously)
   dirichlet  ``DirichletPartitioner(alpha, min_partition_size, self_balancing=True, seed)``
   pathological ``PathologicalPartitioner(classes_per_client, "first-deterministic", seed)``
   shard      ``ShardPartitioner(shards_per_client, seed)``; it sorts by label and uses
              ``num_clients * shards_per_client`` equal shards, so up to ``num_shards - 1``
              leftover rows go to nobody
   size       ``Linear``/``Square``/``ExponentialPartitioner`` (``data.size_skew``) on the
              table shuffled with the seed (these partitioners take no seed)
   ========== ================================================================================

4. **Local split**: each partition is split with
   ``Dataset.train_test_split(test_size=data.local_test_fraction, seed=seed)`` into the client's
   training data and its local test data (personalized accuracy). A client with fewer than two
   examples keeps them all for training.

5. **Concept shift** (``data.concept_shift``, ``clients/concept_shift.py``): each client's train
   and local test rows are transformed by its planted group's transform (label permutation,
   rotation or feature shift). Applied after partitioning, so the partitions and their disk
   cache are those of the unshifted federation; the central test set and the proxy stay as
   they are (:func:`load_group_tests` gives the central test set as each group sees it).

Both the source arrays and the partitioned object are cached in memory (``functools.lru_cache``
keyed by the config's JSON and the seed), so loading all clients of a federation in one process
partitions once; every client's rows are also cached on disk (``clients/partitions.py``), so a
later process -- a Ray actor, ``fedge validate``, the next run -- reads them without importing
flwr-datasets or Hugging Face ``datasets`` at all. Seeds are used modulo 2**32 (what numpy and ``datasets`` accept). Every problem
with the data section raises :class:`DataError`, whose message names the key and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from clients.concept_shift import (
    CENTRAL_TEST_ROWS,
    LOCAL_TEST_ROWS,
    TRAIN_ROWS,
    apply_shift,
    group_of,
    partition_json,
)
from clients.datasets import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_DIM,
    DataError,
    DatasetInfo,
    load_source,
    source_key,
)
from clients.partitions import check_partition_id, federation
from scenarios.config import DataConfig

__all__ = [
    "ClientData",
    "DataError",
    "DatasetInfo",
    "dataset_info",
    "load_central_test",
    "load_client_data",
    "load_group_tests",
    "load_proxy",
    "partition_label_counts",
]


@dataclass(frozen=True)
class ClientData:
    """One client's partition: its training data and its local test split."""

    partition_id: int
    x_train: np.ndarray  # float32, (n, *input_shape)
    y_train: np.ndarray  # int64, (n,)
    x_test: np.ndarray
    y_test: np.ndarray


# -- public API ---------------------------------------------------------------------------------
def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Name, per-sample input shape and number of classes of ``cfg.dataset``."""
    if cfg.dataset == "mnist1d":
        return DatasetInfo("mnist1d", (40,), 10)
    if cfg.dataset == "digits":
        return DatasetInfo("digits", (1, 8, 8), 10)
    if cfg.dataset == "synthetic":
        return DatasetInfo("synthetic", (SYNTHETIC_DIM,), SYNTHETIC_CLASSES)
    return load_source(source_key(cfg, 0)).info


def load_client_data(cfg: DataConfig, seed: int, partition_id: int) -> ClientData:
    """Client ``partition_id``'s training data and local test split (see the module docstring).

    Cached per (cfg, seed, partition id): a client called every round does the split once. The arrays
    are shared between calls, so trainers must not modify them in place.
    """
    check_partition_id(cfg, partition_id)
    return _client_data(_config_json(cfg), seed, partition_id)


# id(config) -> (config, its JSON): a run asks with the same (frozen) DataConfig object for every
# client update, and dumping it costs more than the cached lookup it keys (~10 µs).
_CONFIG_JSON: dict[int, tuple[DataConfig, str]] = {}


def _config_json(cfg: DataConfig) -> str:
    held = _CONFIG_JSON.get(id(cfg))
    if held is None or held[0] is not cfg:  # the entry holds cfg: its id is not reused meanwhile
        if len(_CONFIG_JSON) >= 16:
            _CONFIG_JSON.clear()
        held = _CONFIG_JSON[id(cfg)] = (cfg, cfg.model_dump_json())
    return held[1]


@lru_cache(maxsize=1024)
def _client_data(cfg_json: str, seed: int, partition_id: int) -> ClientData:
    cfg = DataConfig.model_validate_json(cfg_json)
    # the shift is applied to the rows after partitioning: the partitions are the unshifted ones
    fed = federation(partition_json(cfg), seed)
    train_rows, test_rows = fed.client_rows(partition_id)
    src = fed.source
    x_train, y_train = src.x_train[train_rows], src.y_train[train_rows]
    x_test, y_test = src.x_train[test_rows], src.y_train[test_rows]
    if cfg.concept_shift != "none":
        group = group_of(cfg, partition_id)
        x_train, y_train = _shift(cfg, seed, group, x_train, y_train, (TRAIN_ROWS, partition_id))
        x_test, y_test = _shift(cfg, seed, group, x_test, y_test, (LOCAL_TEST_ROWS, partition_id))
    return ClientData(
        partition_id=partition_id, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test
    )


def _shift(
    cfg: DataConfig,
    seed: int,
    group: int,
    x: np.ndarray,
    y: np.ndarray,
    rows_id: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    src = load_source(source_key(cfg, seed))
    return apply_shift(
        cfg,
        seed,
        group,
        x,
        y,
        num_classes=src.info.num_classes,
        feature_std=_feature_std(source_key(cfg, seed)),
        rows_id=rows_id,
    )


@lru_cache(maxsize=8)
def _feature_std(key: tuple) -> float:
    """The std of the source's train inputs: the unit of feature-shift offsets and noise."""
    return float(load_source(key).x_train.std())


def load_central_test(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out global test set ``(x, y)``; disjoint from every client's data and the proxy."""
    src = load_source(source_key(cfg, seed))
    return src.x_test.copy(), src.y_test.copy()


def load_group_tests(cfg: DataConfig, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The central test set as each concept-shift group sees it (``data.num_groups`` pairs
    ``(x, y)``; group 0's is the central test set itself)."""
    x, y = load_central_test(cfg, seed)
    return [
        _shift(cfg, seed, group, x, y, (CENTRAL_TEST_ROWS, 0)) for group in range(cfg.num_groups)
    ]


def load_proxy(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The server's class-balanced proxy set ``(x, y)``, carved from train before partitioning."""
    if cfg.proxy_fraction <= 0:
        raise DataError(
            "the server proxy set was requested but data.proxy_fraction=0; set "
            "data.proxy_fraction (e.g. 0.05) to carve a class-balanced proxy set out of train"
        )
    fed = federation(partition_json(cfg), seed)  # the server's proxy is never shifted
    rows = fed.proxy_rows
    return fed.source.x_train[rows], fed.source.y_train[rows]


def partition_label_counts(cfg: DataConfig, seed: int) -> np.ndarray:
    """``(num_clients, num_classes)`` label counts of each client's partition (train + test),
    before any concept shift."""
    return federation(partition_json(cfg), seed).label_counts()
