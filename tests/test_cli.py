"""The loraport command: the README's tiny example end to end in a subprocess, `inspect`, and
bad input (exit status 2, one line naming the file and tensor, no output left behind)."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from loraport import formats
from loraport.cli import main
from loraport.testing import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def example(tmp_path):
    return tiny.write_example(str(tmp_path / "tiny"))


def test_readme_example_runs_end_to_end(tmp_path):
    folder = str(tmp_path / "tiny")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "make_tiny_example.py"), folder], check=True,
        env=tiny.subprocess_env(),  # the loraport under test (it has loraport.testing)
    )
    out = os.path.join(folder, "ported.safetensors")
    cmd = [sys.executable, "-m", "loraport", "port", os.path.join(folder, "lora.safetensors"),
           "--source", os.path.join(folder, "source.safetensors"), "--target", os.path.join(folder, "target.safetensors"),
           "-o", out, "--report", os.path.join(folder, "report.json")]  # fmt: skip  (setup.sh's main job)
    res = subprocess.run(cmd, capture_output=True, text=True, env=tiny.subprocess_env())
    assert res.returncode == 0, res.stderr
    assert "29 layers: 29 ported" in res.stdout and "copy: the LoRA's ΔW kept where similarity >= 0.5" in res.stdout
    lf = formats.read_lora(out)
    assert (lf.format, lf.arch.name, len(lf.modules)) == ("kohya", "hunyuan-video", 29)
    assert lf.metadata["modelspec.title"] == "tiny example" and lf.metadata["ss_network_alpha"] == "4"


def test_port_options_and_inspect(example, tmp_path, capsys):
    out = str(tmp_path / "p.safetensors")
    rc = main(["port", example["lora"], "--source", example["source"], "--target", example["target"], "-o", out,
               "--energy", "0.95", "--rank", "2", "--format", "comfy", "--variant", "source-then-target", "--quiet"])  # fmt: skip
    assert rc == 0 and capsys.readouterr().out == ""
    lf = formats.read_lora(out)
    assert lf.format == "comfy" and {m.rank for m in lf.modules} == {2}
    assert main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "format comfy, arch hunyuan-video" in text and "ranks: {2: 29}" in text
    assert main(["inspect", example["source"]]) == 0
    assert "arch hunyuan-video" in capsys.readouterr().out


def _fails(capsys, argv, pattern):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("loraport: error: ")
    assert pattern in err, err


def test_bad_input_exits_cleanly(example, tmp_path, capsys):
    out = str(tmp_path / "o.safetensors")
    common = ["--source", example["source"], "--target", example["target"], "-o", out, "--quiet"]
    _fails(capsys, ["port", str(tmp_path / "missing.safetensors"), *common], "missing.safetensors: no such file")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(open(example["lora"], "rb").read()[:-64])
    _fails(capsys, ["port", str(truncated), *common], "t.safetensors: not a readable safetensors file")
    sd = formats.state_dict(formats.read_lora(example["lora"]))
    key = "lora_unet_double_blocks_1_txt_attn_proj.lora_down.weight"
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("inf")
    save_file(sd, tmp_path / "inf.safetensors")
    _fails(capsys, ["port", str(tmp_path / "inf.safetensors"), *common], f"'{key}' contains NaN or Inf")
    flux = tiny.lora("flux", tiny.base_model("flux", width=16), fmt="diffusers")
    flux["transformer.x_embedder.lora_A.weight"] = torch.ones(4, 16)
    flux["transformer.x_embedder.lora_B.weight"] = torch.ones(16, 4)
    save_file(flux, tmp_path / "flux.safetensors")
    _fails(capsys, ["port", str(tmp_path / "flux.safetensors"), *common], "a flux LoRA, but the source base")
    _fails(capsys, ["port", example["lora"], "--source", example["source"], "--target", example["target"],
                    "-o", example["source"]], "the output path is an input file")  # fmt: skip
    _fails(capsys, ["port", example["lora"], *common, "--max-vram", "lots"], "cannot read a size from 'lots'")
    assert not os.path.exists(out)
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_only_loraports_own_processes_turn_on_huge_pages_for_torch():
    """The CLI (console script or python -m loraport) sets THP_MEM_ALLOC_ENABLE before torch's
    first allocation; a program that merely imports loraport keeps its allocator as it was."""
    from loraport.startup import is_cli_process

    assert is_cli_process(["/usr/bin/python3", "-m", "loraport", "port", "x.safetensors"])
    assert is_cli_process(["/venv/bin/python", "/venv/bin/loraport", "port"])
    assert not is_cli_process(["/usr/bin/python3", "-m", "pytest", "tests"])
    assert not is_cli_process(["/usr/bin/python3", "train.py", "--loraport"])
    assert not is_cli_process(["/usr/bin/python3"])
    names = ("THP_MEM_ALLOC_ENABLE", "OMP_WAIT_POLICY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    show = f"print(*(os.environ.get(n) for n in {names!r}))"
    env = {k: v for k, v in os.environ.items() if k not in names}
    res = subprocess.run([sys.executable, "-c", "import os, loraport; " + show], capture_output=True, text=True,
                         env=env, check=True)  # fmt: skip
    assert res.stdout.split() == ["None"] * 4
    # the CLI's own process: all set before torch is imported (what libgomp and the allocator read)
    code = "import sys; sys.orig_argv = [sys.executable, '-m', 'loraport']; import os, loraport, torch; " + show
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert res.stdout.split() == ["1", "PASSIVE", str(256 << 20), str(512 << 20)]


def test_the_cli_sets_glibcs_malloc_thresholds_for_itself_unless_the_user_did(monkeypatch):
    """glibc read MALLOC_*_ when the process started, so the CLI also calls mallopt (M_TRIM_THRESHOLD
    -1, M_MMAP_THRESHOLD -3) for the values it puts in the environment, and leaves a variable the
    user set alone."""
    from loraport import startup

    calls = []
    monkeypatch.setattr(startup, "_mallopt", lambda param, value: calls.append((param, value)))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's SIGINT handler
    for name in startup.CLI_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    startup.prepare_cli_process(["python", "-m", "loraport", "port"])
    assert calls == [(-3, 256 << 20)]
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "1000" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    calls.clear()
    startup.prepare_cli_process(["python", "train.py"])
    assert calls == []


def test_a_cli_started_with_sigint_ignored_keeps_it_ignored():
    """`nohup loraport ... &` from a script starts it with SIGINT ignored; the import-time Ctrl-C
    handler must not turn it back on (with Python's own handler it is installed, as before)."""
    code = ("import sys; sys.orig_argv = [sys.executable, '-m', 'loraport']; import signal, loraport; "
            "h = signal.getsignal(signal.SIGINT); print('ignored' if h == signal.SIG_IGN else h.__name__)")
    for disposition, shown in ((signal.SIG_IGN, "ignored"), (signal.SIG_DFL, "interrupted_early")):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             preexec_fn=lambda d=disposition: signal.signal(signal.SIGINT, d))  # fmt: skip
        assert res.stdout.strip() == shown, (disposition, res.stdout)
