"""Checkpoints: the full server-side run state after every round, written atomically.

``checkpoint.pt`` in the run directory holds the round number, the global arrays, the strategy's
state (``strategy.state_dict()`` when the strategy has one: FedLAW weights, cluster models and
assignments, ...), every round plugin's ``state()`` (among them every client's ``Context.state``, e.g.
error-feedback residuals, which clients send back with their replies on every engine: see
``server/client_state.py``), and the Python/NumPy/torch RNG states. Metrics already live in
``metrics.jsonl``/``clients.jsonl``; on resume they are cut back to the checkpointed round.

The file is written to a temporary name and moved into place with ``os.replace``, so a process
killed at any instant leaves either the previous checkpoint or the new one, never half of one.

A checkpoint can never run code: it is ``torch.save`` of ``{"format", "meta", "tensors"}`` where
``meta`` is a JSON string (the plain data: numbers, strings, lists, dicts) and ``tensors`` a dict
of torch tensors (the model arrays, RNG states, clients' state, as raw bytes in uint8 tensors), and it
is read back with ``torch.load(weights_only=True)``, whose unpickler builds only tensors and plain
containers. Anything else (a crafted pickle, a file from an older fedge) is refused with a clear
error instead of being executed.
"""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from scenarios.config import Scenario
from scenarios.results import CLIENTS_FILE, METRICS_FILE, atomic_path, read_jsonl

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 2  # 1: a plain pickle (weights_only=False), refused since it could run code


class CheckpointError(ValueError):
    """An unreadable or refused checkpoint file; the message names the problem and the fix."""


@dataclass
class RunState:
    """Everything needed to continue a run after ``server_round``."""

    server_round: int
    arrays: ArrayRecord
    strategy_state: Any = None
    plugin_states: list[dict] = field(default_factory=list)
    rng_states: dict[str, Any] = field(default_factory=dict)
    # the scenario that wrote it, less what a resume may change (scenario_identity); None in
    # files written before fedge recorded it: then only the arrays are checked on resume
    scenario: dict | None = None


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


# Tagged JSON: every value that JSON cannot hold becomes {TAG: kind, "ref"/"items": ...}; binary
# payloads go to the tensor table so the file stays "tensors + plain data".
TAG = "__fedge__"


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _blob(self, tensor: torch.Tensor) -> str:
        ref = f"t{len(self.tensors)}"
        self.tensors[ref] = tensor
        return ref

    def _bytes(self, raw: bytes) -> str:
        return self._blob(torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()))

    def encode(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, bool | int | float | str):
            return obj
        if isinstance(obj, bytes | bytearray):
            return {TAG: "bytes", "ref": self._bytes(bytes(obj))}
        if isinstance(obj, ArrayRecord):
            return {TAG: "arrayrecord", "ref": self._bytes(_arrays_to_bytes(obj))}
        if isinstance(obj, torch.Tensor):
            return {TAG: "tensor", "ref": self._blob(obj.detach().cpu().clone())}
        if isinstance(obj, np.ndarray):
            return {TAG: "ndarray", "ref": self._blob(torch.from_numpy(np.array(obj)))}
        if isinstance(obj, np.generic):
            return self.encode(obj.item())
        if isinstance(obj, tuple):
            return {TAG: "tuple", "items": [self.encode(v) for v in obj]}
        if isinstance(obj, list):
            return [self.encode(v) for v in obj]
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj) and TAG not in obj:
                return {k: self.encode(v) for k, v in obj.items()}
            # int node ids etc.: keep the key types
            return {
                TAG: "dict",
                "items": [[self.encode(k), self.encode(v)] for k, v in obj.items()],
            }
        raise TypeError(
            f"cannot checkpoint a {type(obj).__name__}: state_dict()/state() must return tensors, "
            "ArrayRecords, numpy arrays, bytes and plain data"
        )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    kind = obj.get(TAG)
    if kind is None:
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in obj["items"])
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["items"]}
    tensor = tensors[obj["ref"]]
    if kind == "tensor":
        return tensor
    if kind == "ndarray":
        return tensor.numpy()
    raw = tensor.numpy().tobytes()
    if kind == "bytes":
        return raw
    if kind == "arrayrecord":
        return _arrays_from_bytes(raw)
    raise ValueError(f"unknown checkpoint entry kind {kind!r}")


def save_checkpoint(run_dir: Path, state: RunState) -> Path:
    """Write ``run_dir/checkpoint.pt`` atomically (temp file + ``os.replace``)."""
    encoder = _Encoder()
    meta = encoder.encode(
        {
            "server_round": state.server_round,
            "arrays": state.arrays,
            "strategy_state": state.strategy_state,
            "plugin_states": state.plugin_states,
            "rng_states": state.rng_states,
            "scenario": state.scenario,
        }
    )
    # allow_nan: Python's json round-trips NaN/inf exactly, and floats via repr bit-exactly
    payload = {"format": FORMAT_VERSION, "meta": json.dumps(meta), "tensors": encoder.tensors}
    path = Path(run_dir) / CHECKPOINT_FILE
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _unreadable(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{path} {problem}. fedge cannot resume from it: start the run again in a new folder with "
        f"`fedge run {path.parent / 'scenario.toml'}` (or restore a good copy of {path.name})"
    )


def load_checkpoint(run_dir: Path) -> RunState:
    """Read ``run_dir/checkpoint.pt`` with ``torch.load(weights_only=True)``: tensors and plain
    data only, so a crafted file cannot execute anything. Clear errors for missing, empty,
    truncated, foreign or tampered files."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint in {run_dir} ({CHECKPOINT_FILE} missing): the run either never finished "
            "a round or ran with robustness.checkpoint=false; start it again with `fedge run`"
        )
    if path.stat().st_size == 0:
        raise _unreadable(path, "is empty (the disk filled up or the file was cut)")
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        # weights_only refuses any global it does not know: what a code-running pickle needs.
        # PyTorch's own message suggests loading it unsafely, i.e. running the file: not quoted
        raise _unreadable(
            path,
            "holds Python objects other than tensors and plain data, so it was refused unread "
            f"(a tampered file, or one written by fedge before checkpoint format {FORMAT_VERSION}); "
            "do not load it by other means: unpickling it in full could run code it carries",
        ) from None
    except Exception as err:  # zip/stream errors of a truncated or random file, EOFError, ...
        said = str(err).splitlines()[0][:200] if str(err) else ""
        if "weights_only" in said:  # never pass on PyTorch's hint to load the file unsafely
            said = "refused by the safe loader"
        raise _unreadable(
            path,
            f"is not a readable checkpoint (truncated or corrupt: {type(err).__name__}: {said})",
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise _unreadable(path, f"has checkpoint format {found!r}, expected {FORMAT_VERSION}")
    try:
        tensors = payload["tensors"]
        data = _decode(json.loads(payload["meta"]), tensors)
        return RunState(
            server_round=int(data["server_round"]),
            arrays=data["arrays"],
            strategy_state=data["strategy_state"],
            plugin_states=data["plugin_states"],
            rng_states=data["rng_states"],
            scenario=data.get("scenario"),
        )
    except Exception as err:  # a well-formed zip with the wrong inside
        raise _unreadable(path, f"has a damaged layout ({type(err).__name__}: {err})") from None


# What a resume may change: the run's name and folder, where it runs, and how long it goes on.
RESUMABLE_CHANGES = frozenset({"name", "output_dir", "engine", "num_rounds"})


def scenario_identity(scenario: Scenario) -> dict:
    """The scenario as plain data, less :data:`RESUMABLE_CHANGES`: what a checkpoint records and
    a resume must match (the same data, model, algorithm, training, defences, seed ...)."""
    data = json.loads(scenario.model_dump_json(exclude_none=True))
    return {k: v for k, v in data.items() if k not in RESUMABLE_CHANGES}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _scenario_differences(saved: dict, current: dict) -> list[str]:
    old, new = _flatten(saved), _flatten(current)
    return [
        f"{key}: checkpoint {old.get(key, '(unset)')!r}, this run {new.get(key, '(unset)')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key, "(unset)") != new.get(key, "(unset)")
    ]


def _array_differences(saved: ArrayRecord, current: ArrayRecord) -> list[str]:
    diffs = [f"parameter {name!r} only in the checkpoint" for name in saved if name not in current]
    diffs += [
        f"parameter {name!r} missing from the checkpoint" for name in current if name not in saved
    ]
    for name in (n for n in current if n in saved):
        got, want = saved[name], current[name]
        if list(got.shape) != list(want.shape) or got.dtype != want.dtype:
            diffs.append(
                f"parameter {name!r}: checkpoint {got.dtype}{list(got.shape)}, "
                f"this model {want.dtype}{list(want.shape)}"
            )
    return diffs


def check_resume_fits(
    run_dir: Path, state: RunState, scenario: Scenario, arrays: ArrayRecord
) -> None:
    """Refuse (``CheckpointError``) a checkpoint that does not belong to this run, before the
    resume changes anything: another scenario (other than :data:`RESUMABLE_CHANGES`), other
    parameter names, shapes or dtypes than ``arrays`` (the model this scenario builds), or a round
    past ``num_rounds``. The message lists what differs (at most 8 lines) and what to do."""
    diffs: list[str] = []
    if state.scenario is not None:
        diffs += _scenario_differences(state.scenario, scenario_identity(scenario))
    diffs += _array_differences(state.arrays, arrays)
    path = Path(run_dir) / CHECKPOINT_FILE
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs) - 8} more)" if len(diffs) > 8 else "")
        raise CheckpointError(
            f"{path} does not belong to this run ({shown}). Nothing in {run_dir} was changed. "
            f"Resume with the scenario.toml this run was started with (only {', '.join(sorted(RESUMABLE_CHANGES))} "
            "may differ), restore the run's own checkpoint.pt, or start a new run with `fedge run "
            "SCENARIO`"
        )
    if state.server_round > scenario.num_rounds:
        raise CheckpointError(
            f"{path} is after round {state.server_round} but the scenario has num_rounds="
            f"{scenario.num_rounds}. Nothing in {run_dir} was changed. Set num_rounds >= "
            f"{state.server_round} in {Path(run_dir) / 'scenario.toml'} to go on"
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


def logged_rounds(run_dir: Path) -> list[int]:
    """Training rounds (>= 1) already in ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rounds = [int(r.get("round", -1)) for r in read_jsonl(path)]
    return sorted(r for r in rounds if r >= 1)


def wall_time_until(run_dir: Path, last_round: int) -> float:
    """``cumulative_wall_time_s`` of ``last_round`` in ``metrics.jsonl`` (0 if absent): a resumed
    run continues the clock from there, so its summary counts the whole run's wall time."""
    path = Path(run_dir) / METRICS_FILE
    rows = [r for r in read_jsonl(path) if r.get("round") == last_round] if path.is_file() else []
    value = rows[-1].get("cumulative_wall_time_s") if rows else None
    return float(value) if isinstance(value, int | float) else 0.0


def capture_run_state(
    server_round: int,
    arrays: ArrayRecord,
    strategy: Any,
    plugins: list[Any],
    scenario: dict | None = None,
) -> RunState:
    """Snapshot after ``server_round``: strategies without state hooks contribute nothing; the
    clients' ``Context.state`` travels in the plugin states (``server/client_state.py``);
    ``scenario`` is :func:`scenario_identity` of the run, checked on resume."""
    return RunState(
        server_round=server_round,
        arrays=arrays,
        strategy_state=strategy.state_dict() if hasattr(strategy, "state_dict") else None,
        plugin_states=[p.state() for p in plugins],
        rng_states=capture_rng(),
        scenario=scenario,
    )


def restore_run_state(state: RunState, strategy: Any, plugins: list[Any]) -> None:
    """Inverse of :func:`capture_run_state` (the arrays are returned by :func:`load_checkpoint`).
    State that does not fit this run's strategy or plugins is a ``CheckpointError``, not a
    traceback; nothing on disk has changed when it is raised."""
    if state.strategy_state is not None and not hasattr(strategy, "load_state_dict"):
        raise CheckpointError(
            f"the checkpoint holds strategy state but {type(strategy).__name__} has no "
            "load_state_dict(); was the run started with a different algorithm?"
        )
    if len(state.plugin_states) != len(plugins):
        raise CheckpointError(
            f"the checkpoint has {len(state.plugin_states)} plugin states but this scenario builds "
            f"{len(plugins)} plugins; resume with the run folder's own scenario.toml"
        )
    try:
        if state.strategy_state is not None:
            strategy.load_state_dict(state.strategy_state)
        for plugin, plugin_state in zip(plugins, state.plugin_states, strict=True):
            plugin.load_state(plugin_state)
        restore_rng(state.rng_states)
    except Exception as err:  # a foreign or edited checkpoint: say so, no traceback
        raise CheckpointError(
            f"the checkpoint's saved state does not fit this run's {type(strategy).__name__} "
            f"({type(err).__name__}: {str(err)[:300]}); resume with the run folder's own "
            "scenario.toml and checkpoint, or start a new run with `fedge run SCENARIO`"
        ) from None
