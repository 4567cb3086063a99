"""Home of every algorithm's hyperparameters: one pydantic model per algorithm, found by name."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

ALGORITHM_CONFIGS: dict[str, type[AlgorithmConfig]] = {}


class AlgorithmConfig(BaseModel):
    """Base of an algorithm's hyperparameters; subclasses fix ``name`` and add their own fields."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False
    )  # see scenarios/config.py
    name: str

    def needs_server_proxy(self) -> bool:
        """Whether the server step needs a proxy set carved from train (``data.proxy_fraction``)."""
        return False


def register_algorithm(cls: type[AlgorithmConfig]) -> type[AlgorithmConfig]:
    """Class decorator: make ``cls`` selectable as ``[algorithm] name = "<its name>"``."""
    name = cls.model_fields["name"].default
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} must give `name` a string default")
    ALGORITHM_CONFIGS[name] = cls
    return cls
