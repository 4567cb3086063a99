"""What the server reports about a concept-shift federation (``data.concept_shift``).

* :func:`group_central_eval`: each round, the global arrays' accuracy on the central test set as
  each planted group sees it (``central_accuracy_group<g>`` in ``metrics.jsonl``; group 0's is
  ``central_accuracy``, the untransformed set).
* :func:`planted_ari`: the adjusted Rand index between the clusters a clustered strategy found
  and the planted groups (``planted_ari`` in ``metrics.jsonl`` and ``clusters.jsonl``).
* :func:`group_summary`: the headline numbers per group for ``summary.json``: the last round's
  ``central_accuracy_group<g>``, and the unweighted mean over each group's clients of their
  local test accuracy before (``local_accuracy_mean_group<g>``) and after fine-tuning
  (``personalized_accuracy_mean_group<g>``) in the last evaluated round; ``planted_ari`` of the
  last round that had clusters.

Each client's group is written to ``clients.jsonl`` (``group``) by ``server/robust.py``'s writer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from clients.concept_shift import client_groups
from clients.data import load_group_tests
from clients.training import evaluate
from scenarios.config import Scenario
from scenarios.results import CLIENTS_FILE, METRICS_FILE, read_jsonl
from server.personalization import client_accuracies

PLANTED_ARI = "planted_ari"


def group_key(name: str, group: int) -> str:
    return f"{name}_group{group}"


def group_central_eval(
    scenario: Scenario, model: torch.nn.Module, device: torch.device
) -> Callable[[], dict[str, float]] | None:
    """``() -> {central_accuracy_group<g>: accuracy}`` of ``model`` as it is when called; None
    when the scenario has no concept shift."""
    if scenario.data.concept_shift == "none":
        return None
    tests = load_group_tests(scenario.data, scenario.seed)

    def per_group() -> dict[str, float]:
        return {
            group_key("central_accuracy", g): evaluate(model, x, y, device)[1]
            for g, (x, y) in enumerate(tests)
        }

    return per_group


def planted_ari(scenario: Scenario, assignment: dict[int, int]) -> float | None:
    """ARI between ``assignment`` (partition id -> cluster) and the planted groups, over the
    assigned clients; None without a concept shift or with fewer than two assigned clients."""
    if scenario.data.concept_shift == "none" or len(assignment) < 2:
        return None
    groups = client_groups(scenario.data)
    pids = sorted(assignment)
    return float(adjusted_rand_score(groups[pids], [assignment[p] for p in pids]))


def group_summary(run_dir: Path, scenario: Scenario) -> dict[str, float]:
    """Per-group headline numbers of a finished run (see the module docstring); {} without a
    concept shift."""
    if scenario.data.concept_shift == "none":
        return {}
    out: dict[str, float] = {}
    rounds = sorted(read_jsonl(Path(run_dir) / METRICS_FILE), key=lambda r: r["round"])
    num_groups = scenario.data.num_groups
    for record in rounds:
        for g in range(num_groups):
            key = group_key("central_accuracy", g)
            if isinstance(record.get(key), int | float):
                out[key] = float(record[key])
        if isinstance(record.get(PLANTED_ARI), int | float):
            out[PLANTED_ARI] = float(record[PLANTED_ARI])
    clients_file = Path(run_dir) / CLIENTS_FILE
    rows = read_jsonl(clients_file) if clients_file.is_file() else []
    groups = client_groups(scenario.data)
    for name in ("local_accuracy", "personalized_accuracy"):
        _, per_client = client_accuracies(rows, name)
        for g in range(num_groups):
            values = [v for pid, v in per_client.items() if groups[pid] == g]
            if values:
                out[group_key(f"{name}_mean", g)] = float(np.mean(values))
    return out
