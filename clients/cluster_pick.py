"""Client side of the IFCA rule: given several cluster models, keep the lowest-loss one.

The server (``server/cluster_base.py``) puts the candidates in one instruction: ``arrays`` holds
cluster ``cluster-ids[0]`` and ``cluster-model-<id>`` every other cluster in ``cluster-ids``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from algorithms.clustering import assign_lowest_loss
from clients.training import TrainJob, evaluate

CLUSTER_IDS_KEY = "cluster-ids"
CLUSTER_ID_KEY = "cluster-id"
CANDIDATE_PREFIX = "cluster-model-"


def candidate_models(content: RecordDict | None, config) -> dict[int, ArrayRecord]:
    """Cluster id -> model for every candidate in the instruction (empty when there is one model)."""
    if content is None or CLUSTER_IDS_KEY not in config:
        return {}
    ids = [int(c) for c in config[CLUSTER_IDS_KEY]]
    out = {ids[0]: content["arrays"]}
    for cid in ids[1:]:
        key = f"{CANDIDATE_PREFIX}{cid}"
        if key not in content:
            raise KeyError(f"instruction lists cluster {cid} but carries no {key!r} record")
        out[cid] = content[key]
    return out


NO_CLUSTER = -1  # reported before any clustering (Flower wants the same metric keys from all)


def pick_cluster(job: TrainJob) -> int:
    """Load the candidate model with the lowest loss on the local train split into ``job.model``;
    return its cluster id. With a single model: the ``cluster-id`` the server sent, else -1."""
    candidates = candidate_models(job.received, job.config)
    if not candidates:
        return int(job.config.get(CLUSTER_ID_KEY, NO_CLUSTER))
    ids = list(candidates)
    losses = []
    for cid in ids:
        job.model.load_state_dict(candidates[cid].to_torch_state_dict())
        losses.append(evaluate(job.model, job.data.x_train, job.data.y_train, job.device)[0])
    chosen = ids[int(assign_lowest_loss(np.array(losses))[0])]
    job.model.load_state_dict(candidates[chosen].to_torch_state_dict())
    return chosen
