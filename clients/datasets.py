"""Dataset sources: each dataset as a fixed train/test pair of numpy arrays.

* ``mnist1d`` -- generated with ``mnist1d.data.make_dataset`` (``args.seed`` fixed at 42, so
  the dataset never changes; ``args.num_samples`` from ``data.num_samples``, default 5000 ->
  4000 train / 1000 test). Generation takes seconds, so the arrays are cached on disk as
  ``mnist1d-<hash of its version and num_samples>.npz`` under ``$FEDGE_CACHE`` (default ``~/.cache/fedge``).
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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scenarios.config import DataConfig

if TYPE_CHECKING:  # Hugging Face datasets is imported by the hub loader only (~0.6 s)
    from datasets import Dataset

MNIST1D_DEFAULT_SAMPLES = 5000
MNIST1D_DATA_SEED = 42
SYNTHETIC_DIM = 60
SYNTHETIC_CLASSES = 10
SYNTHETIC_SAMPLES_PER_CLIENT = 100
CENTRAL_TEST_FRACTION = 0.2  # digits, synthetic, and hub datasets without a test split
FIXED_SPLIT_SEED = 0  # the dataset's own train/test split does not change with the run seed

_SEED_MODULUS = 2**32

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
class Source:
    """A dataset as fixed numpy arrays (``device`` only for synthetic)."""

    info: DatasetInfo
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    device: np.ndarray | None = None


# -- sources ------------------------------------------------------------------------------------
def norm_seed(seed: int) -> int:
    return int(seed) % _SEED_MODULUS


def source_key(cfg: DataConfig, seed: int) -> tuple[Any, ...]:
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
            norm_seed(seed),
        )
    files = json.dumps(cfg.hub_data_files, sort_keys=True)
    return ("hub", cfg.hub_path, files, cfg.hub_feature_key, cfg.hub_label_key)


@lru_cache(maxsize=8)
def load_source(key: tuple[Any, ...]) -> Source:
    kind = key[0]
    if kind == "mnist1d":
        return _mnist1d(key[1])
    if kind == "digits":
        return _digits()
    if kind == "synthetic":
        return _synthetic(*key[1:])
    return _hub(*key[1:])


def _mnist1d(num_samples: int) -> Source:
    # Keyed by the installed mnist1d version (read without importing it: `mnist1d.data` pulls in
    # scipy and matplotlib, ~0.75 s that every Ray actor and `fedge validate` would pay) and the
    # two arguments fedge sets; the generator's defaults and code only change with its version.
    recipe = {
        "mnist1d": installed_version("mnist1d"),
        "num_samples": num_samples,
        "seed": MNIST1D_DATA_SEED,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"mnist1d-{digest}.npz"
    arrays: dict[str, np.ndarray] | None = None
    if path.is_file():
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            arrays = None  # a corrupt or truncated cache file is regenerated below
    if arrays is None:
        from mnist1d.data import get_dataset_args, make_dataset

        print(  # seconds (tens of seconds for 100k+ samples) of silence otherwise
            f"fedge: generating mnist1d ({num_samples} samples) once; cached as {path}",
            file=sys.stderr,
            flush=True,
        )

        args = get_dataset_args()
        args.num_samples = num_samples
        args.seed = MNIST1D_DATA_SEED
        py_state, np_state = random.getstate(), np.random.get_state()
        try:  # make_dataset reseeds the global RNGs; leave the caller's streams untouched
            raw = make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        arrays = {k: np.asarray(raw[k]) for k in ("x", "y", "x_test", "y_test")}
        atomic_savez(path, arrays)
    return Source(
        info=DatasetInfo("mnist1d", (40,), 10),
        x_train=arrays["x"].astype(np.float32),
        y_train=arrays["y"].astype(np.int64),
        x_test=arrays["x_test"].astype(np.float32),
        y_test=arrays["y_test"].astype(np.int64),
    )


def installed_version(package: str) -> str:
    """A package's installed version, read from its metadata without importing it."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"


def cache_dir() -> Path:
    return Path(os.environ.get("FEDGE_CACHE") or Path.home() / ".cache" / "fedge").expanduser()


def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Best effort: a read-only cache folder only costs regeneration next time. Written to a
    temporary file and renamed, so concurrent writers (Ray actors) never expose a partial file."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


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


def _digits() -> Source:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_tr, y_tr, x_te, y_te = _fixed_split(x, y.astype(np.int64))
    return Source(DatasetInfo("digits", (1, 8, 8), 10), x_tr, y_tr, x_te, y_te)


def _synthetic(num_devices: int, total: int, alpha: float, beta: float, seed: int) -> Source:
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
    return Source(
        info=DatasetInfo("synthetic", (SYNTHETIC_DIM,), SYNTHETIC_CLASSES),
        x_train=np.concatenate(parts["x"]).astype(np.float32),
        y_train=np.concatenate(parts["y"]).astype(np.int64),
        x_test=np.concatenate(parts["xt"]).astype(np.float32),
        y_test=np.concatenate(parts["yt"]).astype(np.int64),
        device=np.concatenate(parts["d"]),
    )


def _hub(path: str, files_json: str, feature_key: str, label_key: str) -> Source:
    import datasets
    from datasets import DatasetDict

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
    return Source(info, x_train, y_train, x_test, y_test)


def _hub_features(ds: Dataset, key: str, path: str) -> np.ndarray:
    """Features as float32 ``(n, ...)``; images become ``(n, C, H, W)`` in [0, 1]."""
    from datasets import Image as HFImage

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
    from datasets import ClassLabel

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
