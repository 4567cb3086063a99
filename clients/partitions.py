"""Partitioning: the server's proxy carve-out, flwr-datasets partitioners over an index table,
and each client's local train/test split (see ``clients/data.py`` for the whole pipeline).

What a federation resolves to -- the proxy rows and every client's train/test rows, indices into
the source's train arrays -- is cached on disk as ``partitions-<hash>.npz`` under ``$FEDGE_CACHE``
(next to the mnist1d arrays). The hash covers the data config's JSON, the seed, the source's
labels (and synthetic device ids) and the installed flwr-datasets / datasets / numpy versions,
so a cached file is exactly what a fresh computation would give. A process that finds the file
never imports flwr-datasets or Hugging Face ``datasets`` (~1.7 s of imports: flwr-datasets'
package ``__init__`` pulls in seaborn and scipy.stats): about half of ``fedge validate`` and
~3 s of each Ray actor's cold start on a 2-core machine (docs/results/engine-speed.md). A corrupt file is recomputed and rewritten; a read-only cache folder
only costs the recomputation. Federations of more than :data:`EAGER_LIMIT` clients are not
cached: resolving every client up front costs ~1 ms per client in ``datasets`` overhead, which
a large pool sampled a few clients per round would pay for nothing; their clients are split on
first use, as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clients.datasets import (
    DataError,
    DatasetInfo,
    Source,
    atomic_savez,
    cache_dir,
    installed_version,
    load_source,
    norm_seed,
    source_key,
)
from scenarios.config import DataConfig

if TYPE_CHECKING:  # imported lazily: a cached federation needs neither
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner

_PROXY_STREAM = 1  # independent numpy streams derived from the run seed
EAGER_LIMIT = 2000  # federations up to this many clients are resolved at once and cached on disk
NOTE_FROM_CLIENTS = 100  # resolving this many clients takes seconds: say so on stderr
_CACHE_FORMAT = 1  # bump when the file's layout or the way rows are computed changes
_CACHE_KEYS = ("proxy_rows", "train_rows", "train_offsets", "test_rows", "test_offsets")


@dataclass
class Federation:
    """The partitioned train set: the proxy rows and each client's local train/test rows.

    Small federations hold every client's rows (``resolved``, from the disk cache or computed at
    once); large ones keep the flwr-datasets partitioner and split a client on first use.
    """

    source: Source
    proxy_rows: np.ndarray  # indices into source.x_train held by the server
    num_partitions: int
    test_fraction: float
    seed: int
    resolved: list[tuple[np.ndarray, np.ndarray]] | None = None
    partitioner: Partitioner | None = None
    _lazy: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def client_rows(self, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of client ``partition_id``'s local train and test splits."""
        if self.resolved is not None:
            return self.resolved[partition_id]
        if partition_id not in self._lazy:
            assert self.partitioner is not None
            rows = _rows(self.partitioner.load_partition(partition_id))
            self._lazy[partition_id] = local_split(rows, self.test_fraction, self.seed)
        return self._lazy[partition_id]

    def label_counts(self) -> np.ndarray:
        """``(num_partitions, num_classes)`` label counts of each partition (train + test)."""
        y, num_classes = self.source.y_train, self.source.info.num_classes
        counts = np.zeros((self.num_partitions, num_classes), dtype=np.int64)
        for pid in range(self.num_partitions):
            train, test = self.client_rows(pid)
            counts[pid] = np.bincount(y[train], minlength=num_classes)
            counts[pid] += np.bincount(y[test], minlength=num_classes)
        return counts


# -- partitioning -------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def federation(cfg_json: str, seed: int) -> Federation:
    """Proxy carve-out + partitions + local splits for one (config, seed); computed once per
    process, and (up to :data:`EAGER_LIMIT` clients) once per machine thanks to the disk cache."""
    cfg = DataConfig.model_validate_json(cfg_json)
    seed = norm_seed(seed)
    src = load_source(source_key(cfg, seed))
    eager = cfg.num_clients <= EAGER_LIMIT
    path = _cache_path(cfg_json, seed, src) if eager else None
    if path is not None:
        cached = _read_cache(path, cfg.num_clients, len(src.y_train))
        if cached is not None:
            proxy_rows, resolved = cached
            return Federation(
                src, proxy_rows, cfg.num_clients, cfg.local_test_fraction, seed, resolved
            )
    proxy_rows, partitioner = _partition(cfg, seed, src)
    fed = Federation(
        src, proxy_rows, cfg.num_clients, cfg.local_test_fraction, seed, partitioner=partitioner
    )
    if path is None:
        return fed
    if cfg.num_clients >= NOTE_FROM_CLIENTS:  # seconds of silence otherwise, on a first run
        print(
            f"fedge: splitting {cfg.dataset} into {cfg.num_clients} clients once; "
            f"cached in {path.parent}",
            file=sys.stderr,
            flush=True,
        )
    resolved = [fed.client_rows(pid) for pid in range(cfg.num_clients)]
    _write_cache(path, proxy_rows, resolved)
    return Federation(src, proxy_rows, cfg.num_clients, cfg.local_test_fraction, seed, resolved)


def _partition(cfg: DataConfig, seed: int, src: Source) -> tuple[np.ndarray, Partitioner]:
    """The proxy rows and the partitioner, its indices determined (flwr-datasets' work)."""
    from datasets import ClassLabel, Dataset, Features, Value

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
    return proxy_rows, partitioner


# -- the disk cache -----------------------------------------------------------------------------
def _cache_path(cfg_json: str, seed: int, src: Source) -> Path:
    """``partitions-<hash>.npz``: the hash covers everything the rows depend on."""
    labels = hashlib.sha256(np.ascontiguousarray(src.y_train, dtype=np.int64).tobytes())
    if src.device is not None:
        labels.update(b"device")
        labels.update(np.ascontiguousarray(src.device, dtype=np.int64).tobytes())
    recipe = {
        "format": _CACHE_FORMAT,
        "data": json.loads(cfg_json),
        "seed": seed,
        "labels": labels.hexdigest(),
        "versions": {
            "flwr-datasets": installed_version("flwr-datasets"),
            "datasets": installed_version("datasets"),
            "numpy": np.__version__,
        },
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"partitions-{digest}.npz"


def _write_cache(
    path: Path, proxy_rows: np.ndarray, resolved: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    arrays = {"proxy_rows": proxy_rows.astype(np.int64)}
    for i, name in enumerate(("train", "test")):
        parts = [pair[i].astype(np.int64) for pair in resolved]
        arrays[f"{name}_rows"] = np.concatenate(parts) if parts else np.empty(0, np.int64)
        arrays[f"{name}_offsets"] = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
    atomic_savez(path, arrays)  # best effort: a read-only folder only costs recomputation


def _read_cache(
    path: Path, num_clients: int, n_train: int
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]] | None:
    """The cached rows, or ``None`` when the file is missing, unreadable or inconsistent (a
    truncated or corrupt file is recomputed and overwritten, never trusted)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: np.asarray(f[k]) for k in _CACHE_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    for name, arr in arrays.items():
        if arr.ndim != 1 or arr.dtype != np.int64:
            return None
        if name.endswith("_rows") and arr.size and (arr.min() < 0 or arr.max() >= n_train):
            return None
    split = []
    for name in ("train", "test"):
        rows, offsets = arrays[f"{name}_rows"], arrays[f"{name}_offsets"]
        if (
            len(offsets) != num_clients + 1
            or offsets[0] != 0
            or offsets[-1] != len(rows)
            or (np.diff(offsets) < 0).any()
        ):
            return None
        split.append(np.split(rows, offsets[1:-1]))
    return arrays["proxy_rows"], list(zip(split[0], split[1], strict=True))


def _make_partitioner(cfg: DataConfig, seed: int) -> Partitioner:
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        ExponentialPartitioner,
        IidPartitioner,
        LinearPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
        SquarePartitioner,
    )

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


def local_split(rows: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A partition's rows split into local train and test rows (``datasets.train_test_split``)."""
    train_pos, test_pos = _split_positions(len(rows), test_fraction, seed)
    return rows[train_pos], rows[test_pos]


@lru_cache(maxsize=4096)
def _split_positions(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the local train and test rows in a partition of ``n`` rows.

    ``Dataset.train_test_split`` (unstratified, in memory) draws ``default_rng(seed)
    .permutation(n)``: the split depends only on the partition's length, so it is computed once
    per length on a table of positions (partitions of equal size share it; tests/test_data.py
    checks it against splitting the partition itself)."""
    if n < 2:
        return np.arange(n, dtype=np.int64), np.empty(0, dtype=np.int64)
    from datasets import Dataset

    table = Dataset.from_dict({"row": np.arange(n, dtype=np.int64)})
    try:
        split = table.train_test_split(test_size=test_fraction, seed=seed)
    except ValueError:  # tiny partition where the fraction rounds train or test to zero
        n_test = min(max(1, math.ceil(test_fraction * n)), n - 1)
        split = table.train_test_split(test_size=n_test, seed=seed)
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
