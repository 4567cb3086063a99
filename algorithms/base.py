"""What every algorithm declares: its hyperparameters (a pydantic model) and where its two sides live.

An algorithm ``foo`` is one class in ``algorithms/foo.py`` (or in a third-party package, registered
under the ``fedge.algorithms`` entry-point group)::

    class FooConfig(AlgorithmConfig):
        name: Literal["foo"] = "foo"
        server_factory: ClassVar[str] = "server.foo:make_foo"    # ServerSetup -> flwr Strategy
        client_trainer: ClassVar[str] = "clients.foo:train_foo"  # TrainJob -> TrainResult
        step: float = Field(0.1, gt=0)                            # hyperparameters, with defaults

The two sides are named as ``"module:attribute"`` strings, imported only when a run uses the
algorithm, so a FedAvg run never imports LoRA's peft, and this package imports no Flower.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class AlgorithmConfig(BaseModel):
    """Base of an algorithm's declaration; subclasses fix ``name`` and add their hyperparameters."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False
    )  # see scenarios/config.py
    name: str
    server_factory: ClassVar[str] = ""
    client_trainer: ClassVar[str] = ""

    def needs_server_proxy(self) -> bool:
        """Whether the server step needs a proxy set carved from train (``data.proxy_fraction``)."""
        return False
