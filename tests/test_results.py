"""The results layer: run folders written by RunWriter, read back by load_run, compared by report.

Fake runs with made-up numbers: this tests the I/O, not learning.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import tomli_w

from fedge.report import compare_runs, expand_run_dirs, strip_seed_suffix
from scenarios.results import RunData, RunWriter, load_run, plot_metric

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def scenario(seed: int = 0, algorithm: str = "fedavg", name: str = "demo", **extra: object) -> dict:
    return {
        "name": name,
        "seed": seed,
        "num_rounds": 4,
        "output_dir": f"/tmp/out-{seed}",
        "data": {"dataset": "mnist1d", "num_clients": 3, "alpha": 0.5},
        "algorithm": {"name": algorithm},
        **extra,
    }


def fake_rounds(seed: int, num_rounds: int = 4) -> list[dict]:
    """Varied numbers per seed; round 0 has no traffic; fedlaw_gamma only from round 2."""
    rounds: list[dict] = []
    cumulative = 0.0
    for r in range(num_rounds + 1):
        wall = 0.0 if r == 0 else 0.5 + 0.1 * r + 0.01 * seed
        cumulative += wall
        record: dict = {
            "round": r,
            "central_accuracy": round(0.1 + 0.15 * r + 0.02 * seed + 0.2 * (r == 3), 4),
            "central_loss": round(2.3 / (1 + r + 0.1 * seed), 4),
            "wall_time_s": wall,
            "cumulative_wall_time_s": cumulative,
        }
        if r > 0:
            record |= {
                "train_loss": round(2.0 / (r + seed + 1), 4),
                "num_replies": 3,
                "num_failures": r % 2,
                "bytes_up": 1000 * r + seed,
                "bytes_down": 2000 + 7 * r,
            }
        if r >= 2:
            record["fedlaw_gamma"] = 0.9 + 0.01 * r
        rounds.append(record)
    return rounds


def client_rows(r: int) -> list[dict]:
    return [
        {"partition_id": p, "num_examples": 50 + p, "train_loss": 1 / (r + p + 1), "bytes_up": 99}
        for p in range(3)
    ]


def write_run(
    run_dir: Path, sc: dict, rounds: list[dict], finalize: bool = True
) -> tuple[RunWriter, dict | None]:
    writer = RunWriter(run_dir)
    writer.write_scenario(tomli_w.dumps(sc))
    for record in rounds:
        writer.log_round(record)
        if record["round"] > 0:
            writer.log_clients(record["round"], client_rows(record["round"]))
    return writer, (writer.finalize() if finalize else None)


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# -------------------- writing and reading one run


def test_finalize_writes_csv_png_summary(tmp_path: Path) -> None:
    rounds = fake_rounds(seed=1)
    _, summary = write_run(tmp_path / "run", scenario(1), rounds)
    run_dir = tmp_path / "run"
    for name in ("scenario.toml", "metrics.jsonl", "clients.jsonl", "metrics.csv", "summary.json"):
        assert (run_dir / name).stat().st_size > 0, name
    assert_png(run_dir / "accuracy.png")
    assert no_temp_files(run_dir)

    accs = [r["central_accuracy"] for r in rounds]
    assert summary == json.loads((run_dir / "summary.json").read_text())
    assert summary is not None
    assert summary["final_accuracy"] == accs[-1]
    assert summary["best_accuracy"] == max(accs)
    assert summary["best_round"] == accs.index(max(accs)) == 3  # the peak, not the last round
    assert summary["best_accuracy"] > summary["final_accuracy"]
    assert summary["num_rounds"] == 4
    assert summary["total_bytes_up"] == sum(r.get("bytes_up", 0) for r in rounds)
    assert summary["total_bytes_down"] == sum(r.get("bytes_down", 0) for r in rounds)
    assert summary["total_wall_time_s"] == pytest.approx(sum(r["wall_time_s"] for r in rounds))

    with open(run_dir / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    header = list(table[0])
    assert header[0] == "round"
    assert set(header) == set().union(*rounds)  # union of keys
    assert [int(row["round"]) for row in table] == [0, 1, 2, 3, 4]
    assert table[0]["bytes_up"] == "" and table[1]["fedlaw_gamma"] == ""  # missing: empty cells
    assert float(table[3]["fedlaw_gamma"]) == rounds[3]["fedlaw_gamma"]


def test_load_run_round_trips(tmp_path: Path) -> None:
    rounds, sc = fake_rounds(seed=2), scenario(2, "fedprox")
    _, summary = write_run(tmp_path / "run", sc, rounds)
    run = load_run(tmp_path / "run")
    assert isinstance(run, RunData) and run.complete
    assert run.run_dir == tmp_path / "run"
    assert run.scenario == sc
    assert run.rounds == rounds
    assert run.summary == summary
    expected_clients = [{"round": r, **row} for r in range(1, 5) for row in client_rows(r)]
    assert run.clients == expected_clients


def test_crash_mid_run_keeps_every_logged_round(tmp_path: Path) -> None:
    rounds = fake_rounds(seed=0)
    run_dir = tmp_path / "crashed"
    write_run(run_dir, scenario(0), rounds[:3], finalize=False)  # dies after round 2
    # ... and was killed half-way through writing round 3
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(rounds[3])[:25])
    with pytest.warns(UserWarning, match="truncated"):
        run = load_run(run_dir)
    assert not run.complete
    assert run.rounds == rounds[:3]
    assert {c["round"] for c in run.clients} == {1, 2}
    assert run.summary["final_accuracy"] == rounds[2]["central_accuracy"]
    assert run.summary["num_rounds"] == 2
    assert not (run_dir / "summary.json").exists()
    assert expand_run_dirs([tmp_path]) == [run_dir]


def test_corrupt_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "bad"
    write_run(run_dir, scenario(), fake_rounds(0, 1), finalize=False)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(["{oops", *lines]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1"):
        load_run(run_dir)


@pytest.mark.parametrize("num_logged", [0, 1, 2])
def test_finalize_with_zero_or_one_round(tmp_path: Path, num_logged: int) -> None:
    rounds = fake_rounds(seed=0, num_rounds=1)[:num_logged]  # nothing; round 0 only; rounds 0-1
    _, summary = write_run(tmp_path / "r", scenario(), rounds)
    assert summary is not None
    assert_png(tmp_path / "r" / "accuracy.png")
    assert (tmp_path / "r" / "metrics.csv").read_text().startswith("round")
    assert summary["num_rounds"] == max(0, num_logged - 1)
    if num_logged == 0:
        assert math.isnan(summary["final_accuracy"]) and summary["best_round"] is None
        assert summary["total_bytes_up"] == 0 and summary["total_wall_time_s"] == 0.0
    else:
        assert summary["final_accuracy"] == rounds[-1]["central_accuracy"]
    assert load_run(tmp_path / "r").rounds == rounds


def test_writer_details(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path / "a" / "b")  # creates parents
    assert (tmp_path / "a" / "b").is_dir()
    with pytest.raises(ValueError, match="round"):
        writer.log_round({"central_accuracy": 0.5})
    path = writer.write_json("extra.json", {"x": [1, 2]})
    writer.write_json("extra.json", {"x": [3]})  # replaced whole
    assert json.loads(path.read_text()) == {"x": [3]}
    assert no_temp_files(tmp_path)
    writer.log_round({"round": 0, "central_accuracy": 0.1})
    with pytest.raises(FileExistsError, match="already holds a run"):
        RunWriter(tmp_path / "a" / "b")  # never mix two runs in one folder


def test_save_model_atomically(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    writer = RunWriter(tmp_path)
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}
    path = writer.save_model(state)
    assert path == tmp_path / "model.pt" and no_temp_files(tmp_path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
    # numpy / torch scalars in metrics are written as plain numbers
    writer.log_round({"round": 0, "central_accuracy": torch.tensor(0.5), "n": torch.tensor(3)})
    assert load_run(tmp_path).rounds == [{"round": 0, "central_accuracy": 0.5, "n": 3}]


def test_plot_metric_against_other_x(tmp_path: Path) -> None:
    runs = []
    for seed in (0, 1):
        rounds = fake_rounds(seed)
        for r in rounds[1:]:  # virtual time only once training starts
            r["virtual_time_s"] = 3.0 * r["round"] + seed
        write_run(tmp_path / f"r{seed}", scenario(seed), rounds, finalize=False)
        runs.append(load_run(tmp_path / f"r{seed}"))
    assert_png(plot_metric(runs, "central_accuracy", tmp_path / "acc.png"))
    out = plot_metric(runs, "central_loss", tmp_path / "vt.png", x_key="virtual_time_s", title="t")
    assert_png(out)
    assert_png(plot_metric(runs, "not_logged", tmp_path / "empty.png"))


# -------------------- comparing runs


def test_compare_runs_mean_std_over_seeds(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    finals = {}
    for seed in (0, 1, 2):
        rounds = fake_rounds(seed)
        rounds[-1]["central_accuracy"] = [0.81, 0.85, 0.9][seed]
        finals[seed] = rounds[-1]["central_accuracy"]
        write_run(sweep / f"fedavg-s{seed}", scenario(seed, name=f"run{seed}"), rounds)
    write_run(sweep / "fedprox-s0", scenario(0, "fedprox"), fake_rounds(5))

    png, md = compare_runs(expand_run_dirs([sweep]), sweep)
    assert png == sweep / "comparison.png" and md == sweep / "comparison.md"
    assert_png(png)
    text = md.read_text()

    run_rows = [line for line in text.splitlines() if line.startswith("| fedavg-s")]
    assert len(run_rows) == 3
    assert "| fedavg-s1 | fedavg | 1 | 4 | 85.00 |" in text  # run, algorithm, seed, rounds, final %

    vals = list(finals.values())
    mean, std = statistics.fmean(vals), statistics.stdev(vals)  # sample std (n - 1)
    group_row = next(line for line in text.splitlines() if line.startswith("| fedavg |"))
    cells = [c.strip() for c in group_row.strip("|").split("|")]
    assert cells[2] == "3"  # n seeds
    assert f"{mean:.4f} ± {std:.4f}" in cells
    assert f"{100 * mean:.2f} ± {100 * std:.2f}" in cells
    single = next(line for line in text.splitlines() if line.startswith("| fedprox |"))
    assert "± 0.0000" in single and "| 1 |" in single


def test_compare_other_metric_and_label_clash(tmp_path: Path) -> None:
    # same run names, different settings: the group labels say what differs
    write_run(tmp_path / "a" / "demo-s0", scenario(0, extra_key=1), fake_rounds(0), finalize=False)
    write_run(tmp_path / "b" / "demo-s0", scenario(0, extra_key=2), fake_rounds(1), finalize=False)
    _, md = compare_runs(expand_run_dirs([tmp_path]), tmp_path / "out", metric="central_loss")
    text = md.read_text()
    assert "demo [extra_key=1]" in text and "demo [extra_key=2]" in text
    best_loss = min(r["central_loss"] for r in fake_rounds(1))
    assert f"{best_loss:.4f}" in text  # loss: lower is better, shown with 4 decimals


def test_strip_seed_suffix() -> None:
    assert strip_seed_suffix("fedavg-s3") == "fedavg"
    assert strip_seed_suffix("lr-0.1_seed12") == "lr-0.1"
    assert strip_seed_suffix("quickstart-s0-20261123-101500") == "quickstart"
    assert strip_seed_suffix("sizes") == "sizes"


# -------------------- finding runs


def test_expand_run_dirs_finds_nested_runs(tmp_path: Path) -> None:
    for rel in ("sweep/b/r2", "sweep/a/r1", "sweep/a/deeper/r3", "other/r4"):
        write_run(tmp_path / rel, scenario(), fake_rounds(0, 1), finalize=False)
    (tmp_path / "sweep" / "a" / "r1" / "logs").mkdir()  # folders inside a run are not runs
    (tmp_path / "sweep" / "a" / "r1" / "logs" / "metrics.jsonl").write_text("")
    found = expand_run_dirs([tmp_path / "sweep", tmp_path / "other/r4", tmp_path / "sweep/b/r2"])
    assert found == [
        tmp_path / "sweep/a/deeper/r3",
        tmp_path / "sweep/a/r1",
        tmp_path / "sweep/b/r2",
        tmp_path / "other/r4",
    ]


def test_not_a_run_errors_clearly(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        load_run(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no fedge runs"):
        expand_run_dirs([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="missing"):
        expand_run_dirs([tmp_path / "missing"])
