"""Capture the round's update stacks of a few runs, then score direction-check variants on them.

    PYTHONPATH=. nice python benchmarks/direction_stacks.py --capture   # writes /tmp stacks
    PYTHONPATH=. python benchmarks/direction_stacks.py --score

The capture runs each case with fedge's defaults (no direction check), recording per round the
updates (after the reply validator) and which rows are attackers; the score step counts, per
variant (reference x threshold), the share of honest updates excluded (false exclusions) and of
attacker updates excluded (detections). Used to choose ``robustness.direction_threshold``.

    PYTHONPATH=. nice python benchmarks/direction_stacks.py --score --variants all \
        --thresholds=0,-0.1,-0.2

simulates each variant round by round instead (``score_variants``: its own previous aggregate,
the live cap of (n - 1) // 2 exclusions) and prints one table per threshold: median, prev (the
previous aggregate), both (below against both: ``robustness.direction_reference = "both"``),
either, half-median (the median of the half closest to the median), both-half, knnK (mean
cosine with the K most aligned others). The stacks come from runs *without* the check, so the
'prev' variants' detections can be pessimistic: attackers aggregated in the captured run
pull its later updates their way.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import tempfile
from pathlib import Path

import torch

import server.setup as setup_module
from benchmarks.robustness import QUICKSTART, grid_scenario
from clients.identity import reply_partition_id
from fedge.engines import run_engine
from scenarios.config import load_scenario
from server.plugins import RoundPlugin
from server.update_stack import group_updates

OUT = Path("/tmp/direction_stacks")


class Capture(RoundPlugin):
    def __init__(self, attackers: set[int]) -> None:
        self.attackers = attackers
        self.rounds: list[dict] = []
        self._sent = {}

    def observe_train_instructions(self, server_round, instructions):
        self._sent = {m.metadata.dst_node_id: m.content for m in instructions}

    def filter_train_replies(self, server_round, replies):
        for group in group_updates(replies, self._sent):
            pids = [reply_partition_id(replies[i]) for i in group.indices]
            self.rounds.append(
                {
                    "round": server_round,
                    "updates": group.updates.float(),
                    "attacker": torch.tensor([p in self.attackers for p in pids]),
                }
            )
        return replies, {}


def cases() -> dict[str, tuple]:
    out = {}
    for seed in (0, 1, 2):
        out[f"quickstart-clean-{seed}"] = ("q", [], seed, set())
    for kind in ("sign_flip", "ipm", "alie"):
        out[f"quickstart-{kind}-0"] = (
            "q",
            [f"attack.kind={kind}", "attack.clients=[0, 1]"],
            0,
            {0, 1},
        )
    for alpha in (0.5, 0.1):
        for seed in (0, 1, 2):
            out[f"digits{alpha}-clean-{seed}"] = ("g", (alpha, "none", 0), seed, set())
        for seed in (0, 1):
            for kind in ("sign_flip", "ipm", "alie"):
                out[f"digits{alpha}-{kind}-{seed}"] = ("g", (alpha, kind, 2), seed, {0, 1})
    return out


def capture(names: list[str]) -> None:
    OUT.mkdir(exist_ok=True)
    original = setup_module.build_plugins
    for name, (kind, spec, seed, attackers) in cases().items():
        if names and name not in names:
            continue
        path = OUT / f"{name}.pt"
        if path.exists():
            continue
        cap = Capture(attackers)
        setup_module.build_plugins = lambda s, cap=cap: [*original(s), cap]
        with tempfile.TemporaryDirectory() as tmp:
            if kind == "q":
                extra = [f"seed={seed}", "robustness.checkpoint=false", f"output_dir={tmp}"]
                sc = load_scenario(QUICKSTART, spec + extra)
            else:
                sc = grid_scenario(
                    10, spec[0], spec[1], spec[2], "norm bound + cap", seed, Path(tmp)
                )
            with contextlib.redirect_stdout(io.StringIO()):
                summary = run_engine(sc, Path(tmp) / "run", show_progress=False)
        torch.save(cap.rounds, path)
        print(
            f"{name}: {100 * summary['final_accuracy']:.1f}% ({len(cap.rounds)} rounds)", flush=True
        )
    setup_module.build_plugins = original


def coordinate_median(u):
    return u.median(dim=0).values


def loo_mean(u):
    n = u.shape[0]
    return (u.sum(0, keepdim=True) - u) / (n - 1)


def cosines(u, ref):
    if ref.dim() == 1:
        ref = ref.expand_as(u)
    return (u * ref).sum(1) / (u.norm(dim=1) * ref.norm(dim=1)).clamp_min(1e-30)


def body_of(stem: str) -> int:
    """The body size (server/preaggregation.py's body_size) of the case's model."""
    from clients.data import dataset_info
    from clients.models import build_model
    from server.preaggregation import body_size

    with tempfile.TemporaryDirectory() as tmp:
        if stem.startswith("quickstart"):
            sc = load_scenario(QUICKSTART)
        else:
            sc = grid_scenario(10, 0.5, "none", 0, "norm bound + cap", 0, Path(tmp))
    info = dataset_info(sc.data)
    state = build_model(sc.model, info.input_shape, info.num_classes).state_dict()
    sent = {k: v.numpy() for k, v in state.items() if v.is_floating_point()}
    return body_size(sent, list(sent))


def score(thresholds: list[float]) -> None:
    """Cosines per round with each reference: the round's coordinate-wise median, geometric
    median or leave-one-out mean, or the previous round's mean honest update ('prev', from
    round 2; the momentum reference), over all arrays or the body (every array before the
    output layer's weight matrix)."""
    from algorithms.robust_rules import geometric_median

    refs = {
        "median": lambda u, p: cosines(u, coordinate_median(u)),
        "geomed": lambda u, p: cosines(u, geometric_median(u.double()).float()),
        "loo-mean": lambda u, p: cosines(u, loo_mean(u)),
        "prev": lambda u, p: None if p is None else cosines(u, p),
    }
    files = sorted(OUT.glob("*.pt"))
    for (ref_name, fn), scope in [(r, s) for r in refs.items() for s in ("all", "body")]:
        print(f"\n== reference: {ref_name}, scope {scope}")
        for f in files:
            rounds = torch.load(f)
            body = body_of(f.stem) if scope == "body" else None
            cos, att, prev = [], [], None
            for r in rounds:
                u = r["updates"][:, :body]
                c = fn(u, prev)
                prev = u[~r["attacker"]].mean(0)
                if c is not None:
                    cos.append(c)
                    att.append(r["attacker"])
            cos, att = torch.cat(cos), torch.cat(att)
            h, a = cos[~att], cos[att]
            parts = [f"{f.stem:28s} honest cos min {h.min():+.2f} p5 {h.quantile(0.05):+.2f}"]
            if a.numel():
                parts.append(f"attacker cos max {a.max():+.2f}")
            rates = []
            for t in thresholds:
                fe = float((h < t).float().mean())
                det = float((a < t).float().mean()) if a.numel() else float("nan")
                rates.append(f"t={t:+.2f}: FE {100 * fe:4.1f}% det {100 * det:5.1f}%")
            print(" | ".join(parts) + " || " + " | ".join(rates))


def _below_capped(cos: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """The flagged rows, at most (n - 1) // 2 of them, lowest cosine first (the live cap)."""
    n = cos.numel()
    out = torch.zeros(n, dtype=torch.bool)
    if n < 3:
        return out
    order = [i for i in torch.argsort(cos, stable=True).tolist() if bool(flag[i])]
    out[order[: (n - 1) // 2]] = True
    return out


def honest_half_median(u: torch.Tensor) -> torch.Tensor:
    """(c): the coordinate-wise median of the half of the rows closest in direction to the
    round's median."""
    c = cosines(u, coordinate_median(u))
    keep = torch.argsort(c, descending=True, stable=True)[: (u.shape[0] + 1) // 2]
    return coordinate_median(u[keep])


def knn_cos(u: torch.Tensor, k: int) -> torch.Tensor:
    """(d): each row's mean cosine with its k most aligned other rows."""
    un = u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)
    sim = un @ un.T
    sim.fill_diagonal_(-2.0)
    return sim.topk(k, dim=1).values.mean(1)


def variant_flags(name: str, u: torch.Tensor, prev: torch.Tensor | None, t: float):
    """Rows a variant excludes, before the (n - 1) // 2 cap. ``prev``: the previous round's
    aggregate (the mean of the rows the same variant kept), None in round 1."""
    cm = cosines(u, coordinate_median(u))
    cp = None if prev is None else cosines(u, prev)
    if name == "median":
        return cm, cm < t
    if name == "prev":  # the previous aggregate; the median in round 1
        c = cm if cp is None else cp
        return c, c < t
    if name == "both":  # below against the median AND the previous aggregate
        if cp is None:
            return cm, cm < t
        return torch.maximum(cm, cp), (cm < t) & (cp < t)
    if name == "either":
        if cp is None:
            return cm, cm < t
        return torch.minimum(cm, cp), (cm < t) | (cp < t)
    if name == "half-median":
        c = cosines(u, honest_half_median(u))
        return c, c < t
    if name == "both-half":  # (c) and the previous aggregate
        c = cosines(u, honest_half_median(u))
        if cp is None:
            return c, c < t
        return torch.maximum(c, cp), (c < t) & (cp < t)
    if name.startswith("knn"):
        k = int(name[3:])
        c = knn_cos(u, k)
        return c, c < t
    raise ValueError(name)


VARIANTS = ["median", "prev", "both", "either", "half-median", "both-half", "knn3", "knn5"]


def score_variants(thresholds: list[float], variants: list[str]) -> None:
    """Each variant simulated round by round over the body, with its own previous aggregate
    (the mean of the rows it kept: the server's step under the mean), and the live cap of
    (n - 1) // 2 exclusions. Rates per case family: FE = honest rows excluded, det = attacker
    rows excluded, from round 1 (round 1 falls back to the median for 'prev' variants)."""
    files = sorted(OUT.glob("*.pt"))
    bodies: dict[str, int] = {}
    table: dict[tuple, list] = {}
    for f in files:
        family = f.stem.rsplit("-", 1)[0]
        key = "quickstart" if f.stem.startswith("quickstart") else "digits"
        if key not in bodies:
            bodies[key] = body_of(f.stem)
        rounds = torch.load(f)
        for v in variants:
            for t in thresholds:
                prev = None
                fe, det = [], []
                for r in rounds:
                    u = r["updates"][:, : bodies[key]].double()
                    c, flag = variant_flags(v, u, prev, t)
                    out = _below_capped(c, flag)
                    att = r["attacker"]
                    fe += out[~att].tolist()
                    det += out[att].tolist()
                    kept = u[~out]
                    prev = kept.mean(0) if kept.numel() else prev
                cell = table.setdefault((family, v, t), [[], []])
                cell[0] += fe
                cell[1] += det
    families = sorted({k[0] for k in table})
    for t in thresholds:
        print(f"\n== threshold {t:+g}: FE % (honest rows excluded) / det % (attacker rows)")
        print(f"{'case':24s}" + "".join(f"{v:>14s}" for v in variants))
        for fam in families:
            cells = []
            for v in variants:
                fe, det = table[(fam, v, t)]
                s = f"{100 * sum(fe) / max(len(fe), 1):.1f}"
                if det:
                    s += f"/{100 * sum(det) / len(det):.0f}"
                cells.append(f"{s:>14s}")
            print(f"{fam:24s}" + "".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--capture", action="store_true")
    parser.add_argument("--cases", default="")
    parser.add_argument("--score", action="store_true")
    parser.add_argument("--thresholds", default="-0.1,0,0.05,0.1")
    parser.add_argument("--variants", default="", help="score these (comma-separated) instead")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    if args.capture:
        capture([c for c in args.cases.split(",") if c])
    if args.score and args.variants:
        score_variants(
            [float(t) for t in args.thresholds.split(",")],
            VARIANTS if args.variants == "all" else args.variants.split(","),
        )
    elif args.score:
        score([float(t) for t in args.thresholds.split(",")])


if __name__ == "__main__":
    main()
