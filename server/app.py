"""fedge's Flower ServerApp: the same object runs in-process, under Ray simulation and on a SuperLink.

``run_config["scenario"]`` carries the validated scenario (JSON) and ``run_config["run-dir"]`` the
absolute results folder; an empty scenario means the default one, so ``flwr run .`` just works.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from clients.data import load_central_test
from clients.models import build_model
from clients.training import evaluate
from scenarios.config import Scenario, scenario_to_toml
from scenarios.results import METRICS_FILE, read_jsonl
from server.checkpoint import (
    CHECKPOINT_FILE,
    capture_run_state,
    load_checkpoint,
    logged_rounds,
    restore_run_state,
    save_checkpoint,
    truncate_logs,
    wall_time_until,
)
from server.client_state import ClientStateKeeper
from server.deadline import finalize_virtual_clock
from server.loop import run_rounds, wait_for_nodes
from server.outcome import STATUS_FAILED, judge_run
from server.personalization import evaluate_config_fn, finalize_personalization
from server.robust import run_writer
from server.setup import build_run

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


@app.main()
def main(grid: Grid, context: Context) -> None:
    scenario = Scenario.from_run_config(context.run_config)
    run_dir = str(context.run_config.get(RUN_DIR_KEY, "")) or str(default_run_dir(scenario))
    resume = bool(context.run_config.get(RESUME_KEY, False))
    run_server(grid, scenario, Path(run_dir), resume=resume)


def export_edge_models(scenario: Scenario, info, final: ArrayRecord, run_dir: Path) -> None:
    """Runs with edge clients (``[edge] trainers`` or a LoRA / FF run) also write
    ``model.onnx``, ``model.int8.onnx`` and ``model.json``: the artifact an on-device app loads,
    taking raw inputs, with its input contract and class names in metadata_props and the JSON."""
    has_edge = bool(scenario.edge.trainers) or getattr(scenario.algorithm, "edge_export", False)
    if not (scenario.edge.export_onnx and (has_edge or scenario.model.name == "ff_mlp")):
        return
    import torch

    from edge.export import dataset_input_spec, export_onnx

    model = build_model(scenario.model, info.input_shape, info.num_classes)
    model.load_state_dict(final.to_torch_state_dict())
    x_test, _ = load_central_test(scenario.data, scenario.seed)
    spec = dataset_input_spec(
        info.name, info.input_shape, info.num_classes, x_test, scenario.model.name
    )
    sample = torch.from_numpy(x_test[:2] / spec.scale).float()  # raw inputs, as a device has them
    result = export_onnx(model, sample, run_dir / "model.onnx", spec=spec)
    print(
        f"fedge: exported {result.fp32_path} ({result.fp32_bytes} B), int8 and {result.sidecar_path}",
        flush=True,
    )


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

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        eval_model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(eval_model, x_test, y_test, device)
        return MetricRecord({"central_loss": loss, "central_accuracy": acc})

    wait_for_nodes(grid, scenario.data.num_clients, scenario.federation.wait_for_nodes_s)
    start_round, wall_before = 1, 0.0
    if resume and not (run_dir / CHECKPOINT_FILE).exists() and not logged_rounds(run_dir):
        # killed before its first round ended: nothing to lose, so the folder is simply reused
        truncate_logs(run_dir, -1)
        print(f"fedge: {run_dir} has no checkpoint yet; starting it again from round 1", flush=True)
    elif resume:
        state = load_checkpoint(run_dir)
        initial, start_round = state.arrays, state.server_round + 1
        restore_run_state(state, strategy, plugins)
        for plugin in plugins:  # clients' Context.state, on every engine (clients/state.py)
            if isinstance(plugin, ClientStateKeeper):
                plugin.send_back(grid, timeout=scenario.federation.round_timeout_s)
        truncate_logs(run_dir, state.server_round)
        wall_before = wall_time_until(run_dir, state.server_round)
        print(f"fedge: resuming {run_dir} after round {state.server_round}", flush=True)
    writer = run_writer(run_dir, scenario, resume)
    writer.write_scenario(scenario_to_toml(scenario))

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        save_checkpoint(run_dir, capture_run_state(server_round, arrays, strategy, plugins))

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
    summary = finalize_personalization(run_dir, writer.finalize(extra=outcome))
    if scenario.devices is not None:
        summary = finalize_virtual_clock(writer, summary)
    if summary["status"] == STATUS_FAILED:
        print(f"fedge: run FAILED: {summary['failure']}", flush=True)
    print(f"fedge: results in {run_dir}", flush=True)
    return summary
