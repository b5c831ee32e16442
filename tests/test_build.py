"""What the build says about itself (loraport.BUILD_INFO: torch, CUDA, our kernels'
architectures) and, on a GPU, that a GPU the build has no image for takes ATen's kernels with
one warning naming it (scripts/gpu_check.sh runs this against a build for another GPU)."""

import os
import re
import subprocess
import sys

import pytest
import torch

import loraport


def test_build_info_names_torch_cuda_and_the_kernels_architectures():
    info = loraport.BUILD_INFO
    assert set(info) == {"torch", "cuda", "archs"}
    assert info["torch"] == torch.__version__
    archs = info["archs"].split(",") if info["archs"] else []
    assert all(re.fullmatch(r"(sm|compute)_\d+[af]?|all|all-major|native", a) for a in archs), archs
    if not info["cuda"]:
        assert archs == []  # a CPU-only build has no kernels; a CUDA build without nvcc neither
    assert torch._C._dispatch_has_kernel_for_dispatch_key("loraport::rsvd", "CUDA") == bool(info["cuda"])


def _image_runs_here(archs: list[str], major: int, minor: int) -> bool:
    """CUDA's rule: SASS sm_XY runs on X.Z for Z >= Y; PTX compute_XY is compiled for any GPU >= X.Y."""
    for arch in archs:
        kind, number = arch.split("_")
        digits = re.match(r"\d+", number).group()
        arch_major, arch_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and number == digits and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and number == digits and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


@pytest.mark.cuda
def test_a_gpu_without_an_image_of_our_kernels_takes_aten_with_one_warning():
    """In a fresh process (the check runs once per device and process): two rsvd calls, results
    as accurate as ever, and exactly one warning, naming the GPU and the build's architectures,
    where the build holds no image for this GPU -- none where it does."""
    archs = [a for a in loraport.BUILD_INFO["archs"].split(",") if a]
    if not archs:
        pytest.skip("this build has no kernels of its own (CUDA via ATen)")
    script = """
import warnings, torch, loraport
warnings.simplefilter("always")
g = torch.Generator("cuda").manual_seed(0)
A = torch.randn(4, 300, 16, device="cuda", generator=g) @ torch.randn(4, 16, 200, device="cuda", generator=g)
A += 1e-4 * torch.randn(4, 300, 200, device="cuda", generator=g)  # rank 16 and a little noise
with warnings.catch_warnings(record=True) as caught:
    for _ in range(2):
        U, S, V = loraport.rsvd(A, 16, power_iters=3)
best = torch.linalg.svdvals(A.double())[:, :16]
print(float(((S.double() - best).abs() / best).max()))
for w in caught:
    if "no image" in str(w.message):
        print("WARNING", str(w.message))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert float(lines[0]) < 1e-3  # the 16 singular values of a rank-16 matrix under 1e-4 noise
    warnings = [line for line in lines[1:] if line.startswith("WARNING")]
    if _image_runs_here(archs, *torch.cuda.get_device_capability()):
        assert warnings == []
    else:
        assert len(warnings) == 1, warnings
        assert torch.cuda.get_device_name() in warnings[0] and loraport.BUILD_INFO["archs"] in warnings[0]


def _imports(path: str) -> list[str]:
    """Every module name a Python file imports ("from .a import b" gives ".a.b")."""
    import ast

    names = []
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names += [module + "." + a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def _python_files(folder: str, skip: str | None = None) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
            if f.endswith(".py") and (skip is None or os.path.relpath(d, folder).split(os.sep)[0] != skip)]  # fmt: skip


def test_the_library_does_not_import_its_test_fixtures():
    """loraport.testing ships in the wheel as a plainly named testing package; the library never
    imports it (fixtures may import the library, not the reverse)."""
    package = os.path.dirname(loraport.__file__)
    offenders = [f"{os.path.relpath(path, package)}: {n}" for path in _python_files(package, skip="testing")
                 for n in _imports(path) if re.match(r"\.+testing\b|loraport\.testing\b", n)]  # fmt: skip
    assert os.path.isdir(os.path.join(package, "testing")) and offenders == [], offenders


def test_no_test_imports_the_benchmarks():
    """The suite stands on its own: what a test shares with the benchmarks lives in
    loraport.testing (the benchmarks may import the package, never the reverse)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    offenders = [f"{os.path.basename(path)}: {n}" for path in _python_files(tests)
                 for n in _imports(path) if re.match(r"benchmarks\b", n)]  # fmt: skip
    assert offenders == [], offenders
