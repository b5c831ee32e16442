"""Weights with spectra like released ones, in related and unrelated pairs with known labels, and
the suite that runs the default gate (loraport.gate) against its float64 oracle
(loraport.reference.gate_exact) on them: tests/test_gate.py and `python -m benchmarks.gate --suite`."""

from __future__ import annotations

import time

import torch

from .. import gate, reference


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """[rows, cols] float64 with orthonormal columns, random."""
    return torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=gen))[0]  # [rows, cols]


def slow_decay_weight(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """[m, n] float64 with singular values σ_j = j^-1/2 and random singular vectors."""
    r = min(m, n)
    sigma = torch.arange(1, r + 1, dtype=torch.float64) ** -0.5
    return (orthonormal(m, r, gen) * sigma) @ orthonormal(n, r, gen).T  # [m, n]


def _noise(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """A Gaussian noise floor scaled so its top singular value is about 1."""
    return torch.randn(m, n, dtype=torch.float64, generator=gen) / (m**0.5 + n**0.5)  # [m, n]


def _dominant(m: int, n: int, d: int, top: float, decay: float, gen, V=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-d part with singular values top·decay^j over the unit noise floor, and its V [n, d]."""
    V = orthonormal(n, d, gen) if V is None else V
    return (orthonormal(m, d, gen) * (top * decay ** torch.arange(d, dtype=torch.float64))) @ V.T, V


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
    ws = slow_decay_weight(m, n, gen)
    for eps in (0.1, 0.3):
        drift = torch.randn(m, n, dtype=torch.float64, generator=gen)
        pairs.append((f"slow decay, drift {eps:g}", ws, ws + eps * ws.norm() * drift / drift.norm(), True))
    pairs.append(("slow decay, unrelated", ws, slow_decay_weight(m, n, gen), False))
    return pairs


def gate_suite(m: int, n: int, seed: int = 0, threshold: float = 0.5, dtype=torch.float32):
    """Yields (name, related, exact (left, right, k), gate.GateResult, seconds) for every pair of
    `real_like_pairs`: the exact float64 gate (reference.gate_exact) and the default gate
    (loraport.gate, as `port` runs it: both weights in ``dtype``, seed 0; bf16 weights
    iterate in bf16 where `gate.bf16_products` says so). With bf16 the exact gate sees the same
    bf16-rounded weights."""
    cap = gate.gate_rank(m, n)
    for name, ws, wt, related in real_like_pairs(m, n, torch.Generator().manual_seed(seed)):
        weights = torch.stack([ws, wt]).to(dtype)  # [2, m, n]
        exact = reference.gate_exact(weights[0].double(), weights[1].double(), cap)
        t0 = time.perf_counter()
        (result,) = gate.gate_layers(1, m, n, weights, {(0, "source"): 0, (0, "target"): 1}, {},
                                     None, None, {}, cap=cap, seed=0, threshold=threshold, device="cpu")  # fmt: skip
        yield name, related, exact, result, time.perf_counter() - t0
