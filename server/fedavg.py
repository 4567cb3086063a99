"""FedAvg server: Flower's own strategy, configured from the scenario."""

from flwr.serverapp.strategy import FedAvg, Strategy

from server.robust import robust_strategy
from server.strategies import ServerSetup, fedavg_kwargs


def make_fedavg(setup: ServerSetup) -> Strategy:
    return robust_strategy(setup) or FedAvg(**fedavg_kwargs(setup.scenario))
