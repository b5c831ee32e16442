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


def _noise(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """A Gaussian noise floor scaled so its top singular value is about 1."""
    return torch.randn(m, n, dtype=torch.float64, generator=gen) / (m**0.5 + n**0.5)  # [m, n]


def _dominant(m: int, n: int, d: int, top: float, decay: float, gen, V=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-d part with singular values top·decay^j over the unit noise floor, and its V [n, d]."""
    V = _orthonormal(n, d, gen) if V is None else V
    return (_orthonormal(m, d, gen) * (top * decay ** torch.arange(d, dtype=torch.float64))) @ V.T, V


def real_like_pairs(m: int, n: int, gen: torch.Generator) -> list[tuple[str, torch.Tensor, torch.Tensor, bool]]:
    """(name, W_s, W_t, related) pairs [m, n] float64 with spectra like released weights: a few
    dominant directions over a noise floor (16, 4 and 2 of them), a slow decay σ_j = j^-1/2. Related:
    drift (the same weight plus new noise of 10 % of its norm), or the same dominant part over a new
    noise floor (noise-floor directions differ between releases). Unrelated: independent weights, and
    residual-stream-like ones that share the source's input side (V) but nothing else."""
    pairs = []
    for d, top, decay in ((16, 8.0, 0.93), (4, 4.0, 0.85), (2, 20.0, 0.85)):
        L, V = _dominant(m, n, d, top, decay, gen)
        ws = L + _noise(m, n, gen)
        drift = _noise(m, n, gen)
        pairs += [
            (f"{d} dominant, drift 10 %", ws, ws + 0.1 * ws.norm() * drift / drift.norm(), True),
            (f"{d} dominant, new noise floor", ws, L + _noise(m, n, gen), True),
            (f"{d} dominant, unrelated", ws, _dominant(m, n, d, top, decay, gen)[0] + _noise(m, n, gen), False),
            (f"{d} dominant, unrelated, shared input side", ws,
             _dominant(m, n, d, top, decay, gen, V=V)[0] + _noise(m, n, gen), False),
        ]  # fmt: skip
    ws = _weight(m, n, gen)
    for eps in (0.1, 0.3):
        drift = torch.randn(m, n, dtype=torch.float64, generator=gen)
        pairs.append((f"slow decay, drift {eps:g}", ws, ws + eps * ws.norm() * drift / drift.norm(), True))
    pairs.append(("slow decay, unrelated", ws, _weight(m, n, gen), False))
    return pairs


def gate_suite(m: int, n: int, seed: int = 0, threshold: float = 0.5):
    """Yields (name, related, exact (left, right, k), gate.GateResult, seconds) for every pair of
    `real_like_pairs`: the exact float64 gate (reference.gate_exact) and the default gate
    (loraport.gate, as `port` runs it: both weights in float32, oversample 8, seed 0)."""
    from loraport import gate

    cap = gate.gate_rank(m, n)
    for name, ws, wt, related in real_like_pairs(m, n, torch.Generator().manual_seed(seed)):
        exact = reference.gate_exact(ws, wt, cap)
        t0 = time.perf_counter()
        (result,) = gate.gate_layers(1, m, n, torch.stack([ws, wt]).float(), {(0, "source"): 0, (0, "target"): 1}, {},
                                     None, None, {}, cap=cap, oversample=8, seed=0, threshold=threshold, device="cpu")  # fmt: skip
        yield name, related, exact, result, time.perf_counter() - t0


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
    p.add_argument("--suite", action="store_true", help="the default gate against the exact gate on real-like spectra")
    args = p.parse_args(argv)
    m, n = args.shape
    if args.suite:
        from loraport.gate import margin

        print(f"[{m}, {n}], threshold 0.5; torch {torch.__version__}, {torch.get_num_threads()} threads")
        print("| pair | label | exact k | exact left / right / mean | exact margin | gate k | gate margin | steps | "
              "same decision | gate seconds |\n|---|---|---:|---|---:|---:|---:|---:|---|---:|")  # fmt: skip
        for name, related, (left, right, k), res, sec in gate_suite(m, n, args.seed):
            exact, est = margin(left, right, 0.5), margin(res.left, res.right, 0.5)
            print(f"| {name} | {'related' if related else 'unrelated'} | {k} | {left:.3f} / {right:.3f} / "
                  f"{(left + right) / 2:.3f} | {exact:+.3f} | {res.k} | {est:+.3f} | {res.steps} | "
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
