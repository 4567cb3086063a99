"""Per-FedAvg (first-order) client: ``train.epochs`` epochs of Per-FedAvg-FO steps over batch pairs."""

from clients.training import LocalPlan, TrainJob, plan_trainer


def perfedavg_plan(job: TrainJob) -> LocalPlan:
    algo = job.scenario.algorithm
    return LocalPlan(rule="perfedavg_fo", meta_steps=(algo.perfedavg_alpha, algo.perfedavg_beta))


train_perfedavg = plan_trainer(perfedavg_plan)
