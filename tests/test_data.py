"""clients/data.py: sources, proxy carve-out, flwr-datasets partitioning, local splits, errors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients import data as D
from clients import datasets, partitions
from clients.data import ClientData, DataError
from scenarios.config import DataConfig


@pytest.fixture(scope="module", autouse=True)
def _offline_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Offline HF, throw-away HF and fedge caches for the whole module."""
    root = tmp_path_factory.mktemp("data-caches")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(root / "hf"))
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf" / "datasets"))
        mp.setenv("FEDGE_CACHE", str(root / "fedge"))
        yield


def cfg_of(**kwargs: Any) -> DataConfig:
    return DataConfig(**kwargs)


def all_clients(cfg: DataConfig, seed: int = 0) -> list[ClientData]:
    return [D.load_client_data(cfg, seed, i) for i in range(cfg.num_clients)]


def row_keys(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """One hashable key per example (features and label), for multiset comparisons."""
    flat = np.ascontiguousarray(x.reshape(len(x), -1))
    return [
        row.tobytes() + int(label).to_bytes(8, "little") for row, label in zip(flat, y, strict=True)
    ]


def train_pool(cfg: DataConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The full train set the clients and the proxy are carved from (module internals)."""
    src = datasets.load_source(datasets.source_key(cfg, seed))
    return src.x_train, src.y_train


def client_keys(clients: list[ClientData]) -> Counter[bytes]:
    keys: Counter[bytes] = Counter()
    for c in clients:
        keys.update(row_keys(c.x_train, c.y_train))
        keys.update(row_keys(c.x_test, c.y_test))
    return keys


def mean_label_entropy(counts: np.ndarray) -> float:
    p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return float(h.mean())


# -- every dataset x partitioner loads and covers its train set exactly once -------------------
CASES = [
    dict(dataset="mnist1d", partitioner="iid"),
    dict(dataset="mnist1d", partitioner="dirichlet", alpha=0.3),
    dict(dataset="mnist1d", partitioner="pathological", classes_per_client=3),
    dict(dataset="mnist1d", partitioner="size", size_skew="linear"),
    dict(dataset="mnist1d", partitioner="size", size_skew="square"),
    dict(dataset="mnist1d", partitioner="size", size_skew="exponential", num_clients=5),
    dict(dataset="mnist1d", partitioner="dirichlet", proxy_fraction=0.1, num_samples=1000),
    dict(dataset="digits", partitioner="iid"),
    dict(dataset="digits", partitioner="dirichlet", alpha=0.5, proxy_fraction=0.05),
    dict(dataset="digits", partitioner="pathological", classes_per_client=2),
    dict(dataset="synthetic"),
    dict(dataset="synthetic", num_clients=20, proxy_fraction=0.1),
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_partitions_are_disjoint_and_cover_train(kwargs: dict[str, Any]) -> None:
    cfg = cfg_of(**kwargs)
    info = D.dataset_info(cfg)
    clients = all_clients(cfg)
    for i, c in enumerate(clients):
        assert c.partition_id == i
        assert c.x_train.dtype == np.float32 and c.x_test.dtype == np.float32
        assert c.y_train.dtype == np.int64 and c.y_test.dtype == np.int64
        assert c.x_train.shape[1:] == info.input_shape == c.x_test.shape[1:]
        assert len(c.x_train) == len(c.y_train) > 0
        assert len(c.x_test) == len(c.y_test)
        assert c.y_train.min(initial=0) >= 0 and c.y_train.max(initial=0) < info.num_classes
    used = client_keys(clients)
    if cfg.proxy_fraction > 0:
        used.update(row_keys(*D.load_proxy(cfg, 0)))
    assert used == Counter(row_keys(*train_pool(cfg)))  # every train row exactly once


def test_shard_is_disjoint_and_drops_less_than_one_shard_per_shard() -> None:
    cfg = cfg_of(dataset="mnist1d", partitioner="shard", num_clients=30, shards_per_client=2)
    used = client_keys(all_clients(cfg))
    pool = Counter(row_keys(*train_pool(cfg)))
    assert not used - pool  # nothing invented, nothing duplicated
    dropped = (pool - used).total()
    assert 0 <= dropped < cfg.num_clients * cfg.shards_per_client
    counts = D.partition_label_counts(cfg, 0)
    # shards are runs of the label-sorted data; one may straddle a label boundary
    assert ((counts > 0).sum(axis=1) <= 2 * cfg.shards_per_client).all()
    assert np.median((counts > 0).sum(axis=1)) <= cfg.shards_per_client


def test_label_counts_match_clients() -> None:
    cfg = cfg_of(dataset="digits", partitioner="dirichlet", alpha=0.3, num_clients=8)
    counts = D.partition_label_counts(cfg, 3)
    assert counts.shape == (8, 10) and counts.dtype == np.int64
    for i, c in enumerate(all_clients(cfg, 3)):
        both = np.concatenate([c.y_train, c.y_test])
        np.testing.assert_array_equal(counts[i], np.bincount(both, minlength=10))


# -- determinism ---------------------------------------------------------------------------------
def test_same_config_and_seed_give_identical_arrays() -> None:
    cfg = cfg_of(partitioner="dirichlet", alpha=0.5, num_clients=10, proxy_fraction=0.1)
    first = [D.load_client_data(cfg, 7, i) for i in (0, 4, 9)]
    proxy = D.load_proxy(cfg, 7)
    partitions.federation.cache_clear()  # recompute from scratch, not from the in-memory caches
    D._client_data.cache_clear()
    again = [D.load_client_data(cfg, 7, i) for i in (0, 4, 9)]
    for a, b in zip(first, again, strict=True):
        for field in ("x_train", "y_train", "x_test", "y_test"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    for a, b in zip(proxy, D.load_proxy(cfg, 7), strict=True):
        np.testing.assert_array_equal(a, b)


def test_different_seed_gives_different_dirichlet_split() -> None:
    cfg = cfg_of(partitioner="dirichlet", alpha=0.5, num_clients=10)
    assert not np.array_equal(D.partition_label_counts(cfg, 0), D.partition_label_counts(cfg, 1))


def test_iid_depends_on_seed_and_is_balanced() -> None:
    cfg = cfg_of(partitioner="iid", num_clients=10)
    a, b = D.load_client_data(cfg, 0, 0), D.load_client_data(cfg, 1, 0)
    assert not np.array_equal(a.y_train, b.y_train)
    sizes = D.partition_label_counts(cfg, 0).sum(axis=1)
    assert sizes.max() - sizes.min() <= 1


def test_negative_seed_is_accepted() -> None:
    cfg = cfg_of(partitioner="dirichlet", num_clients=5)
    assert len(D.load_client_data(cfg, -3, 0).y_train) > 0


# -- heterogeneity --------------------------------------------------------------------------------
def test_dirichlet_low_alpha_is_more_skewed_than_iid() -> None:
    iid = D.partition_label_counts(cfg_of(partitioner="iid", num_clients=20), 0)
    skew = D.partition_label_counts(
        cfg_of(partitioner="dirichlet", alpha=0.1, num_clients=20, min_partition_size=5), 0
    )
    assert mean_label_entropy(skew) < mean_label_entropy(iid) - 0.5


def test_pathological_limits_labels_per_client_and_uses_every_class() -> None:
    cfg = cfg_of(partitioner="pathological", classes_per_client=2, num_clients=25)
    counts = D.partition_label_counts(cfg, 0)
    assert ((counts > 0).sum(axis=1) <= 2).all()
    assert (counts.sum(axis=0) > 0).all()  # first-deterministic covers every class
    for c in all_clients(cfg):
        assert len(np.unique(np.concatenate([c.y_train, c.y_test]))) <= 2


def test_size_skew_orders_client_sizes() -> None:
    sizes = D.partition_label_counts(cfg_of(partitioner="size", size_skew="square"), 0).sum(axis=1)
    assert (np.diff(sizes) > 0).all()


def test_tiny_client_keeps_everything_for_training() -> None:
    cfg = cfg_of(partitioner="size", size_skew="square", num_clients=20)  # client 0 gets 1 row
    c = D.load_client_data(cfg, 0, 0)
    assert len(c.y_train) == 1
    assert c.x_test.shape == (0, 40) and c.y_test.shape == (0,)


def test_local_test_fraction_is_respected() -> None:
    cfg = cfg_of(partitioner="iid", num_clients=4, local_test_fraction=0.25)
    c = D.load_client_data(cfg, 0, 0)
    assert len(c.y_test) == 250 and len(c.y_train) == 750


def test_loading_one_hundred_clients_partitions_once() -> None:
    # Speed is benchmarks/startup.py's to measure (a wall-time assert fails on a busy machine);
    # what keeps loading fast is that the federation is split once for all its clients.
    cfg = cfg_of(partitioner="dirichlet", alpha=0.5, num_clients=100, min_partition_size=5)
    misses = partitions.federation.cache_info().misses
    clients = all_clients(cfg, 11)
    assert partitions.federation.cache_info().misses == misses + 1
    assert sum(len(c.y_train) + len(c.y_test) for c in clients) == 4000


# -- proxy and central test -------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["mnist1d", "digits", "synthetic"])
def test_proxy_is_class_balanced_and_disjoint(dataset: str) -> None:
    cfg = cfg_of(dataset=dataset, partitioner="dirichlet", num_clients=8, proxy_fraction=0.1)
    x_proxy, y_proxy = D.load_proxy(cfg, 0)
    n_train = len(train_pool(cfg)[1])
    assert len(y_proxy) == round(0.1 * n_train)
    assert x_proxy.dtype == np.float32 and y_proxy.dtype == np.int64
    per_class = np.bincount(y_proxy, minlength=10)
    available = np.bincount(train_pool(cfg)[1], minlength=10)
    uncapped = per_class < available  # classes that could have given more
    assert per_class[uncapped].max() - per_class[uncapped].min() <= 1
    assert (per_class[~uncapped] <= per_class[uncapped].max()).all()
    proxy_keys = Counter(row_keys(x_proxy, y_proxy))
    assert not proxy_keys & client_keys(all_clients(cfg))


def test_proxy_needs_a_fraction() -> None:
    with pytest.raises(DataError, match="data.proxy_fraction"):
        D.load_proxy(cfg_of(), 0)


@pytest.mark.parametrize("dataset", ["mnist1d", "digits", "synthetic"])
def test_central_test_is_disjoint_from_train(dataset: str) -> None:
    cfg = cfg_of(dataset=dataset)
    x_test, y_test = D.load_central_test(cfg, 0)
    x_train, y_train = train_pool(cfg)
    assert len(y_test) > 0 and x_test.shape[1:] == x_train.shape[1:]
    assert x_test.dtype == np.float32 and y_test.dtype == np.int64
    assert not set(row_keys(x_test, y_test)) & set(row_keys(x_train, y_train))
    if dataset != "synthetic":
        # fixed dataset: the central test set does not change with the run seed
        np.testing.assert_array_equal(D.load_central_test(cfg, 5)[1], y_test)


def test_mnist1d_sizes_and_disk_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGE_CACHE", str(tmp_path))
    datasets.load_source.cache_clear()  # other tests may already hold this dataset in memory
    cfg = cfg_of(num_samples=600)
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    x_test, y_test = D.load_central_test(cfg, 0)
    assert np.random.random() == expected  # generating mnist1d left the global RNG alone
    assert len(y_test) == 120 and len(train_pool(cfg)[1]) == 480
    cached = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(cached) == 1
    datasets.load_source.cache_clear()
    np.testing.assert_array_equal(D.load_central_test(cfg, 0)[0], x_test)  # read back from disk


def test_synthetic_is_split_by_device() -> None:
    cfg = cfg_of(dataset="synthetic", num_clients=30, partitioner="pathological")
    counts = D.partition_label_counts(cfg, 0)
    assert counts.shape == (30, 10)
    sizes = counts.sum(axis=1)
    assert sizes.max() > 3 * sizes.min()  # power-law device sizes
    x_test, _ = D.load_central_test(cfg, 0)
    assert abs(len(x_test) / (sizes.sum() + len(x_test)) - 0.2) < 0.05
    # the partitioner setting is ignored for synthetic: a natural split per device
    iid = cfg_of(dataset="synthetic", num_clients=30, partitioner="iid")
    np.testing.assert_array_equal(D.partition_label_counts(iid, 0), counts)
    other = cfg_of(dataset="synthetic", num_clients=30, synthetic_alpha=0.0, synthetic_beta=0.0)
    assert not np.array_equal(D.partition_label_counts(other, 0), counts)


# -- bad inputs name the key --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(partitioner="pathological", classes_per_client=12), "data.classes_per_client=12"),
        (dict(dataset="digits", num_clients=2000), "data.num_clients=2000"),
        (
            dict(partitioner="dirichlet", num_clients=100, min_partition_size=50),
            "data.min_partition_size",
        ),
        (
            dict(partitioner="dirichlet", alpha=0.01, num_clients=50, min_partition_size=30),
            "data.min_partition_size",
        ),
        (
            dict(partitioner="shard", num_clients=100, shards_per_client=50),
            "data.shards_per_client",
        ),
        (dict(partitioner="size", size_skew="exponential", num_clients=10), "data.size_skew"),
        (dict(dataset="synthetic", num_clients=40, num_samples=50), "data.num_samples"),
    ],
)
def test_impossible_requests_raise_data_error(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(DataError, match=key.replace(".", r"\.")) as err:
        D.load_client_data(cfg_of(**kwargs), 0, 0)
    assert isinstance(err.value, ValueError)
    assert any(word in str(err.value) for word in ("lower", "raise", "set"))  # says the fix


@pytest.mark.parametrize("partition_id", [-1, 10, 99])
def test_partition_id_out_of_range(partition_id: int) -> None:
    with pytest.raises(DataError, match="partition_id"):
        D.load_client_data(cfg_of(num_clients=10), 0, partition_id)


# -- hub loader, offline on local parquet -------------------------------------------------------
@pytest.fixture(scope="module")
def digits_parquet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """sklearn digits as parquet: an 8x8 integer list column 'image' and 'label'."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = x.reshape(-1, 8, 8).astype(np.int64).tolist()
    root = tmp_path_factory.mktemp("hub")
    paths = {"train": str(root / "train.parquet"), "test": str(root / "test.parquet")}
    pq.write_table(pa.table({"image": images[:1500], "label": y[:1500]}), paths["train"])
    pq.write_table(pa.table({"image": images[1500:], "label": y[1500:]}), paths["test"])
    return paths


def test_hub_parquet_train_and_test(digits_parquet: dict[str, str]) -> None:
    cfg = cfg_of(
        dataset="hub",
        hub_path="parquet",
        hub_data_files=digits_parquet,
        partitioner="dirichlet",
        num_clients=5,
    )
    info = D.dataset_info(cfg)
    assert info.input_shape == (1, 8, 8) and info.num_classes == 10
    x_test, y_test = D.load_central_test(cfg, 0)
    assert x_test.shape == (1797 - 1500, 1, 8, 8) and x_test.dtype == np.float32
    clients = all_clients(cfg)
    assert sum(len(c.y_train) + len(c.y_test) for c in clients) == 1500
    assert client_keys(clients) == Counter(row_keys(*train_pool(cfg)))


def test_hub_parquet_without_test_split_carves_twenty_percent(
    digits_parquet: dict[str, str],
) -> None:
    cfg = cfg_of(
        dataset="hub", hub_path="parquet", hub_data_files={"train": digits_parquet["train"]}
    )
    x_test, y_test = D.load_central_test(cfg, 0)
    assert len(y_test) == 300 and len(train_pool(cfg)[1]) == 1200
    assert not set(row_keys(x_test, y_test)) & set(row_keys(*train_pool(cfg)))


def test_hub_image_feature_becomes_chw_in_unit_range(tmp_path: Path) -> None:
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(60, 6, 5, 3), dtype=np.uint8)
    ds = Dataset.from_dict(
        {"img": [PILImage.fromarray(p) for p in pixels], "label": [i % 3 for i in range(60)]},
        features=Features({"img": Image(), "label": ClassLabel(num_classes=3)}),
    )
    path = str(tmp_path / "rgb.parquet")
    ds.to_parquet(path)
    cfg = cfg_of(
        dataset="hub",
        hub_path="parquet",
        hub_data_files={"train": path},
        hub_feature_key="img",
        num_clients=3,
    )
    assert D.dataset_info(cfg).input_shape == (3, 6, 5)
    x, _ = D.load_central_test(cfg, 0)
    assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    c = D.load_client_data(cfg, 0, 2)
    assert c.x_train.shape[1:] == (3, 6, 5)


def test_hub_missing_files_and_columns_raise_data_error(
    digits_parquet: dict[str, str], tmp_path: Path
) -> None:
    missing = cfg_of(
        dataset="hub", hub_path="parquet", hub_data_files={"train": str(tmp_path / "nope.parquet")}
    )
    with pytest.raises(DataError, match="data.hub_data_files") as err:
        D.dataset_info(missing)
    assert "nope.parquet" in str(err.value)
    offline = cfg_of(dataset="hub", hub_path="someone/not-cached-here")
    with pytest.raises(DataError, match="someone/not-cached-here"):
        D.load_client_data(offline, 0, 0)
    bad_key = cfg_of(
        dataset="hub", hub_path="parquet", hub_data_files=digits_parquet, hub_feature_key="pixels"
    )
    with pytest.raises(DataError, match="data.hub_feature_key='pixels'"):
        D.dataset_info(bad_key)
