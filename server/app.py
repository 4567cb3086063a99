"""fedge's Flower ServerApp: the same object runs in-process, under Ray simulation and on a SuperLink.

``run_config["scenario"]`` carries the validated scenario (JSON) and ``run_config["run-dir"]`` the
absolute results folder; an empty scenario means the default one, so ``flwr run .`` just works.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from clients.data import load_central_test
from clients.models import build_model
from clients.training import evaluate
from scenarios.config import Scenario, scenario_to_toml
from scenarios.results import METRICS_FILE, SUMMARY_FILE, read_jsonl
from server.checkpoint import (
    CHECKPOINT_FILE,
    RunState,
    capture_run_state,
    check_resume_fits,
    load_checkpoint,
    logged_rounds,
    restore_run_state,
    save_checkpoint,
    scenario_identity,
    truncate_logs,
    wall_time_until,
)
from server.client_state import ClientStateKeeper, query_partitions
from server.concept_shift import group_central_eval, group_summary
from server.deadline import finalize_virtual_clock
from server.identity import IdentityGuard
from server.loop import run_rounds, wait_for_nodes
from server.outcome import STATUS_FAILED, judge_run
from server.personalization import evaluate_config_fn, finalize_personalization
from server.robust import run_writer
from server.setup import build_run
from server.tracking import tracking_observers

RUN_DIR_KEY = "run-dir"
RESUME_KEY = "resume"

app = ServerApp()


def default_run_dir(scenario: Scenario) -> Path:
    """``<output_dir>/<name>-s<seed>-<timestamp>``: runs never overwrite each other."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = scenario.resolved_output_dir() / f"{scenario.name}-s{scenario.seed}-{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():
        run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
    return run_dir


class RunFailedError(RuntimeError):
    """The run ended with ``"status": "failed"`` in its summary (e.g. every reply rejected)."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    scenario = Scenario.from_run_config(context.run_config)
    run_dir = str(context.run_config.get(RUN_DIR_KEY, "")) or str(default_run_dir(scenario))
    resume = bool(context.run_config.get(RESUME_KEY, False))
    summary = run_server(grid, scenario, Path(run_dir), resume=resume)
    if summary["status"] == STATUS_FAILED:
        # Raising is how a ServerApp tells Flower: the run ends "finished:failed" with this
        # message as its details (`flwr ls`), which `fedge deploy submit` turns into exit 1.
        # `flwr run --stream` itself exits 0 whatever the status (flwr 1.42).
        raise RunFailedError(f"run FAILED: {summary['failure']} (results in {run_dir})")


def export_edge_models(scenario: Scenario, info, final: ArrayRecord, run_dir: Path) -> None:
    """Runs with edge clients (``[edge] trainers`` or a LoRA / FF run) also write
    ``model.onnx``, ``model.int8.onnx`` and ``model.json``: the artifact an on-device app loads,
    taking raw inputs, with its input contract and class names in metadata_props and the JSON."""
    has_edge = bool(scenario.edge.trainers) or getattr(scenario.algorithm, "edge_export", False)
    if not (scenario.edge.export_onnx and (has_edge or scenario.model.name == "ff_mlp")):
        return
    import torch

    from clients.datasets import load_source, source_key
    from edge.export import dataset_input_spec, export_onnx

    model = build_model(scenario.model, info.input_shape, info.num_classes)
    model.load_state_dict(final.to_torch_state_dict())
    x_test, _ = load_central_test(scenario.data, scenario.seed)
    x_train = load_source(source_key(scenario.data, scenario.seed)).x_train  # the observed range
    spec = dataset_input_spec(
        info.name, info.input_shape, info.num_classes, x_train, scenario.model.name
    )
    sample = torch.from_numpy(x_test[:2] / spec.scale).float()  # raw inputs, as a device has them
    result = export_onnx(model, sample, run_dir / "model.onnx", spec=spec)
    print(
        f"fedge: exported {result.fp32_path} ({result.fp32_bytes} B), int8 and {result.sidecar_path}",
        flush=True,
    )


def resume_state(scenario: Scenario, run_dir: Path, arrays: ArrayRecord) -> RunState | None:
    """The checkpoint ``run_dir`` resumes from, checked against this scenario and its model
    ``arrays`` (``CheckpointError`` naming what differs otherwise); None when the run was killed
    before its first checkpoint. Reads only: a refused resume leaves the folder as it was."""
    if not (run_dir / CHECKPOINT_FILE).exists() and not logged_rounds(run_dir):
        return None
    state = load_checkpoint(run_dir)
    check_resume_fits(run_dir, state, scenario, arrays)
    return state


def finished_summary(scenario: Scenario, run_dir: Path, state: RunState | None) -> dict | None:
    """``summary.json`` of a run that already ended at its checkpoint (resuming it does nothing)."""
    summary_file = run_dir / SUMMARY_FILE
    if state is None or state.server_round < scenario.num_rounds or not summary_file.is_file():
        return None
    return json.loads(summary_file.read_text(encoding="utf-8"))


def check_resume(scenario: Scenario, run_dir: Path) -> dict | None:
    """Everything ``run_server(resume=True)`` checks before it changes anything, for the engines
    that start Flower processes (which write logs into ``run_dir``) first; returns the summary of
    a run that is already finished. Builds the run without a folder, as ``fedge validate`` does."""
    built = build_run(scenario)
    state = resume_state(scenario, run_dir, ArrayRecord(built.setup.model.state_dict()))
    return finished_summary(scenario, run_dir, state)


def run_server(
    grid: Grid, scenario: Scenario, run_dir: Path, show_progress: bool = True, resume: bool = False
) -> dict:
    """Train ``scenario`` over ``grid``; write everything to ``run_dir``; return the run summary.
    ``resume=True`` continues from ``run_dir``'s last checkpoint (see :mod:`server.checkpoint`)."""
    run = build_run(scenario, run_dir)
    setup, strategy, plugins = run.setup, run.strategy, run.plugins
    device, info, model = setup.device, setup.info, setup.model
    # taken after the strategy exists: a strategy may initialise the model (LoRA's pre-trained base)
    initial = ArrayRecord(model.state_dict())
    x_test, y_test = load_central_test(scenario.data, scenario.seed)
    eval_model = build_model(scenario.model, info.input_shape, info.num_classes).to(device)
    per_group = group_central_eval(scenario, eval_model, device)  # None without a concept shift

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        eval_model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(eval_model, x_test, y_test, device)
        return MetricRecord(
            {"central_loss": loss, "central_accuracy": acc, **(per_group() if per_group else {})}
        )

    state = resume_state(scenario, run_dir, initial) if resume else None
    if (done := finished_summary(scenario, run_dir, state)) is not None:
        print(
            f"fedge: {run_dir} already finished its {scenario.num_rounds} rounds: nothing to "
            "resume, no file changed (raise num_rounds in its scenario.toml to train on)",
            flush=True,
        )
        return done
    wait_for_nodes(grid, scenario.data.num_clients, scenario.federation.wait_for_nodes_s)
    start_round, wall_before = 1, 0.0
    if resume and state is None:
        # killed before its first round ended: nothing to lose, so the folder is simply reused
        truncate_logs(run_dir, -1)
        print(f"fedge: {run_dir} has no checkpoint yet; starting it again from round 1", flush=True)
    elif state is not None:
        initial, start_round = state.arrays, state.server_round + 1
        restore_run_state(state, strategy, plugins)
        # this run's node ids are new: which partition each serves, for the strategy (cluster
        # members) and the clients' Context.state (clients/state.py), on every engine
        node_pid = query_partitions(grid, timeout=scenario.federation.round_timeout_s)
        if hasattr(strategy, "adopt_nodes"):
            strategy.adopt_nodes(node_pid)
        for plugin in plugins:
            if isinstance(plugin, ClientStateKeeper):
                plugin.send_back(grid, scenario.federation.round_timeout_s, node_pid)
        truncate_logs(run_dir, state.server_round)
        wall_before = wall_time_until(run_dir, state.server_round)
        print(f"fedge: resuming {run_dir} after round {state.server_round}", flush=True)
    for plugin in plugins:  # an owner that left can hand its partition id to a newcomer
        if isinstance(plugin, IdentityGuard):
            plugin.connected_nodes = grid.get_node_ids
    writer = run_writer(run_dir, scenario, resume)
    writer.observers.extend(tracking_observers(scenario, run_dir, resume))
    writer.write_scenario(scenario_to_toml(scenario))

    identity = scenario_identity(scenario)

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        save_checkpoint(
            run_dir, capture_run_state(server_round, arrays, strategy, plugins, identity)
        )

    final = run_rounds(
        grid,
        strategy,
        initial,
        scenario.num_rounds,
        writer,
        central_eval,
        timeout=scenario.federation.round_timeout_s,
        show_progress=show_progress,
        plugins=plugins,
        evaluate_config=evaluate_config_fn(scenario),
        start_round=start_round,
        wall_time_before=wall_before,
        on_round_end=checkpoint if scenario.robustness.checkpoint else None,
    )
    writer.save_model(final.to_torch_state_dict())
    export_edge_models(scenario, info, final, run_dir)
    # judged before summary.json first appears: engines take its appearance as the run's end
    outcome = judge_run(read_jsonl(run_dir / METRICS_FILE), scenario.robustness.max_skipped_share)
    summary = finalize_personalization(
        run_dir, writer.finalize(extra={**outcome, **group_summary(run_dir, scenario)})
    )
    if scenario.devices is not None:
        summary = finalize_virtual_clock(writer, summary)
    writer.close(summary)  # observers (experiment trackers) see the final summary and files
    if summary["status"] == STATUS_FAILED:
        print(f"fedge: run FAILED: {summary['failure']}", flush=True)
    print(f"fedge: results in {run_dir}", flush=True)
    return summary
