"""Per-FedAvg server: Flower's own FedAvg (the meta objective lives in the client)."""

from flwr.serverapp.strategy import FedAvg, Strategy

from server.strategies import ServerSetup, fedavg_kwargs


def make_perfedavg(setup: ServerSetup) -> Strategy:
    return FedAvg(**fedavg_kwargs(setup.scenario))
