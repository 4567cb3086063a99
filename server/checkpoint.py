"""Checkpoints: the full server-side run state after every round, written atomically.

``checkpoint.pt`` in the run directory holds the round number, the global arrays, the strategy's
state (``strategy.state_dict()`` when the strategy has one: FedLAW weights, cluster models and
assignments, ...), every round plugin's ``state()``, the Python/NumPy/torch RNG states, and (in-process
engine) every node's ``Context.state`` (e.g. error-feedback residuals). Metrics already live in
``metrics.jsonl``/``clients.jsonl``; on resume they are cut back to the checkpointed round.

The file is written to a temporary name and moved into place with ``os.replace``, so a process
killed at any instant leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from scenarios.results import CLIENTS_FILE, METRICS_FILE, atomic_path

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1


@dataclass
class RunState:
    """Everything needed to continue a run after ``server_round``."""

    server_round: int
    arrays: ArrayRecord
    strategy_state: Any = None
    plugin_states: list[dict] = field(default_factory=list)
    rng_states: dict[str, Any] = field(default_factory=dict)
    node_states: dict[int, bytes] | None = None


def capture_rng() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def restore_rng(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def _arrays_to_bytes(arrays: ArrayRecord) -> bytes:
    return recorddict_to_proto(RecordDict({"arrays": arrays})).SerializeToString()


def _arrays_from_bytes(raw: bytes) -> ArrayRecord:
    proto = ProtoRecordDict()
    proto.ParseFromString(raw)
    return recorddict_from_proto(proto)["arrays"]


def save_checkpoint(run_dir: Path, state: RunState) -> Path:
    """Write ``run_dir/checkpoint.pt`` atomically (temp file + ``os.replace``)."""
    payload = {
        "format": FORMAT_VERSION,
        "server_round": state.server_round,
        "arrays": _arrays_to_bytes(state.arrays),
        "strategy_state": state.strategy_state,
        "plugin_states": state.plugin_states,
        "rng_states": state.rng_states,
        "node_states": state.node_states,
    }
    path = Path(run_dir) / CHECKPOINT_FILE
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(run_dir: Path) -> RunState:
    """Read ``run_dir/checkpoint.pt``; a clear error if there is none."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint in {run_dir} ({CHECKPOINT_FILE} missing): the run either never finished "
            "a round or ran with robustness.checkpoint=false; start it again with `fedge run`"
        )
    payload = torch.load(path, weights_only=False)  # our own file: holds RNG tuples and bytes
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unknown checkpoint format {payload.get('format')!r}")
    return RunState(
        server_round=int(payload["server_round"]),
        arrays=_arrays_from_bytes(payload["arrays"]),
        strategy_state=payload["strategy_state"],
        plugin_states=payload["plugin_states"],
        rng_states=payload["rng_states"],
        node_states=payload["node_states"],
    )


def truncate_logs(run_dir: Path, last_round: int) -> None:
    """Keep only rounds ``<= last_round`` in metrics.jsonl and clients.jsonl (atomically)."""
    for name in (METRICS_FILE, CLIENTS_FILE):
        path = Path(run_dir) / name
        if not path.exists():
            continue
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if int(row.get("round", -1)) <= last_round:
                kept.append(line + "\n")
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")


def capture_run_state(
    server_round: int, arrays: ArrayRecord, strategy: Any, plugins: list[Any], grid: Any
) -> RunState:
    """Snapshot after ``server_round``: strategies/grids without state hooks contribute nothing."""
    return RunState(
        server_round=server_round,
        arrays=arrays,
        strategy_state=strategy.state_dict() if hasattr(strategy, "state_dict") else None,
        plugin_states=[p.state() for p in plugins],
        rng_states=capture_rng(),
        node_states=grid.node_states() if hasattr(grid, "node_states") else None,
    )


def restore_run_state(state: RunState, strategy: Any, plugins: list[Any], grid: Any) -> None:
    """Inverse of :func:`capture_run_state` (the arrays are returned by :func:`load_checkpoint`)."""
    if state.strategy_state is not None:
        if not hasattr(strategy, "load_state_dict"):
            raise ValueError(
                f"the checkpoint holds strategy state but {type(strategy).__name__} has no "
                "load_state_dict(); was the run started with a different algorithm?"
            )
        strategy.load_state_dict(state.strategy_state)
    if len(state.plugin_states) != len(plugins):
        raise ValueError(
            f"the checkpoint has {len(state.plugin_states)} plugin states but this scenario builds "
            f"{len(plugins)} plugins; resume with the run folder's own scenario.toml"
        )
    for plugin, plugin_state in zip(plugins, state.plugin_states, strict=True):
        plugin.load_state(plugin_state)
    if state.node_states is not None and hasattr(grid, "load_node_states"):
        grid.load_node_states(state.node_states)
    restore_rng(state.rng_states)
