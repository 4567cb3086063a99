"""FedProx server: Flower's own strategy (it sends ``proximal-mu``; the client adds the term)."""

from flwr.serverapp.strategy import FedProx, Strategy

from server.robust import defended_strategy
from server.strategies import ServerSetup


def make_fedprox(setup: ServerSetup) -> Strategy:
    return defended_strategy(setup, FedProx, proximal_mu=setup.scenario.algorithm.mu)
