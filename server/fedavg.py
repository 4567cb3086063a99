"""FedAvg server: Flower's own strategy, configured from the scenario."""

from flwr.serverapp.strategy import FedAvg, Strategy

from server.strategies import ServerSetup, fedavg_kwargs


def make_fedavg(setup: ServerSetup) -> Strategy:
    return FedAvg(**fedavg_kwargs(setup.scenario))
