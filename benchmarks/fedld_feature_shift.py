"""FedLD vs FedAvg in a setting close to the paper's: few sites, feature shift, pretrained backbone.

The FedLD paper (Zeng et al., MICCAI 2024) reports its gains on a few medical sites whose images
differ in appearance (feature shift), fine-tuning pretrained networks. A CPU-sized stand-in:

* 4 sites from sklearn digits (8×8, ÷16): the same label mix (IID) but each site sees its own
  appearance — identity, low contrast (0.5·x + 0.25), Gaussian noise (σ 0.2, fixed per image),
  horizontal mirror. Every site keeps 20 % of its images as its test split.
* A small CNN with batch norm (conv16-BN-ReLU, conv32-BN-ReLU, mean-pool, linear) **pretrained**
  centrally on 15 % of the images (unshifted) for 20 epochs; during federated training the
  batch-norm statistics stay **frozen** (BN layers in eval mode; their affine weights train).
* The authors' local settings — SGD momentum 0.5, weight decay 5e-4, batch 50, 5 local epochs —
  except the learning rate: 0.001 (``--lr``; at the authors' 0.01 local training with frozen
  batch-norm statistics *lowers* this small net's own training accuracy, 0.78 → 0.41 on site 0,
  while 0.001 raises it to 0.89); FedLD with the margin term λ = 0.1 and principal-gradient aggregation (k_prop 0.8, first
  round = mean, BN buffers plain-averaged); ablation: aggregation only (λ = 0).

Reported: mean over sites of each site's test accuracy after ``--rounds`` rounds, mean ± sample std
(n − 1) over seeds. The federation is simulated directly with ``algorithms/fedld.py`` (no Flower round trip).

Run: ``PYTHONPATH=. python benchmarks/fedld_feature_shift.py [--rounds 20 --seeds 0,1,2]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from algorithms.fedld import fedld_aggregate_state, margin_control_loss
from scenarios.stats import format_mean_std, std_caption

NUM_SITES = 4


def shifts(x: np.ndarray, site: int, rng: np.random.Generator) -> np.ndarray:
    if site == 1:
        return 0.5 * x + 0.25
    if site == 2:
        return np.clip(x + rng.normal(0.0, 0.2, x.shape), 0.0, 1.0)
    if site == 3:
        return x[..., ::-1].copy()
    return x


def make_data(seed: int):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_pre = int(0.15 * len(x))
    pre = order[:n_pre]
    sites = np.array_split(order[n_pre:], NUM_SITES)
    out = []
    for site, idx in enumerate(sites):
        xs = shifts(x[idx], site, rng).astype(np.float32)
        cut = int(0.8 * len(idx))
        out.append(
            (
                torch.from_numpy(xs[:cut]),
                torch.from_numpy(y[idx][:cut]),
                torch.from_numpy(xs[cut:]),
                torch.from_numpy(y[idx][cut:]),
            )
        )
    return (torch.from_numpy(x[pre]), torch.from_numpy(y[pre])), out


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def freeze_bn_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # running statistics stay as pretrained; affine weights still train


def train(model, x, y, epochs, lr, momentum, wd, lam, gen, frozen_bn=True) -> None:
    model.train()
    if frozen_bn:
        freeze_bn_stats(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 50):
            idx = order[start : start + 50]
            opt.zero_grad()
            margin_control_loss(model(x[idx]), y[idx], lam).backward()
            opt.step()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def run(method: str, seed: int, rounds: int, lr: float) -> tuple[float, float]:
    """(mean site test accuracy of the pretrained backbone, the same after ``rounds``)."""
    torch.manual_seed(seed)
    (xp, yp), sites = make_data(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SmallCNN()
    train(model, xp, yp, 20, 0.05, 0.9, 5e-4, 0.0, gen, frozen_bn=False)  # the pretrained backbone
    before = statistics.fmean(accuracy(model, xte, yte) for _, _, xte, yte in sites)
    lam = 0.1 if method == "FedLD" else 0.0
    buffers = {n for n, _ in model.named_buffers()}
    for rnd in range(1, rounds + 1):
        base = {k: v.clone() for k, v in model.state_dict().items()}
        states, counts = [], []
        for xtr, ytr, _, _ in sites:
            local = copy.deepcopy(model)
            train(local, xtr, ytr, 5, lr, 0.5, 5e-4, lam, gen)
            states.append(local.state_dict())
            counts.append(len(xtr))
        if method == "FedAvg":
            total = sum(counts)
            new = {
                k: sum(s[k].double() * c for s, c in zip(states, counts, strict=True)) / total
                for k in base
            }
            new = {k: v.to(base[k].dtype) for k, v in new.items()}
        else:
            new = fedld_aggregate_state(base, states, 0.8, 1.0, rnd == 1, buffers)
        model.load_state_dict(new)
    return before, statistics.fmean(accuracy(model, xte, yte) for _, _, xte, yte in sites)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr", type=float, default=0.001)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    print(
        f"| method | pretrained backbone | after federation ({std_caption(len(seeds))}) | per seed |"
    )
    print("|---|---|---|---|")
    for method in ("FedAvg", "FedLD", "FedLD aggregation-only"):
        results = [run(method, s, args.rounds, args.lr) for s in seeds]
        accs = [a for _, a in results]
        print(
            f"| {method} | {statistics.fmean(b for b, _ in results):.4f} | "
            f"{format_mean_std(accs, digits=4)} | {' / '.join(f'{a:.3f}' for a in accs)} |",
            flush=True,
        )
    print(
        f"({NUM_SITES} sites, {args.rounds} rounds, local lr {args.lr}, seeds {seeds}; "
        f"{time.time() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
