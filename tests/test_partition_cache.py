"""The partition cache (clients/partitions.py): a process that finds a federation's rows on disk
imports neither flwr-datasets nor Hugging Face ``datasets`` (nor mnist1d's generator), and gets
exactly the arrays a fresh computation gives; bad cache files are recomputed, never trusted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clients import data as D
from clients import datasets, partitions
from scenarios.config import DataConfig

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("flwr_datasets", "datasets", "mnist1d")  # what a cached federation must not import

# small, but with every part of a federation: a proxy carve-out, ragged Dirichlet partitions,
# local splits (a 0.3 fraction, so rounding matters)
CFG = DataConfig(
    dataset="mnist1d",
    num_samples=1000,
    num_clients=6,
    partitioner="dirichlet",
    alpha=0.3,
    min_partition_size=5,
    proxy_fraction=0.1,
    local_test_fraction=0.3,
)
SEED = 3

# Every array a federation serves, by name (run here and in a fresh interpreter).
COLLECT = textwrap.dedent(
    """
    def collect(cfg, seed):
        from clients import data as D

        arrays = {}
        for pid in range(cfg.num_clients):
            c = D.load_client_data(cfg, seed, pid)
            for name in ("x_train", "y_train", "x_test", "y_test"):
                arrays[f"{pid}_{name}"] = getattr(c, name)
        arrays["proxy_x"], arrays["proxy_y"] = D.load_proxy(cfg, seed)
        arrays["central_x"], arrays["central_y"] = D.load_central_test(cfg, seed)
        arrays["counts"] = D.partition_label_counts(cfg, seed)
        arrays["input_shape"] = np.array(D.dataset_info(cfg).input_shape)
        return arrays
    """
)

# A fresh interpreter, as a Ray actor is: `import clients.app` first, so an eager import anywhere
# on the ClientApp's import path is noticed too; then report which of HEAVY got imported.
CHILD = (
    "import json, sys\nimport numpy as np\nimport clients.app\n"
    "from scenarios.config import DataConfig\n"
    + COLLECT
    + textwrap.dedent(
        """
        np.savez(sys.argv[3], **collect(DataConfig.model_validate_json(sys.argv[1]), int(sys.argv[2])))
        print(json.dumps([m for m in HEAVY if m in sys.modules]))
        """
    ).replace("HEAVY", repr(HEAVY))
)


def collect(cfg: DataConfig, seed: int) -> dict[str, np.ndarray]:
    namespace: dict = {"np": np}
    exec(COLLECT, namespace)
    return namespace["collect"](cfg, seed)


def child_imports(cache: Path, out: Path) -> list[str]:
    """Collect CFG's arrays in a fresh interpreter into ``out``; the HEAVY modules it imported."""
    env = {**os.environ, "FEDGE_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, CFG.model_dump_json(), str(SEED), str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def partition_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("partitions-*.npz"))


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temp FEDGE_CACHE and empty in-memory caches (before and after)."""
    monkeypatch.setenv("FEDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clear_memory()
    yield tmp_path / "cache"
    clear_memory()


def clear_memory() -> None:
    partitions.federation.cache_clear()
    D._client_data.cache_clear()
    datasets.load_source.cache_clear()


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_cached_federation_imports_no_partitioning_library(fresh: Path, tmp_path: Path) -> None:
    computed = collect(CFG, SEED)  # here: partitions with flwr-datasets, writes the cache
    assert len(partition_files(fresh)) == 1
    imported = child_imports(fresh, tmp_path / "child.npz")  # a Ray actor's view
    assert imported == []
    with np.load(tmp_path / "child.npz") as f:
        assert_same({k: f[k] for k in f.files}, computed)


def test_corrupt_cache_file_is_recomputed(fresh: Path) -> None:
    expected = collect(CFG, SEED)
    (path,) = partition_files(fresh)
    good = path.read_bytes()
    with np.load(path) as f:
        rows = {k: f[k] for k in f.files}
    for bad in (good[: len(good) // 2], b"not a zip at all", good[:-30] + bytes(30)):
        path.write_bytes(bad)
        clear_memory()
        assert_same(collect(CFG, SEED), expected)
        with np.load(path) as f:  # recomputed and rewritten, not trusted
            assert_same({k: f[k] for k in f.files}, rows)


# -- in-process checks ---------------------------------------------------------------------------
def test_inconsistent_cache_is_recomputed(fresh: Path) -> None:
    expected = collect(CFG, SEED)
    (path,) = partition_files(fresh)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    tampered = {
        "rows out of range": {**arrays, "train_rows": arrays["train_rows"] + 10_000},
        "wrong client count": {**arrays, "train_offsets": arrays["train_offsets"][:-1]},
        "missing key": {k: v for k, v in arrays.items() if k != "test_rows"},
        "float rows": {**arrays, "proxy_rows": arrays["proxy_rows"].astype(np.float64)},
    }
    for why, content in tampered.items():
        np.savez(path, **content)
        clear_memory()
        assert_same(collect(CFG, SEED), expected)
        with np.load(path) as f:  # rewritten with the right rows
            np.testing.assert_array_equal(f["train_rows"], arrays["train_rows"], err_msg=why)


def test_unwritable_cache_folder_only_costs_recomputation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: Path
) -> None:
    expected = collect(CFG, SEED)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # a cache "folder" below a file: mkdir fails even for root, as a read-only folder would
    monkeypatch.setenv("FEDGE_CACHE", str(blocker / "cache"))
    clear_memory()
    assert_same(collect(CFG, SEED), expected)
    assert blocker.is_file() and blocker.read_text() == ""  # nothing written, nothing broken


def test_large_federations_split_lazily_with_identical_rows(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eager = collect(CFG, SEED)
    for path in partition_files(fresh):
        path.unlink()
    monkeypatch.setattr(partitions, "EAGER_LIMIT", CFG.num_clients - 1)
    clear_memory()
    assert_same(collect(CFG, SEED), eager)
    assert partition_files(fresh) == []  # not resolved up front, not cached


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 10, 33, 250])
@pytest.mark.parametrize("fraction", [0.2, 0.3, 0.9])
def test_split_by_length_equals_splitting_the_partition(n: int, fraction: float) -> None:
    """The local split is computed once per partition length: check that it is what
    ``train_test_split`` on the partition itself gives (including the tiny-partition fallback)."""
    from datasets import Dataset

    rows = np.random.default_rng(n).permutation(10 * n)[:n].astype(np.int64)
    part = Dataset.from_dict({"row": rows, "label": rows % 3})
    try:
        split = part.train_test_split(test_size=fraction, seed=11)
    except ValueError:
        n_test = min(max(1, int(np.ceil(fraction * n))), n - 1)
        split = part.train_test_split(test_size=n_test, seed=11)
    train, test = partitions.local_split(rows, fraction, 11)
    np.testing.assert_array_equal(train, np.asarray(split["train"]["row"]))
    np.testing.assert_array_equal(test, np.asarray(split["test"]["row"]))


def test_changed_hub_file_is_not_served_stale_rows(
    fresh: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key covers the source's labels: a local hub file edited under the same config gets
    the partitions a fresh computation gives, not the old file's rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    rng = np.random.default_rng(0)
    cfg = DataConfig(
        dataset="hub",
        hub_path="parquet",
        hub_data_files={"train": str(path)},
        hub_feature_key="x",
        hub_label_key="y",
        num_clients=4,
        partitioner="dirichlet",
        min_partition_size=2,
    )
    for version in range(2):
        y = rng.integers(0, 3, 200)
        pq.write_table(pa.table({"x": rng.normal(size=(200, 4)).tolist(), "y": y}), path)
        monkeypatch.setenv("FEDGE_CACHE", str(fresh))  # shared by both versions of the file
        clear_memory()
        served = collect_hub(cfg)
        monkeypatch.setenv("FEDGE_CACHE", str(tmp_path / f"empty-{version}"))
        clear_memory()
        assert_same(served, collect_hub(cfg))  # what this file's rows really are
    assert len(partition_files(fresh)) == 2


def collect_hub(cfg: DataConfig) -> dict[str, np.ndarray]:
    arrays = {"counts": D.partition_label_counts(cfg, 0)}
    for pid in range(cfg.num_clients):
        c = D.load_client_data(cfg, 0, pid)
        arrays[f"{pid}_x"], arrays[f"{pid}_y"] = c.x_train, c.y_train
    return arrays


def test_corrupt_mnist1d_cache_is_regenerated(fresh: Path) -> None:
    cfg = DataConfig(num_samples=600)
    x_test, _ = D.load_central_test(cfg, 0)
    (path,) = sorted(fresh.glob("mnist1d-*.npz"))
    path.write_bytes(path.read_bytes()[:100])  # truncated: not a zip any more
    clear_memory()
    np.testing.assert_array_equal(D.load_central_test(cfg, 0)[0], x_test)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None


def test_first_runs_long_work_is_announced_once(
    fresh: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Generating mnist1d and splitting a federation of 100+ clients take seconds on a machine's
    first run: each says so on stderr, once; a cached run is silent."""
    cfg = CFG.model_copy(
        update={
            "num_clients": partitions.NOTE_FROM_CLIENTS,
            "num_samples": 1200,
            "partitioner": "iid",
        }
    )
    D.load_client_data(cfg, SEED, 0)
    err = capsys.readouterr().err
    assert "generating mnist1d (1200 samples) once" in err
    assert f"splitting mnist1d into {cfg.num_clients} clients once" in err
    clear_memory()
    D.load_client_data(cfg, SEED, 0)
    assert capsys.readouterr().err == ""
    small = CFG.model_copy(update={"num_samples": 1200})  # 6 clients: quick, nothing to announce
    D.load_client_data(small, SEED, 0)
    assert "splitting" not in capsys.readouterr().err
