"""FedProx server: Flower's own strategy (it sends ``proximal-mu``; the client adds the term),
aggregating over the round's stacked updates (``server/stacked_mean.py``)."""

from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Strategy

from server.robust import defended_strategy
from server.stacked_mean import StackedMean
from server.strategies import ServerSetup


class FedProx(StackedMean, flwr_strategy.FedProx):
    """Flower's ``FedProx`` with :class:`StackedMean`'s ``aggregate_train``."""


def make_fedprox(setup: ServerSetup) -> Strategy:
    return defended_strategy(setup, FedProx, proximal_mu=setup.scenario.algorithm.mu)
