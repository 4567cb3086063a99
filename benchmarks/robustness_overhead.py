"""What fault tolerance costs per round: reply validation and the checkpoint, against FedAvg's own
aggregation of the same replies. Prints measured times and ratios (no asserts).

    PYTHONPATH=. python benchmarks/robustness_overhead.py [scenarios/quickstart.toml]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity

from clients.data import dataset_info
from clients.models import build_model
from scenarios.config import load_scenario
from server.checkpoint import RunState, capture_rng, save_checkpoint
from server.validation import ReplyValidator


def timed(fn, repeats: int = 20) -> float:
    """Median seconds of ``fn()``."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    scenario = load_scenario(sys.argv[1] if len(sys.argv) > 1 else "scenarios/quickstart.toml")
    info = dataset_info(scenario.data)
    model = build_model(scenario.model, info.input_shape, info.num_classes)
    n = scenario.data.num_clients
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    sent = ArrayRecord(model.state_dict())
    instructions, replies = [], []
    for i in range(n):
        ins = Message(RecordDict({"arrays": sent}), 100 + i, MessageType.TRAIN)
        ins.metadata.__dict__["_message_id"] = f"m{i}"
        noisy = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
        content = RecordDict(
            {"arrays": ArrayRecord(noisy), "metrics": MetricRecord({"num-examples": 100})}
        )
        instructions.append(ins)
        replies.append(Message(content, reply_to=ins))
    validator = ReplyValidator(1e4, 4.0, 1)

    def validate() -> None:
        validator.observe_train_instructions(1, instructions)
        kept, _ = validator.filter_train_replies(1, list(replies))
        assert len(kept) == n

    run_dir = Path(tempfile.mkdtemp(prefix="fedge-bench-"))
    t_validate = timed(validate)
    t_aggregate = timed(
        lambda: aggregate_arrayrecords([r.content for r in replies], "num-examples")
    )
    t_checkpoint = timed(
        lambda: save_checkpoint(run_dir, RunState(1, sent, None, [{}], capture_rng(), None))
    )
    params = sum(p.numel() for p in model.parameters())
    print(f"model {scenario.model.name} {params} parameters, {n} replies per round")
    print(
        f"validate all replies : {1e3 * t_validate:8.2f} ms ({1e3 * t_validate / n:.2f} ms/reply)"
    )
    print(f"FedAvg aggregation   : {1e3 * t_aggregate:8.2f} ms")
    print(f"checkpoint (fsync'd) : {1e3 * t_checkpoint:8.2f} ms")
    print(f"validation / aggregation ratio: {t_validate / t_aggregate:.2f}")


if __name__ == "__main__":
    main()
