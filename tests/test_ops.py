"""Engine-core tests: the three ops against float64 references (known spectra, Eckart-Young
optimal error, exact subspaces), their contracts (opcheck, torch.compile, fake kernels), batch
and dtype handling, bad input, and CPU against CUDA when a GPU is there."""

import math
import platform

import pytest
import torch
from conftest import DEVICES

import loraport
from loraport import reference as ref
from loraport.engine_knobs import override_for_testing
from loraport.lowrank import ProductSVD

SLOW = torch.arange(1, 301, dtype=torch.float64) ** -0.5  # sigma_i = i^-1/2: slow decay
FAST = 0.8 ** torch.arange(300, dtype=torch.float64)  # geometric: fast decay (fp32-representable)


def spectrum_matrix(m, n, spectrum, generator, batch=()):
    mats = [ref.matrix_with_spectrum(m, n, spectrum[: min(m, n)], generator=generator) for _ in range(math.prod(batch))]
    return torch.stack(mats).reshape(*batch, m, n)


def orthogonality_error(Q):
    k = Q.shape[-1]
    return (Q.double().mT @ Q.double() - torch.eye(k, dtype=torch.float64, device=Q.device)).abs().amax().item()


# ---------------------------------------------------------------- rsvd accuracy (float64 oracle)
@pytest.mark.parametrize("method", ["power", "krylov"])
@pytest.mark.parametrize("spectrum, bound", [(FAST, 1.05), (SLOW, 1.2)], ids=["fast", "slow"])
@pytest.mark.parametrize(
    "m, n", [(300, 200), (200, 300), (3000, 200)], ids=["tall", "wide", "tall-choleskyqr"]
)  # 3000 rows: the CPU's blocks exceed its Householder size, so CholeskyQR2 runs (fp32 first Gram or its fp64 fallback)
def test_rsvd_error_vs_optimal(method, spectrum, bound, m, n, rsvd_device, generator):
    device = rsvd_device
    A = spectrum_matrix(m, n, spectrum, generator, batch=(3,)).float().to(device)
    k = 16
    U, S, V = loraport.rsvd(A, k, power_iters=2, method=method, seed=0)
    assert U.shape == (3, m, k) and S.shape == (3, k) and V.shape == (3, n, k)
    ratio = ref.reconstruction_error(A, U, S, V) / ref.optimal_error(A, k)
    assert ratio.max() <= bound, ratio
    assert orthogonality_error(U) <= 1e-5 and orthogonality_error(V) <= 1e-5
    assert (S >= 0).all() and (S[..., :-1] >= S[..., 1:]).all()
    # The leading half of the singular values: within 2 % of the true ones (the tail of a slow
    # spectrum is not resolved at power_iters=2; that is what the error bound allows).
    S_true = torch.linalg.svdvals(A.double())[..., : k // 2]
    assert torch.allclose(S.double()[..., : k // 2], S_true, rtol=2e-2)


def test_rsvd_subspace_overlap_krylov_beats_power(generator):
    """On a slow spectrum the subspace converges slowly (MISSION.md); krylov must find a closer
    top-k subspace than power at the same number of passes over A, and both must improve with
    iterations. Bounds are ~0.05 under the values measured for these sizes (5 seeds)."""
    A = spectrum_matrix(400, 300, SLOW, generator).float()
    k = 16
    U_true, _, V_true = ref.svd_truncated(A, k)
    overlap = {}
    for method in ("power", "krylov"):
        for q in (1, 2, 4):
            U, _, V = loraport.rsvd(A, k, power_iters=q, method=method, seed=3)
            overlap[method, q] = loraport.subspace_similarity(U.double(), U_true).item()
    assert overlap["power", 1] < overlap["power", 2] < overlap["power", 4]
    for q in (1, 2, 4):
        assert overlap["krylov", q] > overlap["power", q] or overlap["power", q] > 0.999
    assert overlap["power", 2] > 0.85 and overlap["krylov", 2] > 0.95 and overlap["krylov", 4] > 0.99
    # A perfectly random subspace would score k / m = 0.04.
    assert overlap["power", 1] > 0.5


@pytest.mark.parametrize(
    "method, width", [("power", 20), ("krylov", 20), ("krylov", 8)], ids=["power", "krylov", "krylov-narrow-block"]
)
@pytest.mark.parametrize("m, n", [(250, 180), (180, 250)], ids=["tall", "wide"])
def test_rsvd_matches_reference_algorithm(method, width, m, n, generator):
    """Same sketch, same subspace as the textbook float64 algorithm (Householder QR); wide
    matrices are decomposed as A^T and a Krylov block may be narrower than the rank (8 < 12)."""
    A = spectrum_matrix(m, n, SLOW, generator).double()
    sketch = torch.randn(min(m, n), width, dtype=torch.float64, generator=generator)
    U, S, V = torch.ops.loraport.rsvd(A, sketch, 12, 2, method)
    U_ref, S_ref, V_ref = ref.rsvd(A, sketch, 12, 2, method)
    assert torch.allclose(S, S_ref, rtol=1e-9)
    assert loraport.subspace_similarity(U, U_ref).item() == pytest.approx(1.0, abs=1e-9)
    assert loraport.subspace_similarity(V, V_ref).item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("method", ["power", "krylov"])
def test_rsvd_float64_resolves_a_fast_spectrum_to_its_tail(method, rsvd_device, generator):
    """float64 on a spectrum 0.7^j at rank 65 (sigma_65 / sigma_1 = 8e-11): near-optimal error.
    The fp64 eigensolver of the factor's Gram (the CUDA op's Rayleigh-Ritz step for float32)
    squares the condition number and missed this by 200x (1.7e-8 against an optimal 8.5e-11,
    relative to ||A||), so float64 work takes the factor's SVD."""
    device = rsvd_device
    spectrum = 0.7 ** torch.arange(300, dtype=torch.float64)  # 300 columns: room for krylov's 3 blocks of 73
    A = spectrum_matrix(400, 300, spectrum, generator, batch=(2,)).to(device)
    U, S, V = loraport.rsvd(A, 65, method=method, seed=1)
    A, U, S, V = (t.cpu() for t in (A, U, S, V))
    assert (ref.reconstruction_error(A, U, S, V) / ref.optimal_error(A, 65)).max() <= 1.05
    assert orthogonality_error(U) <= 1e-12 and orthogonality_error(V) <= 1e-12


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
def test_rsvd_every_dtype(dtype, tol, rsvd_device, generator):
    device = rsvd_device
    A = spectrum_matrix(160, 120, FAST, generator, batch=(2,)).to(device, dtype)
    U, S, V = loraport.rsvd(A, 10, seed=1)
    assert U.dtype == S.dtype == V.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Against the optimal error of the matrix actually given (after rounding to dtype).
    ratio = ref.reconstruction_error(A, U, S, V) / ref.optimal_error(A, 10)
    assert ratio.max() <= 1.05
    assert orthogonality_error(U) <= tol and orthogonality_error(V) <= tol


def test_rsvd_bf16_batched_equals_single(generator):
    """bf16 is upcast inside the op; a bf16 batch gives what each matrix gives alone."""
    A = spectrum_matrix(120, 90, SLOW, generator, batch=(4,)).bfloat16()
    U, S, V = loraport.rsvd(A, 8, seed=5)
    for i in range(4):
        Ui, Si, Vi = loraport.rsvd(A[i], 8, seed=5)
        assert torch.allclose(S[i], Si, rtol=1e-5)
        assert loraport.subspace_similarity(U[i], Ui).item() == pytest.approx(1.0, abs=1e-5)


def test_rsvd_narrow_krylov_block_beats_power_at_equal_flops(generator):
    """A pass costs in proportion to the block width: krylov with block 8 and power_iters=5
    (12 passes x 8 columns) must find a closer top-16 subspace than power with its 24-column
    sketch at power_iters=2 (6 passes x 24 columns, 1.5x the flops), and stay near-optimal."""
    A = spectrum_matrix(400, 300, SLOW, generator).float()
    k = 16
    U_true, _, V_true = ref.svd_truncated(A, k)
    U, S, V = loraport.rsvd(A, k, power_iters=5, method="krylov", block_size=8, seed=3)
    U_p, _, _ = loraport.rsvd(A, k, power_iters=2, method="power", seed=3)
    narrow, power = (loraport.subspace_similarity(u, U_true.float()).item() for u in (U, U_p))
    assert narrow > power + 0.03, (narrow, power)
    assert (ref.reconstruction_error(A, U, S, V) / ref.optimal_error(A, k)).item() <= 1.05
    assert orthogonality_error(U) <= 1e-5 and orthogonality_error(V) <= 1e-5


@pytest.mark.parametrize("m, n", [(120, 90), (90, 120)])
@pytest.mark.parametrize("per_chunk", [1, 2])
def test_rsvd_half_precision_upcast_in_chunks(generator, engine_knob, m, n, per_chunk, rsvd_device):
    """A bf16 batch larger than one upcast chunk is decomposed chunk by chunk (1 or 2 matrices per
    chunk, set through the knob upcast_chunk_bytes; with 2, the last chunk half-fills the reused
    staging buffer), tall and wide, with the same result as in one chunk."""
    device = rsvd_device
    A = spectrum_matrix(m, n, SLOW, generator, batch=(5,)).to(device, torch.bfloat16)
    whole = loraport.rsvd(A, 8, seed=5, method="krylov")
    engine_knob(upcast_chunk_bytes=str(per_chunk * m * n * 4 + 100))  # fp32 matrices
    chunked = loraport.rsvd(A, 8, seed=5, method="krylov")
    torch.testing.assert_close(chunked.S, whole.S, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.U, whole.U, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked.V, whole.V, rtol=1e-4, atol=1e-4)
    assert (ref.reconstruction_error(A, *chunked) / ref.optimal_error(A, 8)).max() <= 1.2


@pytest.mark.parametrize("method", ["power", "krylov"])
def test_rsvd_batched_equals_unbatched(method, rsvd_device, generator):
    device = rsvd_device
    A = spectrum_matrix(96, 64, SLOW, generator, batch=(2, 3)).float().to(device)
    U, S, V = loraport.rsvd(A, 6, seed=11, method=method)
    assert U.shape == (2, 3, 96, 6) and S.shape == (2, 3, 6) and V.shape == (2, 3, 64, 6)
    for i in range(2):
        for j in range(3):
            Uij, Sij, Vij = loraport.rsvd(A[i, j], 6, seed=11, method=method)
            torch.testing.assert_close(S[i, j], Sij, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(U[i, j], Uij, rtol=1e-4, atol=1e-4)  # signs are normalized
            torch.testing.assert_close(V[i, j], Vij, rtol=1e-4, atol=1e-4)


def test_rsvd_non_contiguous_inputs(rsvd_device, generator):
    device = rsvd_device
    base = spectrum_matrix(140, 100, SLOW, generator).float().to(device)
    views = {
        "transposed": base.mT,  # [100, 140], column-major
        "strided": spectrum_matrix(140, 200, SLOW, generator).float().to(device)[:, ::2],
        "expanded batch": base.expand(3, 140, 100),
    }
    for name, A in views.items():
        assert not A.is_contiguous(), name
        U, S, V = loraport.rsvd(A, 8, seed=2)
        U_c, S_c, V_c = loraport.rsvd(A.contiguous(), 8, seed=2)
        torch.testing.assert_close(S, S_c, rtol=1e-5, atol=1e-6, msg=name)
        assert (ref.reconstruction_error(A, U, S, V) / ref.optimal_error(A, 8)).max() <= 1.2, name


def _cpu_has_avx2_fma():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


needs_avx2 = pytest.mark.skipif(not _cpu_has_avx2_fma(), reason="the CPU kernels of csrc/cpu/kernels_avx2.h need x86-64 with AVX2 and FMA")


def assert_same_decomposition(got, want, A, k, error_rtol):
    """Two rsvd paths that differ only in fp32 rounding: the same singular values, subspaces and
    error relative to optimal; got's factors orthonormal."""
    torch.testing.assert_close(got.S, want.S, rtol=1e-5, atol=1e-6 * float(want.S.max()))
    for Ug, Uw in ((got.U, want.U), (got.V, want.V)):
        sim = loraport.subspace_similarity(Ug, Uw)
        assert (sim > 1 - 1e-5).all(), sim
    err_got = ref.reconstruction_error(A, *got) / ref.optimal_error(A, k)
    err_want = ref.reconstruction_error(A, *want) / ref.optimal_error(A, k)
    torch.testing.assert_close(err_got, err_want, rtol=error_rtol, atol=0)
    assert orthogonality_error(got.U) <= 1e-5 and orthogonality_error(got.V) <= 1e-5


def _rsvd_plain(A, rank, **kw):
    """rsvd with the fused CPU pass turned off: one GEMM per product."""
    with override_for_testing(gram_pass="0"):
        return loraport.rsvd(A, rank, **kw)


@needs_avx2
@pytest.mark.parametrize("method", ["power", "krylov"])
@pytest.mark.parametrize("q", [0, 1, 2])
@pytest.mark.parametrize(
    "batch, m, n, k",
    [
        ((), 1001, 203, 13),  # tall, sketch width 21: one 24-wide panel with 3 zero columns
        ((3,), 1003, 257, 32),  # a batch (threaded over matrices), width 40: panels of 24 + 16
        ((2,), 257, 1003, 5),  # wide: the fused pass reads the column-major view A^T; width 13
        ((), 4099, 66, 3),  # rows and columns not multiples of the 4-row tile, width 11
        ((), 130, 4101, 4),  # wide, 4101 rows: a last block of rows not a multiple of 4 (ragged column slice), width 12
        ((), 4101, 130, 4),  # tall, M has 130 columns: a 2-column last tile of W
    ],
)
def test_rsvd_gram_pass_matches_one_gemm_per_product(generator, method, q, batch, m, n, k):
    """The fused CPU pass (csrc/cpu/gram_pass_avx2.cpp: M X and M^T (M X) in one read of M) is
    the same power or block Krylov iteration as one GEMM per product, up to fp32 rounding, on
    shapes that hit every edge of its tiling; and it does run (the results are not bit-identical,
    as they are when the op falls back to the plain path)."""
    A = spectrum_matrix(m, n, SLOW, generator, batch=batch).float()
    fused = loraport.rsvd(A, k, power_iters=q, method=method, seed=4)
    plain = _rsvd_plain(A, k, power_iters=q, method=method, seed=4)
    assert not torch.equal(fused.S, plain.S) or not torch.equal(fused.U, plain.U)
    assert_same_decomposition(fused, plain, A, k, error_rtol=1e-4)


@needs_avx2
@pytest.mark.parametrize("method", ["power", "krylov"])
@pytest.mark.parametrize("m, n", [(1001, 203), (203, 1001)], ids=["tall", "wide"])
def test_rsvd_gram_pass_falls_back_on_fast_spectra(generator, method, m, n):
    """On a spectrum decaying by 2x per singular value, applying M^T to an unorthonormalized M X
    would lose the weaker sketch directions to fp32 rounding: the op sees the ill-conditioning
    and redoes the matrix with one GEMM per product, giving exactly the plain path's result. In
    a batch, only that matrix is redone."""
    fast = 0.5 ** torch.arange(300, dtype=torch.float64)
    A = spectrum_matrix(m, n, fast, generator).float()
    fused = loraport.rsvd(A, 12, power_iters=2, method=method, seed=1)
    plain = _rsvd_plain(A, 12, power_iters=2, method=method, seed=1)
    for got, want in zip(fused, plain):
        assert torch.equal(got, want)
    mixed = torch.stack([spectrum_matrix(m, n, SLOW, generator), A.double(), spectrum_matrix(m, n, SLOW, generator)]).float()
    U, S, V = loraport.rsvd(mixed, 12, power_iters=2, method=method, seed=1)
    ratio = ref.reconstruction_error(mixed, U, S, V) / ref.optimal_error(mixed, 12)
    assert ratio.max() <= 1.2, ratio
    torch.testing.assert_close(S[1], plain.S, rtol=1e-5, atol=1e-6)


@needs_avx2
@pytest.mark.parametrize("m, n", [(1001, 203), (203, 1001)], ids=["tall", "wide"])
def test_rsvd_gram_pass_krylov_falls_back_when_the_space_is_exhausted(generator, m, n):
    """A of exact rank 12 and Krylov blocks of 8: the first block is well conditioned, but only 4
    new directions are left for the second, the rest being rounding. The fused Krylov pass would
    blow that rounding of A^T Y up in the block's image; the op sees the amplification and redoes
    the matrix with one GEMM per product (exactly the plain path's result)."""
    flat = torch.cat([torch.linspace(1.0, 0.5, 12, dtype=torch.float64), torch.zeros(300, dtype=torch.float64)])
    A = spectrum_matrix(m, n, flat, generator).float()
    kw = dict(power_iters=2, method="krylov", block_size=8, seed=2)
    fused = loraport.rsvd(A, 8, **kw)
    plain = _rsvd_plain(A, 8, **kw)
    for got, want in zip(fused, plain):
        assert torch.equal(got, want)


@needs_avx2
@pytest.mark.parametrize("method", ["power", "krylov"])
@pytest.mark.parametrize("spectrum", ["slow", "fast"])
@pytest.mark.parametrize(
    "batch, m, n, k",
    [
        # (every m * width above 2^16, where CholeskyQR replaces Householder QR)
        ((), 4001, 203, 13),  # width 21: Gram and product panels padded to 24, m % 4 = 1
        ((3,), 2003, 257, 32),  # a batch over the threads, width 40 (panels of 24 + 16)
        ((2,), 257, 6003, 5),  # wide (the tall orientation is A^T), width 13
        ((), 8003, 66, 3),  # width 11, m % 4 = 3
        ((), 2000, 400, 120),  # width 128: the largest R the CPU's back substitution inverts;
        # Krylov's Rayleigh-Ritz basis (384 columns) goes to ATen's triangular solve
    ],
)
def test_rsvd_skinny_kernels_match_aten(generator, method, spectrum, batch, m, n, k):
    """The CPU's small-product kernels (csrc/cpu/skinny_avx2.cpp: CholeskyQR's fp32 and fp64
    Grams, Y R^{-1} with its triangular inverse, the Rayleigh-Ritz products) give ATen's results
    up to fp32 rounding, on shapes that hit every edge of their tiling; and they do run. On the
    fast spectrum (0.8^i) the sketch's diagonal spread sends CholeskyQR to the fp64 Gram."""
    decay = SLOW if spectrum == "slow" else FAST
    k = k if spectrum == "slow" else min(k, 32)  # fast: sigma_32 / sigma_1 = 8e-4, resolved in fp32
    A = spectrum_matrix(m, n, decay, generator, batch=batch).float()
    ours = loraport.rsvd(A, k, power_iters=2, method=method, seed=3)
    with override_for_testing(skinny_kernels="0"):
        aten = loraport.rsvd(A, k, power_iters=2, method=method, seed=3)
    assert not torch.equal(ours.U, aten.U)
    assert_same_decomposition(ours, aten, A, k, error_rtol=1e-4)


@pytest.mark.parametrize("choice", ["eigh", "host"])
@pytest.mark.parametrize("method", ["power", "krylov"])
@pytest.mark.parametrize("case", ["slow", "fast", "rank-deficient", "float64"])
@pytest.mark.parametrize("rank", [20, 60])
def test_rsvd_eigh_rayleigh_ritz_matches_svd(engine_knob, generator, choice, method, case, rank):
    """The CUDA op's Rayleigh-Ritz steps (the fp64 eigendecomposition of the small factor's Gram,
    then the QR of the Ritz vectors' images, on the device or on the host:
    RsvdPolicy::SmallSvd), run on the CPU through the knob rayleigh_ritz: the SVD's triplets
    where they are resolved, orthonormal everywhere, also across the noise directions of an
    exactly rank-deficient input. On the device that QR is the op's CholeskyQR2; on the CPU it
    is Householder QR up to 2048 elements (rank 20: 28 x 20, 84 x 20 for krylov) and
    CholeskyQR2 above (rank 60: 68 x 60), where the rank-deficient input's noise columns must
    take its fallback."""
    if case == "rank-deficient":
        A = torch.randn(3, 500, 5, generator=generator) @ torch.randn(3, 5, 90, generator=generator)
    else:
        A = spectrum_matrix(600, 300, FAST if case == "fast" else SLOW, generator, batch=(2,))
        A = A if case == "float64" else A.float()
    results = {}
    for small_svd in ("svd", choice):
        engine_knob(rayleigh_ritz=small_svd)
        results[small_svd] = loraport.rsvd(A, rank, power_iters=2, method=method, seed=4)
    (U, S, V), (U_svd, S_svd, V_svd) = results[choice], results["svd"]
    orthonormal = 1e-12 if case == "float64" else 1e-5
    assert orthogonality_error(U) <= orthonormal and orthogonality_error(V) <= orthonormal
    assert (S[..., :-1] >= S[..., 1:]).all() and (S >= 0).all()
    error = ref.reconstruction_error(A, U, S, V)
    if case == "rank-deficient":
        assert (error / A.double().norm(dim=(-2, -1))).max() <= 1e-5
        assert (S[..., 5:] <= 1e-4 * S[..., :1]).all()
        return
    tol = 1e-10 if case == "float64" else 1e-5
    torch.testing.assert_close(S, S_svd, rtol=tol, atol=tol * S_svd.max().item())
    # Fast decay at rank 60 (sigma_61 / sigma_1 = 1e-6): both errors are A's fp32 rounding.
    noise = 1e-6 * A.double().norm().item() if case == "fast" and rank > 32 else 0
    torch.testing.assert_close(error, ref.reconstruction_error(A, U_svd, S_svd, V_svd), rtol=tol, atol=noise)
    for X, X_svd in ((U, U_svd), (V, V_svd)):  # the top half: well separated from the rest
        top = rank // 2
        assert loraport.subspace_similarity(X[..., :top], X_svd[..., :top]).min().item() == pytest.approx(1.0, abs=tol)


def test_rsvd_eigh_rayleigh_ritz_in_slices(engine_knob, generator):
    """More small matrices than one batched eigensolver call takes (4096,
    csrc/linalg/rayleigh_ritz.cpp): the slices give what the SVD gives."""
    A = torch.randn(4100, 12, 7, generator=generator)
    results = {}
    for choice in ("svd", "eigh"):
        engine_knob(rayleigh_ritz=choice)
        results[choice] = loraport.rsvd(A, 3, oversample=2, seed=0)
    torch.testing.assert_close(results["eigh"].S, results["svd"].S, rtol=1e-5, atol=1e-6)
    for part in (slice(0, 3), slice(4094, 4098), slice(-2, None)):
        for X, X_svd in zip(results["eigh"][::2], results["svd"][::2]):
            torch.testing.assert_close(X[part], X_svd[part], rtol=1e-4, atol=1e-4)
    assert orthogonality_error(results["eigh"].U[-50:]) <= 1e-5


def test_rsvd_rank_at_or_above_min_dim_is_exact(generator):
    A = torch.randn(3, 40, 25, generator=generator, dtype=torch.float64)
    for rank in (25, 60):  # rank is clamped to min(m, n) = 25
        U, S, V = loraport.rsvd(A, rank, seed=0)
        assert U.shape == (3, 40, 25) and V.shape == (3, 25, 25)
        assert ref.reconstruction_error(A, U, S, V).max() <= 1e-10 * A.norm()
    U, S, V = loraport.rsvd(A.float().mT, 30, oversample=100, seed=0)  # wide; sketch clamped too
    assert U.shape == (3, 25, 25)
    assert orthogonality_error(U) <= 1e-5


@pytest.mark.parametrize("method", ["power", "krylov"])
@pytest.mark.parametrize("m", [40, 120, 3000], ids=["small-householder", "medium-choleskyqr", "large-choleskyqr"])
def test_rsvd_exactly_low_rank_input_keeps_orthonormal_basis(method, m, rsvd_device, generator):
    """A rank-5 matrix asked for rank 20: the sketch is numerically rank-deficient. Small blocks
    (on the CPU at most 2048 elements: 40 x 28) are factored by Householder QR directly; on
    larger ones CholeskyQR breaks down and the fallback must still return orthonormal U and V and
    an exact fit."""
    device = rsvd_device
    A = (torch.randn(4, m, 5, generator=generator) @ torch.randn(4, 5, 90, generator=generator)).to(device)
    U, S, V = loraport.rsvd(A, 20, power_iters=3, method=method, seed=0)
    assert orthogonality_error(U) <= 1e-5 and orthogonality_error(V) <= 1e-5
    assert (ref.reconstruction_error(A, U, S, V) / A.double().norm(dim=(-2, -1))).max() <= 1e-5
    assert (S[..., 5:] <= 1e-4 * S[..., :1]).all()


@pytest.mark.parametrize("small_svd", ["svd", "eigh", "host"])
@pytest.mark.parametrize("method", ["power", "krylov"])
@pytest.mark.parametrize("shape", [(3, 500, 90), (2, 90, 500), (3, 40, 30)])
def test_rsvd_zero_matrix(engine_knob, small_svd, method, shape, rsvd_device):
    """An all-zero layer (rank 60 of a 90-wide one; rank 20 of [40, 30]): S = 0 and orthonormal
    U, V, by every Rayleigh-Ritz choice. Every factorization on the way sees a zero matrix, so
    each CholeskyQR fails and must fall back to Householder QR, the eigh choice's QR of the Ritz
    vectors' images included (the images are exactly zero)."""
    device = rsvd_device
    engine_knob(rayleigh_ritz=small_svd)
    rank = 20 if shape[-1] == 30 else 60
    U, S, V = loraport.rsvd(torch.zeros(shape, device=device), rank, method=method, seed=0)
    assert U.isfinite().all() and V.isfinite().all()
    assert orthogonality_error(U.cpu()) <= 1e-5 and orthogonality_error(V.cpu()) <= 1e-5
    assert (S == 0).all()


def test_rsvd_same_seed_same_result(rsvd_device, generator):
    device = rsvd_device
    A = torch.randn(80, 60, generator=generator).to(device)
    first, again, other = (loraport.rsvd(A, 5, seed=s) for s in (7, 7, 8))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first.U, other.U)


# ---------------------------------------------------------------- project_lora
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_project_lora_equals_dense_formula(dtype, device, generator):
    m, n, r, k = 90, 70, 6, 12
    up = torch.randn(2, m, r, generator=generator).to(device, dtype)
    down = torch.randn(2, r, n, generator=generator).to(device, dtype)
    U = torch.linalg.qr(torch.randn(2, m, k, generator=generator, dtype=torch.float64)).Q.to(device)
    V = torch.linalg.qr(torch.randn(2, n, k, generator=generator, dtype=torch.float64)).Q.to(device)
    up2, down2 = loraport.project_lora(up, down, U.to(dtype), V.to(dtype))
    assert up2.shape == (2, m, r) and down2.shape == (2, r, n) and up2.dtype == dtype
    dense = ref.project_lora_dense(up, down, U.to(dtype), V.to(dtype))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    error = torch.linalg.matrix_norm(up2.double() @ down2.double() - dense) / torch.linalg.matrix_norm(dense)
    assert error.max() <= tol
    # Singular values are split evenly: both factors carry the same column/row norms.
    torch.testing.assert_close(up2.double().norm(dim=-2), down2.double().norm(dim=-1), rtol=tol * 10, atol=tol)


def test_project_lora_truncation_is_optimal(generator):
    m, n, r, k = 60, 50, 8, 10
    up = torch.randn(m, r, generator=generator, dtype=torch.float64)
    down = torch.randn(r, n, generator=generator, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64)).Q
    up2, down2 = loraport.project_lora(up, down, U, V, rank=3)
    assert up2.shape == (m, 3) and down2.shape == (3, n)
    best = ref.best_rank(ref.project_lora_dense(up, down, U, V), 3)
    torch.testing.assert_close(up2 @ down2, best, rtol=1e-10, atol=1e-10)


def test_project_lora_rank_above_subspace_is_clamped_default(generator):
    up = torch.randn(40, 16, generator=generator, dtype=torch.float64)
    down = torch.randn(16, 30, generator=generator, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(40, 4, generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(30, 4, generator=generator, dtype=torch.float64)).Q
    up2, down2 = loraport.project_lora(up, down, U, V)  # k = 4 < r = 16: output rank 4, exact
    assert up2.shape == (40, 4)
    torch.testing.assert_close(up2 @ down2, ref.project_lora_dense(up, down, U, V), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_product_svd_is_the_svd_of_the_product(dtype, generator):
    """product_svd (the core of project_lora and of lowrank.ProductSVD) against float64
    torch.linalg.svd of the dense product of the same (rounded) factors, on a batch in which one
    stack is exactly rank-deficient (a LoRA merged with itself); ProductSVD's rank-k factors are
    the best rank-k approximation."""
    G, m, n, p = 3, 70, 50, 6
    up = torch.randn(G, m, p, generator=generator, dtype=torch.float64)
    down = torch.randn(G, p, n, generator=generator, dtype=torch.float64)
    up[1, :, 3:], down[1, 3:] = up[1, :, :3], down[1, :3]  # rank 3 in 6 columns
    up, down = up.to(dtype), down.to(dtype)
    A, S, B = torch.ops.loraport.product_svd(up, down)  # [G, p, p], [G, p], [G, p, p] float64
    dense = up.double() @ down.double()  # [G, m, n]
    torch.testing.assert_close(S, torch.linalg.svdvals(dense)[:, :p], rtol=0, atol=1e-12 * S[:, :1].max().item())
    Uf, Vf = up.double() @ A, down.double().mT @ B  # [G, m, p], [G, n, p]
    torch.testing.assert_close((Uf * S[:, None, :]) @ Vf.mT, dense, rtol=0, atol=1e-11 * dense.abs().max().item())
    for g, rank in ((0, p), (1, 3), (2, p)):  # orthonormal columns where S > 0
        torch.testing.assert_close(Uf[g, :, :rank].mT @ Uf[g, :, :rank], torch.eye(rank, dtype=torch.float64), atol=1e-9, rtol=0)
    assert S[1, 3:].max() <= 1e-12 * S[1, 0]
    new_up, new_down = ProductSVD(up.double(), down.double()).factors(2)
    for g in range(G):
        torch.testing.assert_close(new_up[g] @ new_down[g], ref.best_rank(dense[g], 2), rtol=1e-10, atol=1e-10)


def test_project_lora_never_forms_m_by_n():
    """m = n = 2^20: the dense update would need 8 TiB in fp64; the op must not care."""
    m = n = 1 << 20
    r, k = 4, 8
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    up = U[:, :r] * 3.0 + 0.01 * torch.randn(m, r, generator=g, dtype=torch.float64)
    down = (V[:, :r] * 2.0).mT.contiguous()
    up2, down2 = loraport.project_lora(up, down, U, V)
    assert up2.shape == (m, r) and down2.shape == (r, n)
    # Check on random probes: (up2 down2) x = U U^T up down V V^T x, without the dense matrix.
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    lhs = up2 @ (down2 @ x)
    rhs = U @ (U.mT @ (up @ (down @ (V @ (V.mT @ x)))))
    assert torch.linalg.norm(lhs - rhs) <= 1e-10 * torch.linalg.norm(rhs)


# ---------------------------------------------------------------- subspace_similarity
@pytest.mark.parametrize("device", DEVICES)
def test_subspace_similarity_against_reference(device, generator):
    orthonormal = lambda *shape: torch.linalg.qr(torch.randn(*shape, generator=generator)).Q.to(device)  # noqa: E731
    U1, U2 = orthonormal(3, 50, 6), orthonormal(3, 50, 9)
    sim = loraport.subspace_similarity(U1, U2)
    assert sim.shape == (3,) and sim.device == U1.device
    torch.testing.assert_close(sim.double(), ref.subspace_similarity(U1, U2), rtol=1e-5, atol=1e-6)
    assert ((0 <= sim) & (sim <= 1)).all()
    same = loraport.subspace_similarity(U1, U1 @ orthonormal(6, 6))
    torch.testing.assert_close(same.cpu(), torch.ones(3), atol=1e-5, rtol=0)
    Q = orthonormal(50, 12)
    assert loraport.subspace_similarity(Q[:, :6], Q[:, 6:]).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- weight_times (the default gate's products)
def _weight_times_error(out: torch.Tensor, A: torch.Tensor, basis: torch.Tensor, transpose: bool) -> float:
    """max |out − oracle| / (|A|·|basis| · summed terms · 2⁻²⁴): under a few units for float32 sums."""
    exact = ref.weight_times(A.cpu(), basis.cpu(), transpose)
    scale = ref.weight_times(A.cpu().abs(), basis.cpu().abs(), transpose) * A.shape[0 if transpose else 1] * 2.0**-24
    return float(((out.cpu().double() - exact).abs() / scale.clamp_min(1e-300)).max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("m, n, l", [(37, 29, 24), (96, 128, 24), (5, 3, 2), (64, 33, 8), (33, 70, 13), (100, 70, 32),
                                     (50, 41, 40), (1031, 515, 24)])  # fmt: skip
def test_weight_times_against_reference(device, generator, dtype, transpose, m, n, l):
    A = torch.randn(m, n, generator=generator).to(dtype)
    basis = torch.randn(m if transpose else n, l, generator=generator)
    out = torch.ops.loraport.weight_times(A.to(device), basis.to(device), transpose)
    assert out.shape == (n if transpose else m, l) and out.dtype == torch.float32 and out.is_contiguous()
    assert _weight_times_error(out, A, basis, transpose) < 4


@pytest.mark.parametrize("transpose", [False, True])
def test_weight_times_bf16_kernels_against_aten_and_their_knob(engine_knob, generator, transpose):
    """The AVX512-BF16 kernels where this CPU runs them, and with the knob off ATen's GEMMs on
    a float32 copy: both within float32 summation error of the oracle, on shapes whose rows
    and columns are not multiples of the kernels' blocks."""
    A = torch.randn(1237, 3001, generator=generator).bfloat16()
    basis = torch.randn(1237 if transpose else 3001, 24, generator=generator)
    engine_knob(bf16_kernels="0")
    assert not torch.ops.loraport.bf16_kernels()
    aten = torch.ops.loraport.weight_times(A, basis, transpose)
    engine_knob(bf16_kernels="1")
    if not torch.ops.loraport.bf16_kernels():
        pytest.skip("this CPU (or this build) has no AVX512-BF16 kernels")
    ours = torch.ops.loraport.weight_times(A, basis, transpose)
    assert _weight_times_error(ours, A, basis, transpose) < 4 and _weight_times_error(aten, A, basis, transpose) < 4
    assert not torch.equal(ours, aten) or A.numel() == 0  # two implementations, not one path twice
    A[7, 11] = float("nan")  # a NaN reaches the sums of its row or column, and only those
    bad = torch.ops.loraport.weight_times(A, basis, transpose)
    hit = bad[11] if transpose else bad[7]
    assert bool(torch.isnan(hit).all()) and int(torch.isnan(bad).sum()) == hit.numel()


def test_weight_times_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="basis must have A's columns as rows"):
        torch.ops.loraport.weight_times(torch.randn(4, 5), torch.randn(4, 2), False)
    with pytest.raises(ValueError, match="basis must have A's rows as rows"):
        torch.ops.loraport.weight_times(torch.randn(4, 5).bfloat16(), torch.randn(5, 2), True)
    with pytest.raises(ValueError, match="must be matrices"):
        torch.ops.loraport.weight_times(torch.randn(2, 4, 5), torch.randn(5, 2), False)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda A: loraport.rsvd(A.clone().index_fill_(0, torch.tensor([3]), float("nan")), 4), "NaN or Inf"),
        (lambda A: loraport.rsvd(A.clone().index_fill_(1, torch.tensor([1]), float("inf")), 4), "NaN or Inf"),
        (lambda A: loraport.rsvd(A, 0), "rank must be an integer >= 1"),
        (lambda A: loraport.rsvd(A, -3), "rank must be an integer >= 1"),
        (lambda A: loraport.rsvd(A, 4, power_iters=-1), "power_iters"),
        (lambda A: loraport.rsvd(A, 4, method="lanczos"), "method must be one of"),
        (lambda A: loraport.rsvd(A.long(), 4), "floating-point"),
        (lambda A: loraport.rsvd(A[0], 4), r"\[\.\.\., rows, cols\]"),
        (lambda A: loraport.rsvd(A[:, :0], 4), "rows, cols >= 1"),
        (lambda A: torch.ops.loraport.rsvd(A, torch.randn(7, 4), 4, 1, "power"), "sketch must be"),
        (lambda A: torch.ops.loraport.rsvd(A, torch.randn(10, 4), 5, 1, "power"), "rank <= sketch width"),
        (lambda A: torch.ops.loraport.rsvd(A, torch.randn(10, 4), 9, 1, "krylov"), "Krylov space of 8 columns"),
        (lambda A: loraport.rsvd(A, 9, power_iters=1, method="krylov", block_size=4), "narrower than rank 9"),
        (lambda A: loraport.rsvd(A, 4, block_size=4), "block_size is a setting of"),
        (lambda A: loraport.project_lora(A[:, :3], torch.randn(4, 20), A[:, :5], torch.randn(20, 5)), "disagree on r"),
        (lambda A: loraport.project_lora(A[:, :3], torch.randn(3, 20), A[:7, :5], torch.randn(20, 5)), "U must be"),
        (lambda A: loraport.project_lora(A[:, :3], torch.randn(3, 20), A[:, :5], torch.randn(20, 5), rank=4), "rank must be in"),
        (lambda A: loraport.project_lora(A[:, :3], torch.full((3, 20), float("nan")), A[:, :5], torch.randn(20, 5)), "down contains NaN"),
        (lambda A: loraport.subspace_similarity(A[:, :3], torch.randn(11, 3)), "share the batch dims and m"),
        (lambda A: loraport.subspace_similarity(A[:, :3], torch.ones(10, 3, dtype=torch.int32)), "floating-point"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    A = torch.randn(10, 20)
    with pytest.raises(ValueError, match=message):
        call(A)


@pytest.mark.parametrize("small_svd", ["svd", "eigh", "host"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("method", ["power", "krylov"])
def test_rsvd_non_finite_entry_in_a_batch_raises_value_error(engine_knob, small_svd, value, method, rsvd_device, generator):
    """One NaN or Inf entry in one matrix of a batch of layer-sized blocks (CholeskyQR2, not
    Householder, on every device): ValueError naming it, for each Rayleigh-Ritz choice and in the
    CUDA flow too, where the failed factorizations are redone at the end of the op and the redo
    meets the NaN."""
    engine_knob(rayleigh_ritz=small_svd)
    A = torch.randn(3, 500, 90, generator=generator)
    A[1, 17, 40] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        loraport.rsvd(A.to(rsvd_device), 40, method=method, seed=0)


# ---------------------------------------------------------------- contracts
def _opcheck_cases(device):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 24, 18, generator=g)
    sketch = torch.randn(18, 8, generator=g)
    U = torch.linalg.qr(torch.randn(2, 24, 5, generator=g)).Q
    V = torch.linalg.qr(torch.randn(2, 18, 5, generator=g)).Q
    up, down = torch.randn(2, 24, 3, generator=g), torch.randn(2, 3, 18, generator=g)
    to = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    return [
        (torch.ops.loraport.rsvd.default, (*to(A, sketch), 6, 2, "power")),
        (torch.ops.loraport.rsvd.default, (*to(A.bfloat16(), sketch), 6, 1, "krylov")),
        (torch.ops.loraport.project_lora.default, (*to(up, down, U, V), 3)),
        (torch.ops.loraport.product_svd.default, tuple(to(up, down))),
        (torch.ops.loraport.subspace_similarity.default, tuple(to(U, U[..., :3]))),
        (torch.ops.loraport.weight_times.default, (*to(A[0].bfloat16(), V[0]), False)),
        (torch.ops.loraport.weight_times.default, (*to(A[0], U[0]), True)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


def test_ops_trace_under_torch_compile():
    def pipeline(A, up, down):
        U, S, V = loraport.rsvd(A, 4, seed=0)
        up2, down2 = torch.ops.loraport.project_lora(up, down, U, V, 2)
        return up2 @ down2, torch.ops.loraport.subspace_similarity(U, U)

    g = torch.Generator().manual_seed(0)
    A, up, down = torch.randn(30, 20, generator=g), torch.randn(30, 2, generator=g), torch.randn(2, 20, generator=g)
    compiled = torch.compile(pipeline, backend="aot_eager", fullgraph=False)
    out, sim = compiled(A, up, down)
    eager, eager_sim = pipeline(A, up, down)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(sim, eager_sim)


def test_build_registers_cuda_kernels_iff_built():
    for op in ("rsvd", "project_lora", "product_svd", "subspace_similarity"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"loraport::{op}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"loraport::{op}", "CUDA") == loraport.cuda_built()
    assert loraport.BUILD_INFO["torch"] == torch.__version__


# ---------------------------------------------------------------- CUDA against CPU
@pytest.mark.cuda
@pytest.mark.parametrize("method", ["power", "krylov"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_matches_cpu(method, dtype, generator):
    A = spectrum_matrix(300, 200, SLOW, generator, batch=(3,)).to(dtype)
    sketch = torch.randn(200, 24, generator=generator, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    cpu = torch.ops.loraport.rsvd(A, sketch, 16, 2, method)
    gpu = [t.cpu() for t in torch.ops.loraport.rsvd(A.cuda(), sketch.cuda(), 16, 2, method)]
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(gpu[1], cpu[1], rtol=tol, atol=tol)
    assert loraport.subspace_similarity(gpu[0], cpu[0]).min().item() == pytest.approx(1.0, abs=tol * 10)
    assert orthogonality_error(gpu[0]) <= (1e-12 if dtype == torch.float64 else 1e-5)
    up, down = torch.randn(3, 300, 4, generator=generator), torch.randn(3, 4, 200, generator=generator)
    p_cpu = loraport.project_lora(up, down, cpu[0], cpu[2])
    p_gpu = loraport.project_lora(up.cuda(), down.cuda(), gpu[0].cuda(), gpu[2].cuda())
    torch.testing.assert_close((p_gpu[0] @ p_gpu[1]).cpu(), p_cpu[0] @ p_cpu[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loraport.subspace_similarity(gpu[0].cuda(), gpu[0].cuda()).cpu(), torch.ones(3, dtype=gpu[0].dtype), atol=1e-5, rtol=0)


@pytest.mark.cuda
def test_cuda_rank_deficient_falls_back_without_error(generator):
    A = (torch.randn(2, 200, 4, generator=generator) @ torch.randn(2, 4, 150, generator=generator)).cuda()
    U, S, V = loraport.rsvd(A, 16, seed=0)
    assert orthogonality_error(U.cpu()) <= 1e-5 and orthogonality_error(V.cpu()) <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["power", "krylov"])
def test_cuda_gram_kernel_at_layer_sizes_matches_cpu(method, generator):
    """Sizes that take the CUDA Gram kernel (csrc/cuda/kernels.cu) through its row slices
    (m / 512 of them), several 16-wide tiles and ragged edges (l = 40; m not a multiple of 32),
    on a tall and a wide matrix: the CPU's result, and near-optimal."""
    A = spectrum_matrix(2600, 700, SLOW, generator, batch=(2,)).float()
    for X in (A, A.mT.contiguous()):
        sketch = torch.randn(700, 40, generator=generator)
        cpu = torch.ops.loraport.rsvd(X, sketch, 32, 2, method)
        gpu = [t.cpu() for t in torch.ops.loraport.rsvd(X.cuda(), sketch.cuda(), 32, 2, method)]
        torch.testing.assert_close(gpu[1], cpu[1], rtol=1e-4, atol=1e-6)
        for g, c in ((gpu[0], cpu[0]), (gpu[2], cpu[2])):
            assert loraport.subspace_similarity(g, c).min().item() == pytest.approx(1.0, abs=1e-3)
            assert orthogonality_error(g) <= 1e-5
        assert (ref.reconstruction_error(X, *gpu) / ref.optimal_error(X, 32)).max() <= 1.2


@pytest.mark.cuda
@pytest.mark.parametrize("small_svd", ["eigh", "host"])
@pytest.mark.parametrize("block", [130, 350])
def test_cuda_wide_krylov_space_matches_cpu(engine_knob, small_svd, block, generator):
    """Krylov spaces of 3 x 130 = 390 and 3 x 350 = 1050 columns: CholeskyQR's triangular
    inverses at widths ragged against the kernel's 4-warp blocks (csrc/cuda/kernels.cu), and
    beyond its 1024-column limit (ATen's solve), and the Rayleigh-Ritz step on the device or on
    the host (LORAPORT_RAYLEIGH_RITZ): the CPU's result."""
    engine_knob(rayleigh_ritz=small_svd)
    A = spectrum_matrix(3000, 1200, SLOW, generator, batch=(2,)).float()
    sketch = torch.randn(1200, block, generator=generator)
    cpu = torch.ops.loraport.rsvd(A, sketch, 100, 2, "krylov")
    gpu = [t.cpu() for t in torch.ops.loraport.rsvd(A.cuda(), sketch.cuda(), 100, 2, "krylov")]
    torch.testing.assert_close(gpu[1], cpu[1], rtol=1e-4, atol=1e-6)
    for g, c in ((gpu[0], cpu[0]), (gpu[2], cpu[2])):
        assert loraport.subspace_similarity(g[..., :50], c[..., :50]).min().item() == pytest.approx(1.0, abs=1e-3)
        assert orthogonality_error(g) <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["power", "krylov"])
def test_cuda_batched_eigensolver_matches_torch_eigh(engine_knob, method, generator):
    """The Rayleigh-Ritz eigensolver by one cuSOLVER call for the batch (csrc/cuda/batched_eigh.cpp;
    L = 72 for power, 216 for krylov, batch 3): LORAPORT_CUSOLVER_EIGH=require makes any fallback
    to torch.linalg.eigh an error, so this fails unless it ran and passed its own check; and it
    gives what torch.linalg.eigh (LORAPORT_CUSOLVER_EIGH=0) gives, within fp32 rounding."""
    A = spectrum_matrix(1500, 600, SLOW, generator, batch=(3,)).float().cuda()
    results = {}
    for choice in ("require", "0"):
        engine_knob(cusolver_eigh=choice)
        results[choice] = loraport.rsvd(A, 64, method=method, seed=5)
    batched, aten = results["require"], results["0"]
    torch.testing.assert_close(batched.S, aten.S, rtol=1e-5, atol=1e-6)
    for X, X_aten in ((batched.U, aten.U), (batched.V, aten.V)):
        assert orthogonality_error(X.cpu()) <= 1e-5
        assert loraport.subspace_similarity(X[..., :32], X_aten[..., :32]).min().item() == pytest.approx(1.0, abs=1e-4)
    A, batched = A.cpu(), [t.cpu() for t in batched]
    assert (ref.reconstruction_error(A, *batched) / ref.optimal_error(A, 64)).max() <= 1.2


@pytest.mark.cuda
def test_cuda_batch_larger_than_one_gram_launch(generator):
    """66000 small matrices: more than the 65535 blocks along grid.z of one Gram launch, so the
    kernel runs in two launches; matrices of either launch come out as they do alone."""
    A = torch.randn(66000, 40, 12, generator=generator).cuda()
    U, S, V = loraport.rsvd(A, 4, oversample=4, seed=0)
    for part in (slice(0, 3), slice(65534, 65537), slice(-3, None)):
        alone = loraport.rsvd(A[part], 4, oversample=4, seed=0)
        torch.testing.assert_close(S[part], alone.S, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(U[part], alone.U, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(V[part], alone.V, rtol=1e-4, atol=1e-4)
    assert orthogonality_error(U[-100:]) <= 1e-5


@pytest.mark.cuda
def test_cuda_project_lora_memory_is_factor_sized(generator):
    """m = n = 2^20 on the GPU: the dense update would take 4 TiB in float32; the op's peak
    allocation must stay of the order of its factors."""
    m = n = 1 << 20
    r, k = 4, 8
    U = torch.linalg.qr(torch.randn(m, k, generator=generator)).Q.cuda()
    V = torch.linalg.qr(torch.randn(n, k, generator=generator)).Q.cuda()
    up, down = torch.randn(m, r, generator=generator).cuda(), torch.randn(r, n, generator=generator).cuda()
    inputs = sum(t.numel() * t.element_size() for t in (U, V, up, down))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    up2, down2 = torch.ops.loraport.project_lora(up, down, U, V, r)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= inputs
    x = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    lhs = up2.cpu().double() @ (down2.cpu().double() @ x)
    Ud, Vd = U.cpu().double(), V.cpu().double()
    rhs = Ud @ (Ud.mT @ (up.cpu().double() @ (down.cpu().double() @ (Vd @ (Vd.mT @ x)))))
    assert torch.linalg.norm(lhs - rhs) <= 1e-4 * torch.linalg.norm(rhs)
