"""Experiment tracking: TensorBoard and MLflow as observers of the run's writer.

Each round's record reaches :class:`~scenarios.results.RunWriter` once (``metrics.jsonl``); the
trackers here watch the writer (:class:`~scenarios.results.RunObserver`), so the round loop knows
none of them. Every number of a round's record is logged at step = round (central and personalized
accuracy, losses, bytes up/down, wall and virtual time, replies ...); the scenario, flattened to
dotted keys, is logged as hyperparameters. ``[tracking]`` in the scenario switches them on; their
packages are optional extras (``pip install 'fedge[tracking]'``) imported only when switched on.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from scenarios.config import Scenario, ScenarioError
from scenarios.results import Record, RunObserver

TENSORBOARD_DIR = "tensorboard"
MLRUNS_DIR = "mlruns"
RUN_DIR_TAG = "fedge.run_dir"


def flat_hyperparameters(scenario: Scenario) -> dict[str, str | int | float | bool]:
    """The scenario as ``{"data.alpha": 0.5, ...}``; lists become their JSON text."""
    out: dict[str, str | int | float | bool] = {}

    def walk(table: dict[str, Any], prefix: str) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif value is not None:
                plain = isinstance(value, str | int | float | bool)
                out[f"{prefix}{key}"] = value if plain else json.dumps(value)

    walk(json.loads(scenario.model_dump_json()), "")
    return out


def round_metrics(record: Record) -> dict[str, float]:
    """The numbers of a round's record (not its ``round``), as floats."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "round" and isinstance(value, int | float) and not isinstance(value, bool)
    }


def _require(package: str, switch: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ScenarioError(
            f"{switch} = true needs the {package} package, which is an optional extra: "
            f"pip install 'fedge[tracking]' (or set {switch} = false)"
        )


class TensorBoardTracker(RunObserver):
    """Scalars per round and the scenario as hparams, in ``<run_dir>/tensorboard``
    (``tensorboard --logdir <run_dir>``, or ``<output_dir>`` to see several runs)."""

    def __init__(self, scenario: Scenario, run_dir: Path) -> None:
        _require("tensorboard", "tracking.tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))
        # written into this run's own event file (SummaryWriter.add_hparams would open a sub-run);
        # the metric tags name the scalars the hparams dashboard shows against each setting
        metric_tags = {"central_accuracy": math.nan, "central_loss": math.nan}
        for summary in hparams(flat_hyperparameters(scenario), metric_tags):
            self.writer.file_writer.add_summary(summary)

    def on_round(self, record: Record) -> None:
        for key, value in round_metrics(record).items():
            self.writer.add_scalar(key, value, global_step=int(record["round"]))
        self.writer.flush()  # a run killed mid-way keeps the rounds it finished, as metrics.jsonl

    def on_end(self, summary: dict | None) -> None:
        self.writer.close()


class MLflowTracker(RunObserver):
    """One MLflow run per fedge run: params = the scenario, metrics per round (step = round), the
    summary's numbers as ``final/<key>``, and every file of the run folder as artifacts.

    The default store is the file store ``mlruns/`` next to the run folder (``mlflow ui
    --backend-store-uri <output_dir>/mlruns``). MLflow 3 keeps file stores in maintenance mode and
    refuses them unless ``MLFLOW_ALLOW_FILE_STORE=true``, which is set for that default only;
    give ``tracking.mlflow_uri`` (e.g. ``sqlite:///path/mlflow.db`` or an ``http://`` server)
    to use another store. A resumed run continues the MLflow run of its folder."""

    def __init__(self, scenario: Scenario, run_dir: Path, resume: bool = False) -> None:
        _require("mlflow", "tracking.mlflow")
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir).resolve()
        uri = scenario.tracking.mlflow_uri
        if not uri:
            uri = (run_dir.parent / MLRUNS_DIR).as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.run_dir = run_dir
        self.client = MlflowClient(tracking_uri=uri)
        name = scenario.tracking.mlflow_experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        earlier = (
            self.client.search_runs(
                [experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'"
            )
            if resume
            else []
        )
        if earlier:
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(
            experiment_id, run_name=run_dir.name, tags={RUN_DIR_TAG: str(run_dir)}
        )
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in flat_hyperparameters(scenario).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, step) for k, v in values.items()]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def on_round(self, record: Record) -> None:
        self._log_metrics(round_metrics(record), int(record["round"]))

    def on_end(self, summary: dict | None) -> None:
        if summary is not None:
            final = {f"final/{k}": v for k, v in round_metrics(summary).items()}
            self._log_metrics(final, int(summary.get("num_rounds", 0)))
        artifacts = [p for p in sorted(self.run_dir.iterdir()) if p.name != MLRUNS_DIR]
        for path in artifacts:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))
        ok = summary is not None and summary.get("status") != "failed"
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


def tracking_observers(
    scenario: Scenario, run_dir: Path, resume: bool = False
) -> list[RunObserver]:
    """The trackers ``scenario.tracking`` switches on (none by default)."""
    observers: list[RunObserver] = []
    if scenario.tracking.tensorboard:
        observers.append(TensorBoardTracker(scenario, run_dir))
    if scenario.tracking.mlflow:
        observers.append(MLflowTracker(scenario, run_dir, resume))
    return observers
