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

What other layers need to know about an algorithm is a capability declared here, never its name
tested elsewhere; the defaults are the conservative answers, so a third-party algorithm that
declares nothing is trained one client at a time, gets no robust rule and no sparse replies:

- ``packable``: its ``client_trainer`` declares its local step as a ``LocalPlan``
  (``clients/training.py::plan_trainer``), which the packed engine trains many clients at once;
- ``fedavg_aggregation``: its server averages replies with FedAvg's weighted mean, which a robust
  rule (``[robustness] aggregation``) or Flower's DP clipping wrapper can replace;
- ``sparse_replies``: its clients reply sparse LoRA packets instead of dense models (the reply
  validator decodes them; attacks, which rewrite dense models, refuse the run);
- ``edge_export``: its runs are edge runs, which export the final model to ONNX like runs with
  ``[edge] trainers``.
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
    packable: ClassVar[bool] = False
    fedavg_aggregation: ClassVar[bool] = False
    sparse_replies: ClassVar[bool] = False
    edge_export: ClassVar[bool] = False

    def needs_server_proxy(self) -> bool:
        """Whether the server step needs a proxy set carved from train (``data.proxy_fraction``)."""
        return False
