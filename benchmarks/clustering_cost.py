"""Cost of the clustering step vs the number of clients K (similarities are O(K² d)).

    python benchmarks/clustering_cost.py [--ks 10,100,1000] [--dim 3274] [--k-max 8]

For K random signatures of dimension d (default: the parameter count of the scenarios' MLP on
mnist1d, 40·64 + 64 + 64·10 + 10 = 3274), times separately: the cosine similarity matrix
(O(K² d)), the average-linkage dendrogram (O(K²) memory, ~O(K² log K) time in scipy) and the
silhouette sweep over k = 2..k_max (O(k_max K²)). Prints each time and its ratio to the first K.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.cluster.hierarchy import fcluster
from sklearn.metrics import silhouette_score

from algorithms.clustering import average_linkage, cosine_distance_matrix


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="10,100,1000")
    parser.add_argument("--dim", type=int, default=3274)
    parser.add_argument("--k-max", type=int, default=8)
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    rng = np.random.default_rng(0)
    rows = []
    for k in ks:
        sig = rng.normal(size=(k, args.dim))
        repeats = 7 if k <= 100 else 3
        t_sim = best_of(lambda sig=sig: cosine_distance_matrix(sig), repeats)
        dist = cosine_distance_matrix(sig)
        t_link = best_of(lambda dist=dist: average_linkage(dist), repeats)
        tree = average_linkage(dist)

        def sweep(dist=dist, tree=tree, k=k) -> None:
            for c in range(2, min(args.k_max, k - 1) + 1):
                labels = fcluster(tree, t=c, criterion="maxclust")
                if len(np.unique(labels)) > 1:
                    silhouette_score(dist, labels, metric="precomputed")

        t_sil = best_of(sweep, repeats)
        rows.append((k, t_sim, t_link, t_sil))
    _, s0, l0, h0 = rows[0]
    k0 = rows[0][0]
    print(f"clustering cost, d = {args.dim}, k_max = {args.k_max} (best of repeats)")
    print(
        f"{'K':>6} {'cosine (ms)':>12} {'x':>7} {'linkage (ms)':>13} {'x':>7} "
        f"{'silhouette (ms)':>16} {'x':>7} {'(K/K0)^2':>9}"
    )
    for k, s, link, h in rows:
        print(
            f"{k:>6} {1e3 * s:>12.2f} {s / s0:>7.1f} {1e3 * link:>13.2f} {link / l0:>7.1f} "
            f"{1e3 * h:>16.2f} {h / h0:>7.1f} {(k / k0) ** 2:>9.0f}"
        )


if __name__ == "__main__":
    main()
