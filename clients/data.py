"""Client data: load a dataset, carve out the server's proxy set, partition it with flwr-datasets.

The pipeline is one straight line, and every step is a pure function of ``(DataConfig, seed)``:

1. **Source arrays** (``_source``): a fixed train/test pair of numpy arrays per dataset.

   * ``mnist1d`` -- generated with ``mnist1d.data.make_dataset`` (``args.seed`` fixed at 42, so
     the dataset never changes; ``args.num_samples`` from ``data.num_samples``, default 5000 ->
     4000 train / 1000 test). Generation takes seconds, so the arrays are cached on disk as
     ``mnist1d-<hash of args>.npz`` under ``$FEDGE_CACHE`` (default ``~/.cache/fedge``).
   * ``digits`` -- scikit-learn's 8x8 digits, ``x / 16`` shaped ``(1, 8, 8)``, a fixed stratified
     80/20 split (``random_state=0``).
   * ``synthetic`` -- LEAF / FedProx Synthetic(alpha, beta) (Li et al., 2020): for device ``k``,
     ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)``, ``W_k ~ N(u_k, 1)`` (60x10), ``b_k ~ N(u_k, 1)``,
     ``v_k ~ N(B_k, 1)``, ``x ~ N(v_k, diag(j^-1.2))`` and ``y = argmax softmax(W_k^T x + b_k)``
     (alpha/beta are used as standard deviations, as in the LEAF generator). ``data.num_clients``
     devices get power-law (log-normal) sizes summing to ``data.num_samples`` (default
     ``100 * num_clients``); 20% of every device's samples form the central test set. The
     devices are drawn from the run seed, and **the natural per-device split is the partition**:
     ``data.partitioner`` (and its knobs) is ignored and ``NaturalIdPartitioner`` on the
     ``device`` column is used instead.
   * ``hub`` -- ``datasets.load_dataset(data.hub_path, data_files=data.hub_data_files)``, e.g.
     ``hub_path="parquet"`` with local files (offline), or a hub name when online. Features
     come from ``data.hub_feature_key`` (``Image`` features and ``uint8`` arrays -> float32 in
     [0, 1] shaped ``(C, H, W)``; other numeric lists -> float32 as they are), labels from
     ``data.hub_label_key``. Clients use the ``train`` split and the ``test`` split is the central
     test set; without one, a fixed stratified 20% of ``train`` (``random_state=0``) is held out.

2. **Proxy carve-out** (``data.proxy_fraction > 0``): before partitioning, a class-balanced,
   seeded sample of ``round(proxy_fraction * n_train)`` (at least one) train examples is removed
   for the server (FedLAW); no client ever sees those rows.

3. **Partitioning** with a ``flwr_datasets.partitioner`` over an index table
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

Both the source arrays and the partitioned object are cached in memory (``functools.lru_cache``
keyed by the config's JSON and the seed), so loading all clients of a federation in one process
partitions once. Seeds are used modulo 2**32 (what numpy and ``datasets`` accept). Every problem
with the data section raises :class:`DataError`, whose message names the key and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as HFImage
from flwr_datasets.metrics import compute_counts
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

from scenarios.config import DataConfig

__all__ = [
    "ClientData",
    "DataError",
    "DatasetInfo",
    "dataset_info",
    "load_central_test",
    "load_client_data",
    "load_proxy",
    "partition_label_counts",
]

MNIST1D_DEFAULT_SAMPLES = 5000
MNIST1D_DATA_SEED = 42
SYNTHETIC_DIM = 60
SYNTHETIC_CLASSES = 10
SYNTHETIC_SAMPLES_PER_CLIENT = 100
CENTRAL_TEST_FRACTION = 0.2  # digits, synthetic, and hub datasets without a test split
FIXED_SPLIT_SEED = 0  # the dataset's own train/test split does not change with the run seed

_SEED_MODULUS = 2**32
_PROXY_STREAM = 1  # independent numpy streams derived from the run seed
_SYNTHETIC_STREAM = 2


class DataError(ValueError):
    """The data section cannot be served; the message names the key and how to fix it."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset."""

    name: str
    input_shape: tuple[int, ...]  # per sample, e.g. (40,) or (1, 8, 8)
    num_classes: int


@dataclass(frozen=True)
class ClientData:
    """One client's partition: its training data and its local test split."""

    partition_id: int
    x_train: np.ndarray  # float32, (n, *input_shape)
    y_train: np.ndarray  # int64, (n,)
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class _Source:
    """A dataset as fixed numpy arrays (``device`` only for synthetic)."""

    info: DatasetInfo
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    device: np.ndarray | None = None


@dataclass(frozen=True)
class _Federation:
    """The partitioned train set: the partitioner (dataset assigned, indices determined)."""

    source: _Source
    partitioner: Partitioner
    proxy_rows: np.ndarray  # indices into source.x_train held by the server


# -- public API ---------------------------------------------------------------------------------
def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Name, per-sample input shape and number of classes of ``cfg.dataset``."""
    if cfg.dataset == "mnist1d":
        return DatasetInfo("mnist1d", (40,), 10)
    if cfg.dataset == "digits":
        return DatasetInfo("digits", (1, 8, 8), 10)
    if cfg.dataset == "synthetic":
        return DatasetInfo("synthetic", (SYNTHETIC_DIM,), SYNTHETIC_CLASSES)
    return _source(_source_key(cfg, 0)).info


def load_client_data(cfg: DataConfig, seed: int, partition_id: int) -> ClientData:
    """Client ``partition_id``'s training data and local test split (see the module docstring).

    Cached per (cfg, seed, partition id): a client called every round does the split once. The arrays
    are shared between calls, so trainers must not modify them in place.
    """
    _check_partition_id(cfg, partition_id)
    return _client_data(cfg.model_dump_json(), seed, partition_id)


@lru_cache(maxsize=1024)
def _client_data(cfg_json: str, seed: int, partition_id: int) -> ClientData:
    cfg = DataConfig.model_validate_json(cfg_json)
    fed = _federation(cfg_json, seed)
    train_rows, test_rows = _local_split(
        fed.partitioner.load_partition(partition_id), cfg.local_test_fraction, _norm_seed(seed)
    )
    src = fed.source
    return ClientData(
        partition_id=partition_id,
        x_train=src.x_train[train_rows],
        y_train=src.y_train[train_rows],
        x_test=src.x_train[test_rows],
        y_test=src.y_train[test_rows],
    )


def load_central_test(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out global test set ``(x, y)``; disjoint from every client's data and the proxy."""
    src = _source(_source_key(cfg, seed))
    return src.x_test.copy(), src.y_test.copy()


def load_proxy(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The server's class-balanced proxy set ``(x, y)``, carved from train before partitioning."""
    if cfg.proxy_fraction <= 0:
        raise DataError(
            "the server proxy set was requested but data.proxy_fraction=0; set "
            "data.proxy_fraction (e.g. 0.05) to carve a class-balanced proxy set out of train"
        )
    fed = _federation(cfg.model_dump_json(), seed)
    rows = fed.proxy_rows
    return fed.source.x_train[rows], fed.source.y_train[rows]


def partition_label_counts(cfg: DataConfig, seed: int) -> np.ndarray:
    """``(num_clients, num_classes)`` label counts of each client's partition (train + test)."""
    fed = _federation(cfg.model_dump_json(), seed)
    counts = compute_counts(fed.partitioner, column_name="label")
    classes = range(fed.source.info.num_classes)
    counts = counts.reindex(columns=list(classes), fill_value=0)
    return counts.to_numpy(dtype=np.int64)


# -- partitioning -------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _federation(cfg_json: str, seed: int) -> _Federation:
    """Proxy carve-out + partitioner for one (config, seed); computed once per process."""
    cfg = DataConfig.model_validate_json(cfg_json)
    seed = _norm_seed(seed)
    src = _source(_source_key(cfg, seed))
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
    return _Federation(source=src, partitioner=partitioner, proxy_rows=proxy_rows)


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


def _check_partition_id(cfg: DataConfig, partition_id: int) -> None:
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


def _local_split(
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


# -- sources ------------------------------------------------------------------------------------
def _norm_seed(seed: int) -> int:
    return int(seed) % _SEED_MODULUS


def _source_key(cfg: DataConfig, seed: int) -> tuple[Any, ...]:
    """Only the config fields that change the source arrays (so sweeps share them)."""
    if cfg.dataset == "mnist1d":
        return ("mnist1d", cfg.num_samples or MNIST1D_DEFAULT_SAMPLES)
    if cfg.dataset == "digits":
        return ("digits",)
    if cfg.dataset == "synthetic":
        total = cfg.num_samples or SYNTHETIC_SAMPLES_PER_CLIENT * cfg.num_clients
        return (
            "synthetic",
            cfg.num_clients,
            total,
            cfg.synthetic_alpha,
            cfg.synthetic_beta,
            _norm_seed(seed),
        )
    files = json.dumps(cfg.hub_data_files, sort_keys=True)
    return ("hub", cfg.hub_path, files, cfg.hub_feature_key, cfg.hub_label_key)


@lru_cache(maxsize=8)
def _source(key: tuple[Any, ...]) -> _Source:
    kind = key[0]
    if kind == "mnist1d":
        return _mnist1d(key[1])
    if kind == "digits":
        return _digits()
    if kind == "synthetic":
        return _synthetic(*key[1:])
    return _hub(*key[1:])


def _mnist1d(num_samples: int) -> _Source:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = MNIST1D_DATA_SEED
    recipe = {k: v for k, v in vars(args).items() if k != "url"}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    path = _cache_dir() / f"mnist1d-{digest}.npz"
    arrays: dict[str, np.ndarray] | None = None
    if path.is_file():
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            arrays = None  # a corrupt cache file is regenerated below
    if arrays is None:
        py_state, np_state = random.getstate(), np.random.get_state()
        try:  # make_dataset reseeds the global RNGs; leave the caller's streams untouched
            raw = make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        arrays = {k: np.asarray(raw[k]) for k in ("x", "y", "x_test", "y_test")}
        _atomic_savez(path, arrays)
    return _Source(
        info=DatasetInfo("mnist1d", (40,), 10),
        x_train=arrays["x"].astype(np.float32),
        y_train=arrays["y"].astype(np.int64),
        x_test=arrays["x_test"].astype(np.float32),
        y_test=arrays["y_test"].astype(np.int64),
    )


def _cache_dir() -> Path:
    return Path(os.environ.get("FEDGE_CACHE") or Path.home() / ".cache" / "fedge").expanduser()


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Best effort: a read-only cache folder only costs regeneration next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass


def _fixed_split(
    x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The dataset's own 80/20 train/test split: stratified when every class allows it."""
    from sklearn.model_selection import train_test_split

    stratify = y if np.bincount(y).min(initial=0) >= 2 and len(np.unique(y)) > 1 else None
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=CENTRAL_TEST_FRACTION, stratify=stratify, random_state=FIXED_SPLIT_SEED
    )
    return x_tr, y_tr, x_te, y_te


def _digits() -> _Source:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_tr, y_tr, x_te, y_te = _fixed_split(x, y.astype(np.int64))
    return _Source(DatasetInfo("digits", (1, 8, 8), 10), x_tr, y_tr, x_te, y_te)


def _synthetic(num_devices: int, total: int, alpha: float, beta: float, seed: int) -> _Source:
    """LEAF Synthetic(alpha, beta): one logistic-regression task per device, pooled."""
    if total < 2 * num_devices:
        raise DataError(
            f"data.num_samples={total} is too small for data.num_clients={num_devices} synthetic "
            f"devices (each needs at least 2 samples); raise data.num_samples to "
            f">= {2 * num_devices}"
        )
    rng = np.random.default_rng([seed, _SYNTHETIC_STREAM])
    # Power-law sizes as in LEAF (log-normal(4, 2)) on top of a floor, summing to `total`.
    floor = max(2, total // (4 * num_devices))
    weights = rng.lognormal(4.0, 2.0, num_devices)
    sizes = floor + np.floor(weights / weights.sum() * (total - floor * num_devices)).astype(
        np.int64
    )
    sizes[np.argmax(weights)] += total - int(sizes.sum())
    std_x = np.power(np.arange(1, SYNTHETIC_DIM + 1, dtype=np.float64), -1.2) ** 0.5
    u = rng.normal(0.0, alpha, num_devices)  # model heterogeneity
    big_b = rng.normal(0.0, beta, num_devices)  # data heterogeneity
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("x", "y", "d", "xt", "yt")}
    for k in range(num_devices):
        w = rng.normal(u[k], 1.0, (SYNTHETIC_DIM, SYNTHETIC_CLASSES))
        b = rng.normal(u[k], 1.0, SYNTHETIC_CLASSES)
        v = rng.normal(big_b[k], 1.0, SYNTHETIC_DIM)
        x = v + rng.standard_normal((int(sizes[k]), SYNTHETIC_DIM)) * std_x
        y = np.argmax(x @ w + b, axis=1)  # argmax of softmax == argmax of logits
        n_test = min(max(1, round(CENTRAL_TEST_FRACTION * sizes[k])), int(sizes[k]) - 1)
        n_train = int(sizes[k]) - n_test
        parts["x"].append(x[:n_train])
        parts["y"].append(y[:n_train])
        parts["d"].append(np.full(n_train, k, dtype=np.int64))
        parts["xt"].append(x[n_train:])
        parts["yt"].append(y[n_train:])
    return _Source(
        info=DatasetInfo("synthetic", (SYNTHETIC_DIM,), SYNTHETIC_CLASSES),
        x_train=np.concatenate(parts["x"]).astype(np.float32),
        y_train=np.concatenate(parts["y"]).astype(np.int64),
        x_test=np.concatenate(parts["xt"]).astype(np.float32),
        y_test=np.concatenate(parts["yt"]).astype(np.int64),
        device=np.concatenate(parts["d"]),
    )


def _hub(path: str, files_json: str, feature_key: str, label_key: str) -> _Source:
    import datasets

    data_files = json.loads(files_json)
    try:
        loaded = datasets.load_dataset(path, data_files=data_files)
    except Exception as err:  # any loader failure: missing file, offline, bad format, ...
        raise DataError(
            f"could not load data.hub_path={path!r} with data.hub_data_files={data_files!r}: "
            f"{type(err).__name__}: {err}. Fix: point data.hub_data_files at local files, e.g. "
            "hub_path='parquet' with hub_data_files={train='train.parquet', test='test.parquet'}, "
            "or go online (unset HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) to download a hub dataset"
        ) from None
    if not isinstance(loaded, DatasetDict) or "train" not in loaded:
        splits = list(loaded) if isinstance(loaded, DatasetDict) else []
        raise DataError(
            f"data.hub_path={path!r} has no 'train' split (splits: {splits}); name the training "
            "files under the 'train' key of data.hub_data_files"
        )
    train, test = loaded["train"], loaded.get("test")
    for split in (train, test):
        for key_name, column in (("hub_feature_key", feature_key), ("hub_label_key", label_key)):
            if split is not None and column not in split.column_names:
                raise DataError(
                    f"data.{key_name}={column!r} is not a column of {path!r} ({split.split} "
                    f"split); set data.{key_name} to one of {split.column_names}"
                )
    x_train = _hub_features(train, feature_key, path)
    if test is not None:
        x_test = _hub_features(test, feature_key, path)
        if x_test.shape[1:] != x_train.shape[1:]:
            raise DataError(
                f"{path!r}: train features have shape {x_train.shape[1:]} but test features "
                f"{x_test.shape[1:]}; the splits in data.hub_data_files must match"
            )
    y_train, y_test, num_classes = _hub_labels(train, test, label_key, path)
    if test is None:
        x_train, y_train, x_test, y_test = _fixed_split(x_train, y_train)
    info = DatasetInfo(f"hub:{path}", tuple(int(d) for d in x_train.shape[1:]), num_classes)
    return _Source(info, x_train, y_train, x_test, y_test)


def _hub_features(ds: Dataset, key: str, path: str) -> np.ndarray:
    """Features as float32 ``(n, ...)``; images become ``(n, C, H, W)`` in [0, 1]."""
    feature = ds.features[key]
    try:
        if isinstance(feature, HFImage):
            x = np.stack([np.asarray(img) for img in ds[key]])
            is_image = True
        else:
            x = np.asarray(ds.with_format("numpy")[key])
            is_image = x.dtype == np.uint8
    except ValueError as err:  # ragged rows
        raise DataError(
            f"data.hub_feature_key={key!r} of {path!r} does not give equally shaped samples "
            f"({err}); resize the data to one shape first"
        ) from None
    if x.dtype == object or not np.issubdtype(x.dtype, np.number):
        raise DataError(
            f"data.hub_feature_key={key!r} of {path!r} is not numeric (dtype {x.dtype}); "
            "point it at an image or numeric-list column"
        )
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    x = x.astype(np.float32) / np.float32(scale)
    if x.ndim == 1:
        return x[:, None]
    if is_image or x.ndim >= 3:
        if x.ndim == 3:  # (n, H, W) grayscale
            return x[:, None]
        if x.ndim == 4 and x.shape[-1] <= 4 < x.shape[1]:  # (n, H, W, C) -> (n, C, H, W)
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def _hub_labels(
    train: Dataset, test: Dataset | None, key: str, path: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer labels 0..C-1 for train and test, and C."""
    feature = train.features[key]
    y_tr = np.asarray(train[key])
    y_te = np.asarray(test[key]) if test is not None else np.empty(0, dtype=y_tr.dtype)
    if isinstance(feature, ClassLabel):
        num_classes = feature.num_classes
    elif np.issubdtype(y_tr.dtype, np.integer):
        both = np.concatenate([y_tr, y_te])
        if both.size and both.min() < 0:
            raise DataError(
                f"data.hub_label_key={key!r} of {path!r} has negative labels; labels must be 0..C-1"
            )
        num_classes = int(both.max()) + 1 if both.size else 0
    elif y_tr.dtype.kind in "US" or y_tr.dtype == object:
        names = sorted(set(y_tr.tolist()) | set(y_te.tolist()))
        index = {name: i for i, name in enumerate(names)}
        y_tr = np.array([index[v] for v in y_tr.tolist()], dtype=np.int64)
        y_te = np.array([index[v] for v in y_te.tolist()], dtype=np.int64)
        num_classes = len(names)
    else:
        raise DataError(
            f"data.hub_label_key={key!r} of {path!r} is not a class label (dtype {y_tr.dtype}); "
            "point it at an integer, string or ClassLabel column"
        )
    if num_classes < 2:
        raise DataError(f"data.hub_label_key={key!r} of {path!r} has fewer than 2 classes")
    return y_tr.astype(np.int64), y_te.astype(np.int64), num_classes
