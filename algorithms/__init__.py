"""Framework-free math of fedge's algorithms (no Flower imports here).

Importing this package registers every algorithm's hyperparameter model in ``ALGORITHM_CONFIGS``.
"""

from algorithms import (  # noqa: F401  (registration side effect)
    cfl,
    clustered,
    fedavg,
    fedlaw,
    fedld,
    fedprox,
    ifca,
    lora_sparse,
    perfedavg,
)
from algorithms.base import ALGORITHM_CONFIGS, AlgorithmConfig, register_algorithm

__all__ = ["ALGORITHM_CONFIGS", "AlgorithmConfig", "register_algorithm"]
