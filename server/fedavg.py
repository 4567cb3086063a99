"""FedAvg server: Flower's own strategy, configured from the scenario, aggregating over the round's
stacked updates (``server/stacked_mean.py``: Flower's weighted mean, same bits, less per reply)."""

from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Strategy

from server.robust import defended_strategy
from server.stacked_mean import StackedMean
from server.strategies import ServerSetup


class FedAvg(StackedMean, flwr_strategy.FedAvg):
    """Flower's ``FedAvg`` with :class:`StackedMean`'s ``aggregate_train``."""


def make_fedavg(setup: ServerSetup) -> Strategy:
    return defended_strategy(setup, FedAvg)
