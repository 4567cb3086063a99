"""ONNX Runtime vs eager torch latency (batch 1 and 64), fp32/int8 model sizes, int8 accuracy drop.

Each model is first trained for a few epochs on digits (mnist1d for cnn1d) by its trainer so the
int8 accuracy drop is measured on a real model. Run: ``PYTHONPATH=. python benchmarks/onnx_latency.py``
"""

from __future__ import annotations

import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from clients.data import dataset_info, load_central_test, load_client_data
from clients.models import build_model
from clients.trainers import get_trainer
from clients.training import TrainJob
from edge.export import export_onnx, run_onnx, session
from scenarios.config import validate_scenario

CASES = [  # (dataset, model, trainer)
    ("digits", "mlp", "fedavg"),
    ("digits", "mlp", "tpsgd"),
    ("digits", "cnn2d", "tpsgd"),
    ("mnist1d", "cnn1d", "fedavg"),
    ("digits", "ff_mlp", "forward_forward"),
]


def median_ms(fn, arg, repeats: int) -> float:
    """Median wall time of ``fn(arg)`` in milliseconds (after one warm-up call)."""
    fn(arg)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print(
        "| data | model | trainer | exporter | fp32 KiB | int8 KiB | acc torch | acc ORT fp32 | acc int8 | "
        "torch b1 ms | ORT b1 ms | torch b64 ms | ORT b64 ms | ORT int8 b64 ms |"
    )
    print("|" + "---|" * 14)
    for dataset, model_name, trainer in CASES:
        sc = validate_scenario(
            {
                "data": {"dataset": dataset, "num_clients": 1},
                "model": {"name": model_name, "hidden": [128, 128]},
                "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
            }
        )
        info = dataset_info(sc.data)
        torch.manual_seed(0)
        model = build_model(sc.model, info.input_shape, info.num_classes)
        data = load_client_data(sc.data, 0, 0)
        for epoch in range(5):
            gen = torch.Generator().manual_seed(epoch)
            get_trainer(trainer)(
                TrainJob(model, data, sc, ConfigRecord(), RecordDict(), gen, torch.device("cpu"))
            )
        model.eval()
        x, y = load_central_test(sc.data, 0)
        out = Path(tempfile.mkdtemp()) / "model.onnx"
        res = export_onnx(model, torch.from_numpy(x[:2]), out)
        fp32, int8 = session(res.fp32_path), session(res.int8_path)
        with torch.no_grad():
            acc_torch = float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
        acc_fp32 = float((run_onnx(fp32, x).argmax(1) == y).mean())
        acc_int8 = float((run_onnx(int8, x).argmax(1) == y).mean())
        x1, x64 = x[:1], x[:64]
        t1, t64 = torch.from_numpy(x1), torch.from_numpy(x64)
        with torch.no_grad():
            torch_b1 = median_ms(model, t1, 200)
            torch_b64 = median_ms(model, t64, 100)
        ort_b1 = median_ms(partial(run_onnx, fp32), x1, 200)
        ort_b64 = median_ms(partial(run_onnx, fp32), x64, 100)
        int8_b64 = median_ms(partial(run_onnx, int8), x64, 100)
        print(
            f"| {dataset} | {model_name} | {trainer} | {res.exporter} | {res.fp32_bytes / 1024:.1f} | "
            f"{res.int8_bytes / 1024:.1f} | {acc_torch:.3f} | {acc_fp32:.3f} | {acc_int8:.3f} | "
            f"{torch_b1:.3f} | {ort_b1:.3f} | {torch_b64:.3f} | {ort_b64:.3f} | {int8_b64:.3f} |",
            flush=True,
        )
    print("(1 torch thread, ORT CPUExecutionProvider defaults, median latency; 5 local epochs)")


if __name__ == "__main__":
    main()
