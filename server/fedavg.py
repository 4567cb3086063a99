"""FedAvg server: Flower's own strategy, configured from the scenario."""

from flwr.serverapp.strategy import FedAvg, Strategy

from server.robust import defended_strategy
from server.strategies import ServerSetup


def make_fedavg(setup: ServerSetup) -> Strategy:
    return defended_strategy(setup, FedAvg)
