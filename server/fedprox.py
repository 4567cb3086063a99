"""FedProx server: Flower's own strategy (it sends ``proximal-mu``; the client adds the term)."""

from flwr.serverapp.strategy import FedProx, Strategy

from server.robust import robust_strategy
from server.strategies import ServerSetup, fedavg_kwargs


def make_fedprox(setup: ServerSetup) -> Strategy:
    mu = setup.scenario.algorithm.mu
    return robust_strategy(setup, proximal_mu=mu) or FedProx(
        proximal_mu=mu, **fedavg_kwargs(setup.scenario)
    )
