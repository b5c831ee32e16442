"""The engine knobs (docs/engine-knobs.md, csrc/config.h): read from the environment once, on first
use, by one parser; changed for a while only through the plainly named test hook
(loraport.engine_knobs.override_for_testing, the op loraport::_testing_set_knob)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import loraport
from loraport.engine_knobs import override_for_testing


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LORAPORT_")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env={**environment, **env}, capture_output=True, text=True
    )


def test_the_environment_is_read_once_on_first_use():
    """An invalid value raises ValueError naming the variable; a value set after the first op call
    is not seen (the ops read the parsed config, not the environment)."""
    bad = _run(
        """
        import torch, loraport
        try:
            loraport.rsvd(torch.randn(20, 10), 2, seed=0)
        except ValueError as error:
            print(error)
        """,
        LORAPORT_RAYLEIGH_RITZ="qr",
    )
    assert "LORAPORT_RAYLEIGH_RITZ must be svd, eigh or host, got qr" in bad.stdout, bad.stderr
    late = _run(
        """
        import os, torch, loraport
        loraport.rsvd(torch.randn(20, 10), 2, seed=0)
        os.environ["LORAPORT_RAYLEIGH_RITZ"] = "qr"
        loraport.rsvd(torch.randn(20, 10), 2, seed=0)
        print("ok")
        """
    )
    assert late.stdout.strip() == "ok", late.stderr


def test_the_environment_sets_the_knob_the_hook_reports():
    out = _run(
        """
        import torch, loraport
        print(torch.ops.loraport._testing_set_knob("gram_pass", ""))
        print(torch.ops.loraport._testing_set_knob("upcast_chunk_bytes", ""))
        """,
        LORAPORT_GRAM_PASS="0",
    )
    assert out.stdout.split("\n")[:2] == ["0", ""], out.stderr


def test_override_sets_and_restores_and_rejects_bad_values(generator):
    A = torch.randn(3, 60, 40, generator=generator)
    with override_for_testing(rayleigh_ritz="svd"):
        svd = loraport.rsvd(A, 5, seed=1)
        with override_for_testing(rayleigh_ritz="eigh"):
            eigh = loraport.rsvd(A, 5, seed=1)
            assert torch.ops.loraport._testing_set_knob("rayleigh_ritz", "eigh") == "eigh"
        assert torch.ops.loraport._testing_set_knob("rayleigh_ritz", "svd") == "svd"  # restored
    assert not torch.equal(svd.U, eigh.U)  # the knob reached the op
    torch.testing.assert_close(svd.S, eigh.S, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="LORAPORT_CUSOLVER_EIGH must be 0, 1 or require, got maybe"):
        with override_for_testing(cusolver_eigh="maybe"):
            pass
    with pytest.raises(ValueError, match='no knob named "policy"'):
        with override_for_testing(policy="cuda"):
            pass
    with pytest.raises(ValueError, match="cpu_policy must be cpu or cuda, got gpu"):
        with override_for_testing(cpu_policy="gpu"):
            pass
