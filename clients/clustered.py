"""Clustered-personalization client.

Warm-up rounds (config ``warmup`` = True): plain local SGD, so the updates the server clusters are
FedAvg updates from one global model. Afterwards, per ``algorithm.meta``:

* ``reptile`` (default): the member is one *task*: k = ``reptile_inner_steps`` plain SGD steps
  (lr ``reptile_inner_lr``) from the cluster model; the Reptile outer step ε happens on the server,
  across the cluster's members (``server/clustered.py``);
* ``perfedavg``: first-order Per-FedAvg on the client (its meta step is per client by design);
* ``none``: plain local SGD.

A client the server has not placed yet receives every cluster model and keeps the lowest-loss one
(IFCA rule).
"""

from clients.cluster_pick import CLUSTER_ID_KEY, pick_cluster
from clients.training import LocalPlan, TrainJob, plan_trainer

WARMUP_KEY = "warmup"


def clustered_plan(job: TrainJob) -> LocalPlan:
    chosen = {CLUSTER_ID_KEY: pick_cluster(job)}
    algo = job.scenario.algorithm
    if bool(job.config.get(WARMUP_KEY, False)) or algo.meta == "none":
        return LocalPlan(metrics=chosen)
    if algo.meta == "reptile":  # the task's inner loop; the outer step ε is the server's
        steps = algo.reptile_inner_steps
        if "max-local-steps" in job.config:  # a slow device's cap (virtual clock) still holds
            steps = min(steps, int(job.config["max-local-steps"]))
        inner = job.scenario.train.model_copy(
            update={
                "lr": algo.reptile_inner_lr,
                "momentum": 0.0,
                "weight_decay": 0.0,
                "epochs": steps,  # k steps even when the split holds fewer than k batches
            }
        )
        return LocalPlan(cfg=inner, max_steps=steps, metrics=chosen)
    return LocalPlan(
        rule="perfedavg_fo",
        meta_steps=(algo.perfedavg_alpha, algo.perfedavg_beta),
        metrics=chosen,
    )


train_clustered = plan_trainer(clustered_plan)
