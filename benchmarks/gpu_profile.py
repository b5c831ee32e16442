"""Where one rsvd call spends its time on a GPU, and how often it waits for the device.

    python benchmarks/gpu_profile.py [--shape 12288x3072] [--batch 4] [--rank 64]

For loraport.rsvd (power and krylov) and torch.svd_lowrank at the same settings: the number of
host synchronizations (torch.cuda.set_sync_debug_mode counts each synchronizing call) and the
top CUDA kernels by device time (torch.profiler). Then the candidates for the Rayleigh-Ritz SVD of
the small L x L factor (L = rank + oversample for power, 3x that for krylov at power_iters=2):
time and the orthogonality of the left singular vectors they return; the QR after the
eigensolver, by Householder or CholeskyQR2; the op's total time with the eigensolver on the GPU
(one batched cuSOLVER call, or torch.linalg.eigh) or on the host; the rates of the skinny GEMMs
of one pass; and those products split into two TF32 GEMMs at float32 accuracy
(--only-split-tf32 runs just that)."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import loraport
from loraport.engine_knobs import override_for_testing


@contextlib.contextmanager
def count_host_syncs():
    """Counts synchronizing CUDA calls (torch.cuda.set_sync_debug_mode("warn")) in the block.
    Those made from Python arrive as Python warnings; those made inside a compiled op's kernel
    are printed by c10 on the process's stderr (seen on an H200, 2026-11-27), so file
    descriptor 2 is captured too. Yields a list that holds the count afterwards."""
    count: list[int] = []
    with tempfile.TemporaryFile() as err, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield count
        finally:
            torch.cuda.set_sync_debug_mode(0)
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        printed = err.read().decode(errors="replace").count("synchronizing CUDA operation")
        count.append(printed + sum("synchroniz" in str(w.message) for w in caught))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="12288x3072")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--only-split-tf32", action="store_true", help="only the split-TF32 product measurement")
    args = parser.parse_args()
    m, n = (int(x) for x in args.shape.split("x"))
    if args.only_split_tf32:
        split_tf32_products(args.batch, m, n)
        return
    A = torch.randn(args.batch, m, n, device="cuda") / m**0.5
    calls = {
        "loraport power": lambda: loraport.rsvd(A, args.rank, seed=0),
        "loraport krylov": lambda: loraport.rsvd(A, args.rank, seed=0, method="krylov"),
        "torch.svd_lowrank": lambda: torch.svd_lowrank(A, q=args.rank + 8, niter=2),
    }
    for name, call in calls.items():
        call()  # warm-up: handles, workspaces, module load
        torch.cuda.synchronize()
        with count_host_syncs() as syncs:
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events)
        print(f"\n### {name}: {args.batch} x [{m}, {n}], rank {args.rank}: {syncs[0]} host syncs, "
              f"{device_us / 1e3:.2f} ms of kernels")
        print(events.table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=60))
    small_svd_candidates(args.batch, args.rank + 8)
    ritz_finish_candidates()
    rayleigh_ritz_on_device_or_host()
    skinny_gemm_rates(args.batch, m, n)
    split_tf32_products(args.batch, m, n)


def median_ms(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def small_svd_candidates(batch: int, width: int) -> None:
    print("\n### the Rayleigh-Ritz SVD of [batch, L, L]: median ms of 20, max |Ur^T Ur - I|")
    print("| L | fp32 svd | fp64 svd | fp64 svd gesvd | fp64 eigh of the Gram |")
    print("|---:|---:|---:|---:|---:|")
    for L in (width, 3 * width):
        # An upper-triangular R with a slowly decaying spectrum, like the factor of B^T.
        R = torch.linalg.qr(torch.randn(batch, 4 * L, L, device="cuda") * torch.arange(1, L + 1, device="cuda") ** -0.5).R
        candidates = {
            "fp32": lambda: torch.linalg.svd(R.mT, full_matrices=False)[0],
            "fp64": lambda: torch.linalg.svd(R.mT.double(), full_matrices=False)[0],
            "gesvd": lambda: torch.linalg.svd(R.mT.double(), full_matrices=False, driver="gesvd")[0],
            "eigh": lambda: torch.linalg.eigh(R.mT.double() @ R.double())[1],
        }
        cells = []
        for fn in candidates.values():
            U = fn().double()
            error = (U.mT @ U - torch.eye(L, device="cuda", dtype=torch.float64)).abs().amax().item()
            cells.append(f"{median_ms(fn):.2f} ms, {error:.0e}")
        print(f"| {L} | " + " | ".join(cells) + " |")


def ritz_finish_candidates() -> None:
    """The QR after the eigensolver (csrc/linalg/rayleigh_ritz.cpp, small_svd_by_eigh): the Ritz vectors'
    images W [batch, L, rank], columns orthogonal and scaled to unit norm, factored in fp64 by
    ATen's Householder QR (cuSOLVER's orgqr runs once per matrix) or by CholeskyQR2 in batched
    ATen calls, as the op's orthonormalizer does (its triangular inverse is a kernel of ours
    there, a triangular solve here). Median ms of 20 and the largest |Q^T Q - I|."""
    print("\n### the QR of the Ritz vectors' images [batch, L, rank] (fp64): median ms of 20, max |Q^T Q - I|")
    print("| batch x [L, rank] | Householder (linalg.qr) | CholeskyQR2 |")
    print("|---|---:|---:|")

    def cholesky_qr2(W: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            R = torch.linalg.cholesky_ex(W.mT @ W, upper=True)[0]
            W = torch.linalg.solve_triangular(R, W, upper=True, left=False)
        return W

    for batch, L, rank in ((4, 72, 64), (4, 192, 64), (16, 72, 64), (256, 24, 16), (4096, 16, 8)):
        Q0 = torch.linalg.qr(torch.randn(batch, L, rank, device="cuda", dtype=torch.float64))[0]
        W = Q0 + 1e-10 * torch.randn_like(Q0)  # orthonormal up to the eigensolver's rounding
        W = W / W.norm(dim=-2, keepdim=True)
        cells = []
        for fn in (lambda: torch.linalg.qr(W)[0], lambda: cholesky_qr2(W)):
            Q = fn()
            error = (Q.mT @ Q - torch.eye(rank, device="cuda", dtype=torch.float64)).abs().amax().item()
            cells.append(f"{median_ms(fn):.2f} ms, {error:.0e}")
        print(f"| {batch} x [{L}, {rank}] | " + " | ".join(cells) + " |")


def rayleigh_ritz_on_device_or_host() -> None:
    """loraport.rsvd with the Rayleigh-Ritz eigensolver on the GPU by one cuSOLVER call for the
    batch (the default, csrc/cuda/batched_eigh.cpp), on the GPU by torch.linalg.eigh
    (LORAPORT_CUSOLVER_EIGH=0; up to torch 2.11 one cuSOLVER call per matrix for L > 32), and
    on the host (LAPACK, one matrix after another: LORAPORT_RAYLEIGH_RITZ=host), taking turns,
    median ms of 10; L is the width of the factor whose SVD is taken."""
    print("\n### Rayleigh-Ritz on the GPU or on the host: median ms of loraport.rsvd")
    print("| batch x shape | method | L | GPU, batched eigh | GPU, torch.linalg.eigh | host |")
    print("|---|---|---:|---:|---:|---:|")
    cases = [  # (batch, m, n, rank, method, block, power_iters)
        (4, 12288, 3072, 64, "power", None, 2),
        (4, 12288, 3072, 64, "krylov", 48, 3),
        (4, 12288, 3072, 128, "krylov", 96, 3),
        (16, 3072, 3072, 64, "power", None, 2),
        (256, 512, 128, 16, "power", None, 2),
        (4096, 64, 64, 8, "power", None, 2),
    ]
    settings = (("eigh", "1"), ("eigh", "0"), ("host", "1"))  # (LORAPORT_RAYLEIGH_RITZ, LORAPORT_CUSOLVER_EIGH)
    for batch, m, n, rank, method, block, q in cases:
        A = torch.randn(batch, m, n, device="cuda") / m**0.5
        width = block or rank + 8
        L = width * (q + 1 if method == "krylov" else 1)
        call = lambda: loraport.rsvd(A, rank, power_iters=q, method=method, block_size=block, seed=0)  # noqa: F821 (A is the loop's; ruff misreads it)
        cells = []
        for rayleigh_ritz, batched in settings:
            with override_for_testing(rayleigh_ritz=rayleigh_ritz, cusolver_eigh=batched):
                cells.append(f"{median_ms(call, repeats=10):.2f}")
        print(f"| {batch} x [{m}, {n}] | {method} rank {rank} q={q} | {L} | " + " | ".join(cells) + " |")
        del A


def skinny_gemm_rates(batch: int, m: int, n: int) -> None:
    """TFLOP/s of the tall-skinny products of one pass at several widths: A X, and A^T Q as
    matmul(A^T, Q) and as (Q^T A)^T (csrc/linalg/range_finders.cpp, adjoint_times)."""
    print(f"\n### skinny GEMMs on {batch} x [{m}, {n}]: TFLOP/s (median of 20)")
    print("| width | A X | A^T Q | (Q^T A)^T |")
    print("|---:|---:|---:|---:|")
    A = torch.randn(batch, m, n, device="cuda")
    for width in (24, 48, 64, 72, 96, 128, 136, 192):
        X, Q = torch.randn(batch, n, width, device="cuda"), torch.randn(batch, m, width, device="cuda")
        flops = 2 * batch * m * n * width / 1e9
        cells = [flops / median_ms(fn) for fn in (lambda: A @ X, lambda: A.mT @ Q, lambda: (Q.mT @ A).mT)]
        print(f"| {width} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


def tf32_truncated(x: torch.Tensor) -> torch.Tensor:
    """x with the 13 low mantissa bits of each float32 cleared: a TF32 value (10 mantissa bits)."""
    return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)


def tf32_rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest TF32 value (ties away from zero)."""
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def split_tf32_products(batch: int, m: int, n: int) -> None:
    """Whether the tall-skinny products could run on tensor cores at float32 accuracy. Split
    A = A_hi + A_lo with A_hi = tf32(A), and X likewise; then A X ~= A_hi [X_hi | X_lo] + A_lo X_hi,
    dropping A_lo X_lo (~2^-22 relative): two TF32 GEMMs (widths 2l and l) instead of one float32
    one (Ootomo & Yokota 2022 split the operands the same way). cuBLAS converts float32 to TF32
    itself, so A can be passed as A_hi only if its conversion is the truncation A_lo is built
    from: the first table says which conversion the products match. Then: time (median of 20;
    the split counted as the float32 product's 2 m n l flops) and max relative error per column
    against float64, for the float32 GEMM, one TF32 GEMM and the split."""
    print(f"\n### split-TF32 products on {batch} x [{m}, {n}]")
    g = torch.Generator(device="cuda").manual_seed(0)
    A = torch.randn(batch, m, n, device="cuda", generator=g) * (torch.arange(1, n + 1, device="cuda") ** -0.5)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        X = torch.randn(batch, n, 72, device="cuda", generator=g)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = (A[:1] @ X[:1]).double()
        for name, convert in (("truncation", tf32_truncated), ("rounding", tf32_rounded)):
            exact = convert(A[:1]).double() @ convert(X[:1]).double()
            print(f"TF32 product vs float64 product of {name}-converted operands: max rel. deviation "
                  f"{((tf32 - exact).abs().amax() / exact.abs().amax()).item():.1e}")
        A_lo = A - tf32_truncated(A)  # exact in float32
        print("| width | float32 TFLOP/s | error | 1xTF32 TFLOP/s | error | split TFLOP/s | error |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for width in (48, 64, 72, 128, 136):
            X = torch.randn(batch, n, width, device="cuda", generator=g)
            X_hi = tf32_truncated(X)
            X_both = torch.cat([X_hi, X - X_hi], dim=-1)  # [b, n, 2 width]

            def split():
                Y = A @ X_both
                return torch.baddbmm(Y[..., :width] + Y[..., width:], A_lo, X_hi)

            truth = A.double() @ X.double()
            scale = truth.abs().amax(dim=-2, keepdim=True)  # per column
            cells = []
            for mode, fn in (("fp32", lambda: A @ X), ("tf32", lambda: A @ X), ("split", split)):
                torch.backends.cuda.matmul.allow_tf32 = mode != "fp32"
                ms = median_ms(fn)
                error = ((fn().double() - truth).abs() / scale).amax().item()
                cells += [f"{2 * batch * m * n * width / ms / 1e9:.1f}", f"{error:.1e}"]
            print(f"| {width} | " + " | ".join(cells) + " |")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


if __name__ == "__main__":
    main()
