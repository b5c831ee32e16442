"""Benchmark runner for loraport.rsvd against its peers, measured in the same run on the same
matrices: torch.svd_lowrank (same rank, oversampling and iterations), torch.linalg.svd (exact;
it also provides the truth for the error columns) and scikit-learn's randomized_svd when it is
installed. Prints one table per shape with each method's time, speed-up over
torch.svd_lowrank, error relative to the optimal rank-k error (Eckart-Young) and overlap of its
top-k left subspace with the true one; then an "equal overlap" table where each method gets
the fewest iterations that reach the target overlap.

    python -m benchmarks.rsvd                 # Hunyuan Video layer shapes (minutes on 2 cores)
    python -m benchmarks.rsvd --quick         # small shapes, seconds
    python -m benchmarks.rsvd --device cuda   # on a GPU, plus GEMM rate and copy bandwidth

Test matrices have a slowly decaying spectrum like trained weights: A = G diag(j^-1/2) with
G Gaussian (m x n), columns in random order, so the true subspaces are not axis-aligned on the
left. Timing: best of --repeats runs, device synchronized inside the timed region; the
same-settings table also gives the median over rounds of each method's speed-up over
torch.svd_lowrank in the same round ("paired"), steadier on a shared machine.

On a GPU the run first measures the two ceilings (an 8192^3 float32 cuBLAS GEMM, TF32 off as in
torch's default, and a 2 GiB device-to-device copy counting bytes read and written) and reports
each method's GEMM rate and A-read bandwidth against them; the truth is the float64
eigendecomposition of the smaller Gram matrix on the GPU (exact to ~1e-13 here: the test
spectra have condition numbers of ~100), and torch.linalg.svd is timed in float32 on the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
import time
from dataclasses import dataclass

import torch

import loraport
from loraport import reference as ref
from loraport.engine_knobs import override_for_testing

HUNYUAN_SHAPES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360)]
QUICK_SHAPES = [(768, 768), (2304, 768), (768, 3072)]


@dataclass
class Row:
    method: str
    setting: str
    seconds: float
    error_ratio: float  # ||A - U S V^T||_F / optimal rank-k error, worst over the batch
    overlap: float  # ||U_k^T U_true||_F^2 / k, worst over the batch


def machine_description(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [
        f"date {datetime.date.today()}",
        f"torch {torch.__version__}",
        f"loraport {loraport.__version__} ({'CUDA' if loraport.cuda_built() else 'CPU-only'} build)",
        f"CPU {cpu}, {torch.get_num_threads()} threads",
    ]
    if device == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    return "; ".join(parts)


@contextlib.contextmanager
def markdown_tee(path: str | None):
    """A writer(line) that prints each line and, with ``path``, also appends it to that file."""
    out = open(path, "a") if path else None

    def writer(line: str) -> None:
        print(line, flush=True)
        if out:
            out.write(line + "\n")

    try:
        yield writer
    finally:
        if out:
            out.close()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int):
    """(best seconds, last result) over `repeats` runs after one warm-up."""
    return timed_together({"": fn}, device, repeats)[""]


# Pause between timed calls. scikit-learn runs on numpy's OpenBLAS, whose threads keep spinning
# for a while after a call: on the 2-core VM, loraport.rsvd (2 x [3072, 3072], rank 64, q=2) took
# 0.25-0.27 s right after a randomized_svd call and 0.17-0.21 s half a second later, so whichever
# method followed sklearn in a round was timed against busy cores.
SETTLE_SECONDS = 0.5


def timed_together(fns: dict, device: str, repeats: int, rounds: dict | None = None) -> dict:
    """name -> (best seconds, last result). The methods take turns, round by round, so a burst of
    load from other processes on a shared machine hits them alike instead of one of them; each
    timed call starts after a short pause (SETTLE_SECONDS) so none inherits another's threads.
    `rounds`, if given, receives name -> [seconds of each round]."""
    results = {name: fn() for name, fn in fns.items()}  # warm-up
    synchronize(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cpu":
                time.sleep(SETTLE_SECONDS)
            start = time.perf_counter()
            results[name] = fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    if rounds is not None:
        rounds.update(times)
    return {name: (min(times[name]), results[name]) for name in fns}


def paired_speedup(rounds: dict, name: str, reference: str) -> float:
    """Median over rounds of reference seconds / name seconds in the same round: calls a few
    seconds apart share the machine's load, which on the shared CPU VM changed the best-of-N
    times of a method by up to 30 % from one run to the next."""
    return statistics.median(r / t for r, t in zip(rounds[reference], rounds[name]))


def slow_spectrum_batch(batch: int, m: int, n: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    scale = torch.arange(1, n + 1, device=device, dtype=torch.float32) ** -0.5
    scale = scale[torch.randperm(n, generator=g, device=device)]
    return torch.randn(batch, m, n, generator=g, device=device) * scale / m**0.5


class Truth:
    """Exact SVD of each matrix in float64, for the error and overlap columns: on the CPU by
    torch.linalg.svd, on a GPU from the eigendecomposition of the smaller Gram matrix (a fraction
    of the time, and exact to ~u64 * cond^2 = 1e-12 on these well-conditioned test matrices)."""

    def __init__(self, A: torch.Tensor):
        self.A = A.double()
        if A.is_cuda:
            self.U, self.S = self._from_gram(self.A)
        else:
            self.U, self.S, _ = torch.linalg.svd(self.A, full_matrices=False)

    @staticmethod
    def _from_gram(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, n = A.shape[-2:]
        G = A @ A.mT if m <= n else A.mT @ A  # [b, s, s], s = min(m, n)
        evals, evecs = torch.linalg.eigh(G)  # ascending
        S = evals.flip(-1).clamp_min(0).sqrt()  # [b, s]
        W = evecs.flip(-1)
        return (W, S) if m <= n else (A @ W / S.unsqueeze(-2), S)  # U = A V / S for a tall A

    def score(self, k: int, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> tuple[float, float]:
        device = self.A.device
        U, S, V = U[..., :k].to(device), S[..., :k].to(device), V[..., :k].to(device)
        optimal = self.S[..., k:].square().sum(-1).sqrt()
        error = ref.reconstruction_error(self.A, U, S, V) / optimal
        overlap = ref.subspace_similarity(U, self.U[..., :k])
        return error.max().item(), overlap.min().item()


# Rows of the same-settings table only: the same iteration as "loraport power", another engine.
SAME_SETTINGS_ONLY = {"loraport power, unfused"}


def peers(k: int, oversample: int, device: str):
    """name -> fn(A, iters) returning (U, S, V) with at least k columns."""

    def loraport_rsvd(method):
        return lambda A, q: loraport.rsvd(A, k, oversample=oversample, power_iters=q, method=method, seed=0)

    def svd_lowrank(A, q):
        torch.manual_seed(0)  # its sketch comes from the global generator: same sketch every run
        return torch.svd_lowrank(A, q=k + oversample, niter=q)

    def one_gemm_per_product(A, q):  # the CPU's fused pass off (knob LORAPORT_GRAM_PASS=0)
        with override_for_testing(gram_pass="0"):
            return loraport_rsvd("power")(A, q)

    methods = {
        "loraport power": loraport_rsvd("power"),
        "loraport krylov": loraport_rsvd("krylov"),
        "torch.svd_lowrank": svd_lowrank,
    }
    if device == "cpu":
        methods["loraport power, unfused"] = one_gemm_per_product
    try:
        from sklearn.utils.extmath import randomized_svd
    except ImportError:
        return methods
    if device == "cpu":

        def sklearn_rsvd(A, q):  # one matrix at a time; randomized_svd returns (U, S, Vt)
            outs = [randomized_svd(a.numpy(), k, n_oversamples=oversample, n_iter=q, random_state=0) for a in A]
            U, S, Vt = (torch.stack([torch.from_numpy(o[i].copy()) for o in outs]) for i in range(3))
            return U, S, Vt.mT

        methods["sklearn randomized_svd"] = sklearn_rsvd
    return methods


def narrow_krylov(k: int, device: str):
    """Krylov with blocks of k/2 to 7k/8 columns (more iterations, fewer flops per pass), and of k
    columns on a GPU, where cuBLAS runs a width of 64 at 1.5x the rate of 72 (H100, 4 x [12288,
    3072]: 38.4 vs 25.8 TFLOP/s; benchmarks/gpu_profile.py), so a block of k costs less than one
    of k + oversample."""

    def run(block):
        return lambda A, q: loraport.rsvd(A, k, power_iters=q, method="krylov", block_size=block, seed=0)

    blocks = [k // 2, 5 * k // 8, 3 * k // 4, 7 * k // 8] + ([k] if device == "cuda" else [])
    return {f"loraport krylov block {b}": run(b) for b in blocks}


def narrow_block(name: str) -> int | None:
    return int(name.rsplit(" ", 1)[1]) if name.startswith("loraport krylov block") else None


def device_ceilings(device: str, repeats: int) -> tuple[float, float]:
    """(GFLOP/s of a large float32 GEMM, GB/s of a device-to-device copy counting bytes read and
    written): what the GPU can do at best, measured in this run."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(8192, 8192, device=device, generator=g) for _ in range(2))
    seconds, _ = timed(lambda: a @ b, device, repeats)  # noqa: F821 (a, b: the line above; ruff misreads it)
    gemm = 2 * 8192**3 / seconds / 1e9
    del a, b
    src = torch.randn(1 << 29, device=device, generator=g)  # 2 GiB
    dst = torch.empty_like(src)
    seconds, _ = timed(lambda: dst.copy_(src), device, repeats)
    return gemm, 2 * src.numel() * 4 / seconds / 1e9


def gemm_rate(A: torch.Tensor, width: int, device: str, repeats: int) -> float:
    """GFLOP/s of the sketch product A @ Omega at this width (the pass every method makes)."""
    omega = torch.randn(A.shape[-1], width, device=device)
    seconds, _ = timed(lambda: A @ omega, device, repeats)
    return 2 * A.numel() * width / seconds / 1e9


def run_shape(args, m: int, n: int, ranks: list[int], writer) -> None:
    """All tables of one shape: one test batch and one exact SVD, shared by every rank."""
    device = args.device
    A = slow_spectrum_batch(args.batch, m, n, device, seed=m * 7 + n)
    truth_start = time.perf_counter()
    truth = Truth(A)
    # On the CPU the exact SVD that provides the truth (float64) is the torch.linalg.svd row.
    svd = ("exact (float64)", time.perf_counter() - truth_start)
    if device == "cuda":  # one timed call on the whole batch (cuSOLVER warmed up on a small matrix)
        torch.linalg.svd(A[0, :256, :256], full_matrices=False)
        synchronize(device)
        start = time.perf_counter()
        torch.linalg.svd(A, full_matrices=False)
        synchronize(device)
        svd = ("exact (float32)", time.perf_counter() - start)
    for k in ranks:
        run_rank(args, A, truth, svd, k, writer)


def run_rank(args, A: torch.Tensor, truth: Truth, svd: tuple[str, float], k: int, writer) -> None:
    device, p, q = args.device, args.oversample, args.power_iters
    m, n = A.shape[-2:]
    methods = peers(k, p, device)
    rows: list[Row] = []
    rounds: dict = {}
    same = timed_together({name: (lambda fn=fn: fn(A, q)) for name, fn in methods.items()}, device, args.repeats, rounds)
    for name, (seconds, (U, S, V)) in same.items():
        rows.append(Row(name, f"q={q}", seconds, *truth.score(k, U, S, V)))
    rows.append(Row("torch.linalg.svd", svd[0], svd[1], 1.0, 1.0))
    base = next(r.seconds for r in rows if r.method == "torch.svd_lowrank")
    passes = 2 * q + 2
    gemm_flops = passes * 2 * m * n * (k + p) * args.batch
    a_bytes = passes * A.numel() * A.element_size()  # A read once per pass
    rate = gemm_rate(A, k + p, device, args.repeats)
    gpu = device == "cuda"
    writer(f"\n### {args.batch} x [{m}, {n}], rank {k}, oversample {p}, power_iters {q} ({passes} passes)")
    writer(f"sketch GEMM rate A@Omega (width {k + p}): {rate:.0f} GFLOP/s")
    extra = " A-read GB/s (% of copy) |" if gpu else ""
    writer(f"| method | setting | time (s) | vs svd_lowrank | paired | GEMM GFLOP/s{' (% of peak)' if gpu else ''} |{extra} error / optimal | subspace overlap |")
    writer("|---|---|---:|---:|---:|---:|" + ("---:|" if gpu else "") + "---:|---:|")
    for r in rows:
        flops, bandwidth = "-", "-"
        if r.setting.startswith("q="):
            flops = f"{gemm_flops / r.seconds / 1e9:.0f}"
            if gpu:
                gemm_peak, copy_peak = args.ceilings
                flops += f" ({100 * gemm_flops / r.seconds / 1e9 / gemm_peak:.0f} %)"
                bandwidth = f"{a_bytes / r.seconds / 1e9:.0f} ({100 * a_bytes / r.seconds / 1e9 / copy_peak:.0f} %)"
        cells = f" {bandwidth} |" if gpu else ""
        paired = f"{paired_speedup(rounds, r.method, 'torch.svd_lowrank'):.2f}x" if r.method in rounds else "-"
        writer(f"| {r.method} | {r.setting} | {r.seconds:.3f} | {base / r.seconds:.2f}x | {paired} | {flops} |{cells} {r.error_ratio:.4f} | {r.overlap:.3f} |")

    # Equal accuracy: each method's cheapest iteration count reaching the target overlap. Krylov
    # also runs with blocks narrower than the rank (a pass costs in proportion to the block).
    writer(f"\nequal subspace overlap >= {args.target_overlap}: fewest iterations per method")
    writer(f"| method | iterations | GEMM columns (passes x width) | time (s) | vs svd_lowrank | vs linalg.svd ({svd[0]}) | overlap | error / optimal |")
    writer("|---|---:|---:|---:|---:|---:|---:|---:|")
    methods = {name: fn for name, fn in {**methods, **narrow_krylov(k, device)}.items() if name not in SAME_SETTINGS_ONLY}
    width = {name: narrow_block(name) or k + p for name in methods}
    best: dict[str, Row] = {}
    for name, fn in methods.items():
        if name.startswith("sklearn") and args.skip_sklearn_sweep:
            continue
        first = max(0, -(-k // width[name]) - 1)  # the Krylov space must be at least k wide
        for iters in range(first, args.max_iters + 1):
            error, overlap = truth.score(k, *fn(A, iters))  # accuracy is deterministic: no timing yet
            if overlap >= args.target_overlap:
                best[name] = Row(name, str(iters), float("nan"), error, overlap)
                break
    # Then the cheapest setting of each method, timed taking turns.
    winners = {name: (lambda fn=methods[name], q=int(r.setting): fn(A, q)) for name, r in best.items()}
    for name, (seconds, _) in timed_together(winners, device, args.repeats).items():
        best[name].seconds = seconds
    reference_time = best.get("torch.svd_lowrank")
    for name in methods:
        if name.startswith("sklearn") and args.skip_sklearn_sweep:
            continue
        if name not in best:
            writer(f"| {name} | > {args.max_iters} | - | - | - | - | - | - |")
            continue
        r = best[name]
        ratio = f"{reference_time.seconds / r.seconds:.2f}x" if reference_time else "-"
        columns = (2 * int(r.setting) + 2) * width[name]
        writer(f"| {name} | {r.setting} | {columns} | {r.seconds:.3f} | {ratio} | {svd[1] / r.seconds:.1f}x | {r.overlap:.3f} | {r.error_ratio:.4f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small shapes and one rank: seconds")
    parser.add_argument("--shapes", nargs="*", help="m x n shapes, e.g. 3072x12288")
    parser.add_argument("--ranks", nargs="*", type=int, help="default 32 64 128 256 (quick: 32)")
    parser.add_argument("--batch", type=int, default=2, help="matrices per batch (default 2)")
    parser.add_argument("--oversample", type=int, default=8)
    parser.add_argument("--power-iters", type=int, default=2)
    parser.add_argument("--target-overlap", type=float, default=0.97)
    parser.add_argument("--max-iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-sklearn-sweep", action="store_true")
    parser.add_argument("--markdown", help="also append the tables to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not (torch.cuda.is_available() and loraport.cuda_built()):
        parser.error("--device cuda needs a GPU and loraport's CUDA build")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes] if args.shapes else (
        QUICK_SHAPES if args.quick else HUNYUAN_SHAPES
    )
    ranks = args.ranks or ([32] if args.quick else [32, 64, 128, 256])
    with markdown_tee(args.markdown) as writer:
        writer(f"\n## rsvd benchmark ({machine_description(args.device)})")
        args.ceilings = None
        if args.device == "cuda":
            args.ceilings = device_ceilings(args.device, args.repeats)
            writer(f"ceilings measured in this run: float32 GEMM 8192^3 {args.ceilings[0] / 1e3:.1f} TFLOP/s; "
                   f"device copy {args.ceilings[1]:.0f} GB/s (read + write)")
        for m, n in shapes:
            run_shape(args, m, n, ranks, writer)


if __name__ == "__main__":
    main()
