"""FedProx server: Flower's own strategy (it sends ``proximal-mu``; the client adds the term)."""

from flwr.serverapp.strategy import FedProx, Strategy

from server.strategies import ServerSetup, fedavg_kwargs


def make_fedprox(setup: ServerSetup) -> Strategy:
    return FedProx(proximal_mu=setup.scenario.algorithm.mu, **fedavg_kwargs(setup.scenario))
