"""zELO fit benchmark: recovery of known latent scores from noisy judge votes, agreement with choix, fit speed.

Per seed: 100 documents with N(0, 1) latent scores, pairs from 4 random Hamiltonian cycles, 3 judges each
reporting Phi(s_a - s_b + N(0, 0.5^2)), averaged. choix agreement uses 3 hard Bernoulli votes per pair and the
Bradley-Terry objective (choix.opt_pairwise, alpha = prior_strength / 2). Run: python benchmarks/zelo_fit.py
"""

from __future__ import annotations

import argparse
import time

import choix
import numpy as np
from scipy.stats import norm, spearmanr

from research.zelo import MODELS, fit_query, sample_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--prior-strength", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=5, help="timed fits per query (best is reported)")
    args = parser.parse_args()
    ids = [f"d{i}" for i in range(args.docs)]
    where = {d: i for i, d in enumerate(ids)}
    print(f"N={args.docs} cycles={args.cycles} judges=3 noise=0.5 prior_strength={args.prior_strength}")
    print(f"{'seed':>4} {'pairs':>5} {'model':>13} {'spearman':>8} {'fit ms':>7} {'|bt-choix|':>10}")
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        latent = rng.normal(size=args.docs)
        idx = np.array([(where[a], where[b]) for a, b in sample_pairs(ids, args.cycles, seed)])
        d = latent[idx[:, 0]] - latent[idx[:, 1]]
        p = norm.cdf(d[:, None] + rng.normal(0, 0.5, (len(d), 3))).mean(axis=1)
        hard = np.repeat(idx, 3, axis=0)
        won = rng.random(len(hard)) < 1 / (1 + np.exp(-(latent[hard[:, 0]] - latent[hard[:, 1]])))
        ours = fit_query(ids, hard, won.astype(float), "bradley-terry", args.prior_strength)
        theirs = choix.opt_pairwise(args.docs, [(a, b) if w else (b, a) for (a, b), w in zip(hard.tolist(), won)],
                                    alpha=args.prior_strength / 2, method="Newton-CG", tol=1e-12)
        gap = np.max(np.abs(ours - (theirs - theirs.mean())))
        for name, model in MODELS.items():
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                scores = fit_query(ids, idx, p, model, args.prior_strength)
                times.append(time.perf_counter() - start)
            rho = spearmanr(scores, latent)[0]
            extra = f"{gap:10.2e}" if name == "bradley-terry" else f"{'':>10}"
            print(f"{seed:>4} {len(idx):>5} {name:>13} {rho:8.4f} {1e3 * min(times):7.2f} {extra}")


if __name__ == "__main__":
    main()
