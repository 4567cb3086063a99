"""Test-wide offline Flower environment: no telemetry, no update check, no runtime installs, temp homes."""

import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="fedge-tests-")
os.environ.update(
    {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_HOME": os.path.join(_HOME, "flwr"),
        "HF_HOME": os.path.join(_HOME, "hf"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "RAY_DEDUP_LOGS": "0",
        # Every Ray runtime a test starts is private: unset, ray.init() joins whatever cluster
        # `ray start` last left on the machine (its address file outlives the cluster, and a dead
        # one hangs the run). Tests of engine.ray_address pass their own.
        "RAY_ADDRESS": "local",
    }
)
