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
    python -m benchmarks.gate --suite --shape 1024 3072   # the default gate vs the exact gate on real-like spectra
    python -m benchmarks.gate --suite --dtype bfloat16    # the same on bf16 weights (our bf16 kernels where the CPU has them)
"""

from __future__ import annotations

import argparse
import time

import torch

import loraport
from loraport import reference
from loraport.testing.spectra import gate_suite, orthonormal, slow_decay_weight

DRIFTS = (0.05, 0.1, 0.2, 0.3, 0.5)
ITERATIONS = (0, 1, 2)


def _drift(kind: str, m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(m, n, dtype=torch.float64, generator=gen)
    if kind == "noise":
        return noise / noise.norm()
    weights = torch.linspace(1.0, 0.2, 32, dtype=torch.float64)
    update = (orthonormal(m, 32, gen) * weights) @ orthonormal(n, 32, gen).T
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
    ws = slow_decay_weight(m, n, gen)
    exact_s = _exact(ws, k)
    pairs = [(f"{kind} {eps:g}", ws + eps * ws.norm() * _drift(kind, m, n, gen))
             for kind in ("noise", "low-rank") for eps in DRIFTS]  # fmt: skip
    pairs.append(("unrelated", slow_decay_weight(m, n, gen)))
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
    p.add_argument("--suite", action="store_true", help="the default gate against the exact gate on real-like spectra")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="--suite: the weights' dtype as port reads them (default float32)")  # fmt: skip
    args = p.parse_args(argv)
    m, n = args.shape
    if args.suite:
        from loraport.gate import bf16_products, margin

        dtype = getattr(torch, args.dtype)
        products = "bf16 products (loraport's AVX512-BF16 kernels)" if bf16_products(dtype, "cpu") else "float32 GEMMs on a float32 copy"
        print(f"[{m}, {n}] {args.dtype}, threshold 0.5, {products}; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")  # fmt: skip
        print("| pair | label | exact k | exact left / right / mean | exact margin | gate k | gate margin | products | "
              "same decision | gate seconds |\n|---|---|---:|---|---:|---:|---:|---:|---|---:|")  # fmt: skip
        for name, related, (left, right, k), res, sec in gate_suite(m, n, args.seed, dtype=dtype):
            exact, est = margin(left, right, 0.5), margin(res.left, res.right, 0.5)
            print(f"| {name} | {'related' if related else 'unrelated'} | {k} | {left:.3f} / {right:.3f} / "
                  f"{(left + right) / 2:.3f} | {exact:+.3f} | {res.k} | {est:+.3f} | {res.products} | "
                  f"{'yes' if (exact >= 0) == (est >= 0) else 'NO'} | {sec:.2f} |", flush=True)  # fmt: skip
        return
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
