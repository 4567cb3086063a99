"""Peak training memory of one step: backprop vs tpSGD, LoRA and forward-forward, same model and batch.

Run: ``PYTHONPATH=. python benchmarks/edge_memory.py``  (prints a table, BP vs each trainer).
The measurement itself is ``edge.memory.measure_training_memory`` (also used by the device
profiles' memory check).
"""

from __future__ import annotations

import torch

from edge.memory import measure_training_memory


def main() -> None:
    from clients.models import build_model
    from scenarios.config import ModelConfig

    torch.manual_seed(0)
    rows = []
    for dataset, shape in (("mnist1d", (40,)), ("digits", (1, 8, 8))):
        for hidden in ([256, 256], [512, 512, 512]):
            x = torch.randn(256, *shape)
            y = torch.randint(0, 10, (256,))
            mlp = build_model(ModelConfig(name="mlp", hidden=hidden), shape, 10)
            ff = build_model(ModelConfig(name="ff_mlp", hidden=hidden), shape, 10)
            bp = measure_training_memory("backprop", mlp, x, y)
            for trainer, model in (
                ("backprop", mlp),
                ("tpsgd", mlp),
                ("lora", mlp),
                ("forward_forward", ff),
            ):
                r = measure_training_memory(trainer, model, x, y)
                rows.append(
                    (
                        dataset,
                        hidden,
                        r,
                        r.peak_bytes / bp.peak_bytes,
                        r.activation_bytes / max(bp.activation_bytes, 1),
                    )
                )
    print(
        "| data | hidden | trainer | peak KiB | params KiB | grads KiB | activations KiB | peak / BP | act / BP |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for dataset, hidden, r, ratio, act_ratio in rows:
        print(
            f"| {dataset} | {hidden} | {r.trainer} | {r.peak_bytes / 1024:.0f} | "
            f"{r.param_bytes / 1024:.0f} | {r.grad_bytes / 1024:.0f} | "
            f"{r.activation_bytes / 1024:.0f} | {ratio:.2f} | {act_ratio:.2f} |"
        )
    print(f"(batch 256, CPU, method: {rows[0][2].method})")


if __name__ == "__main__":
    main()
