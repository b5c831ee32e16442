"""How well does the similarity gate's number, computed from loraport.rsvd subspaces, track the
similarity of the exact top-k subspaces, at full layer width? The quality benchmark
(benchmarks/quality) measures the gate on 128-wide models, where a rank-k sketch of width
k + 8 nearly spans the matrix; this runner checks the estimate where it does not.

Pairs: W_s [m, n] with a slowly decaying spectrum (σ_j = j^-1/2 with random singular vectors,
like trained weights) and W_t = W_s + ε ‖W_s‖_F D / ‖D‖_F for drifts ε, with two kinds of D:
  * "noise": i.i.d. Gaussian (continued training spread over every direction);
  * "low-rank": a rank-32 update with decaying weights plus 10 % noise (a fine-tune);
and an unrelated W_t (the same spectrum, independent singular vectors).
Similarity = (‖U_sᵀU_t‖_F² + ‖V_sᵀV_t‖_F²) / 2k, as `port` computes it: "exact" from float64
torch.linalg.svd, then loraport.rsvd (both weights in one batched call, oversample 8, seed 0)
at power_iters 0, 1, 2, with its time.

    python -m benchmarks.gate                    # 3072 x 3072, k = 64 (a few minutes on 2 cores)
    python -m benchmarks.gate --shape 768 768    # seconds
"""

from __future__ import annotations

import argparse
import time

import torch

import loraport
from loraport import reference

DRIFTS = (0.05, 0.1, 0.2, 0.3, 0.5)
ITERATIONS = (0, 1, 2)


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=gen))[0]  # [rows, cols]


def _weight(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    r = min(m, n)
    sigma = torch.arange(1, r + 1, dtype=torch.float64) ** -0.5
    return (_orthonormal(m, r, gen) * sigma) @ _orthonormal(n, r, gen).T  # [m, n]


def _drift(kind: str, m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(m, n, dtype=torch.float64, generator=gen)
    if kind == "noise":
        return noise / noise.norm()
    weights = torch.linspace(1.0, 0.2, 32, dtype=torch.float64)
    update = (_orthonormal(m, 32, gen) * weights) @ _orthonormal(n, 32, gen).T
    update = update / update.norm() + 0.1 * noise / noise.norm()
    return update / update.norm()


def _similarity(us, vs, ut, vt) -> float:
    left = reference.subspace_similarity(us.double(), ut.double())
    right = reference.subspace_similarity(vs.double(), vt.double())
    return float(left + right) / 2


def _exact(w: torch.Tensor, k: int):
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :k], vh[:k].mT


def measure(m: int, n: int, k: int, seed: int = 0):
    """Yields (pair, exact similarity, [(rsvd similarity, seconds) per power_iters])."""
    gen = torch.Generator().manual_seed(seed)
    ws = _weight(m, n, gen)
    exact_s = _exact(ws, k)
    pairs = [(f"{kind} {eps:g}", ws + eps * ws.norm() * _drift(kind, m, n, gen))
             for kind in ("noise", "low-rank") for eps in DRIFTS]  # fmt: skip
    pairs.append(("unrelated", _weight(m, n, gen)))
    for name, wt in pairs:
        exact = _similarity(*exact_s, *_exact(wt, k))
        both = torch.stack([ws, wt]).float()  # [2, m, n]
        estimates = []
        for q in ITERATIONS:
            t0 = time.perf_counter()
            U, _, V = loraport.rsvd(both, k, power_iters=q, seed=0)
            estimates.append((_similarity(U[0], V[0], U[1], V[1]), time.perf_counter() - t0))
        yield name, exact, estimates


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=2, default=(3072, 3072), metavar=("M", "N"))
    p.add_argument("--rank", type=int, default=64, help="subspace rank k (default 64, port's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    m, n = args.shape
    print(f"[{m}, {n}], k = {args.rank}, σ_j = j^-1/2; torch {torch.__version__}, {torch.get_num_threads()} threads")
    cols = " | ".join(f"q={q}" for q in ITERATIONS)
    print(f"| pair (drift ε) | exact | {cols} | rsvd seconds (2 weights), {' / '.join(f'q={q}' for q in ITERATIONS)} |")
    print("|---" * (3 + len(ITERATIONS)) + "|")
    for name, exact, estimates in measure(m, n, args.rank, args.seed):
        sims = " | ".join(f"{s:.3f} ({s - exact:+.3f})" for s, _ in estimates)
        secs = " / ".join(f"{t:.2f}" for _, t in estimates)
        print(f"| {name} | {exact:.3f} | {sims} | {secs} |", flush=True)


if __name__ == "__main__":
    main()
