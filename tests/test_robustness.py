"""Runs that do not end normally, in real subprocesses with real signals: SIGKILL at random points
and in the middle of a write (port, resize, extract, merge, a cache fill) leaves the output path
empty or holding the complete file, and the next run removes the stale temporary files; SIGINT
gives one line and status 130; two processes filling one cache at once both write the right
output and leave a consistent cache; a full disk (ENOSPC, a small tmpfs) gives one line, no
partial output and an intact input. Every wait is bounded."""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors import safe_open

from loraport import cli, formats, outfiles
from loraport.testing import tiny

ENV = tiny.subprocess_env()  # the loraport this test imported, installed or from the source tree
TIMEOUT = 120  # seconds any one subprocess may take on a loaded 2-core machine

# Runs cli.main(argv[2:]); "stall" makes the chosen writer ("output": the LoRA, "cache": a cache
# entry) leave a half-written temporary file, print STALLED and sleep: a kill mid-write, every time.
# With LORAPORT_TEST_GO set it prints READY and waits for that file, so two runs start together.
DRIVER = r"""
import os, sys, time
import loraport.cli as cli, loraport.formats as formats, loraport.cache as cache, loraport.outfiles as outfiles
mode = sys.argv[1]
if mode != "run":
    real = outfiles.save_safetensors
    def stalled(tensors, path, metadata=None):
        real(tensors, path, metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        print("STALLED", flush=True)
        time.sleep(120)
    setattr(formats if mode == "stall-output" else cache, "save_safetensors", stalled)
go = os.environ.get("LORAPORT_TEST_GO")
if go:
    print("READY", flush=True)
    while not os.path.exists(go):
        time.sleep(0.01)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return tiny.write_example(str(tmp_path_factory.mktemp("tiny")))


def _jobs(ex, out, cache):
    bases = ["--source", ex["source"], "--target", ex["target"]]
    return {
        "port": ["port", ex["lora"], *bases, "-o", out, "--quiet"],
        "resize": ["resize", ex["lora"], "--rank", "2", "-o", out, "--quiet"],
        "extract": ["extract", "--base", ex["source"], "--tuned", ex["target"], "--rank", "2", "-o", out, "--quiet"],
        "merge": ["merge", f"{ex['lora']}:0.5", f"{ex['lora']}:0.25", "--rank", "3", "-o", out, "--quiet"],
        "cache": ["port", ex["lora"], *bases, "-o", out, "--quiet", "--cache-dir", cache],
    }


def _sigint_default():
    """In the child before exec: SIGINT back to its default, so that Python installs its own
    handler there even when this suite runs with SIGINT ignored (a background job of a script)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(mode, argv, env=ENV):
    return subprocess.Popen([sys.executable, "-c", DRIVER, mode, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_sigint_default)  # fmt: skip


def _wait_for_line(proc, word):
    """Block (bounded by TIMEOUT) until the process prints ``word``."""
    deadline = time.monotonic() + TIMEOUT
    for line in proc.stdout:
        if line.strip() == word:
            return
        assert time.monotonic() < deadline
    raise AssertionError(f"the process ended before printing {word}: {proc.wait()} {proc.stderr.read()}")


def _temps(folder):
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


def _check_cache(folder) -> int:
    """Every entry complete, stored under the hash of its own key; returns the entry count."""
    entries = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
    for name in entries:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            key = f.metadata()["loraport.subspace_key"]
            kind = json.loads(key)["kind"]  # loraport.cache: subspaces, or the default gate's sketch
            assert set(f.keys()) == ({"U", "S", "V", "frob2"} if kind == "subspaces" else {"U", "S", "V"})
            for k in f.keys():
                f.get_tensor(k)
        assert hashlib.sha256(key.encode()).hexdigest()[:40] + ".safetensors" == name
    return len(entries)


@pytest.fixture(scope="module")
def references(example, tmp_path_factory):
    """Per job: the output's bytes and the wall time of a normal run in a subprocess."""
    refs = {}
    folder = tmp_path_factory.mktemp("ref")
    for job, argv in _jobs(example, str(folder / "OUT"), str(folder / "cache")).items():
        out = str(folder / f"{job}.safetensors")
        argv = [out if a == str(folder / "OUT") else a for a in argv]
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-c", DRIVER, "run", *argv], capture_output=True, text=True,
                             env=ENV, timeout=TIMEOUT)  # fmt: skip
        assert res.returncode == 0, res.stderr
        refs[job] = (open(out, "rb").read(), time.monotonic() - t0)
    refs["cache_entries"] = _check_cache(str(folder / "cache"))
    return refs


@pytest.mark.slow
@pytest.mark.parametrize("job", ["port", "resize", "extract", "merge", "cache"])
def test_sigkill_leaves_nothing_or_a_complete_file(job, example, references, tmp_path):
    expected, seconds = references[job]
    rng = random.Random(job)
    kills = [("stall-cache" if job == "cache" else "stall-output", None)] + [("run", rng.uniform(0, seconds)) for _ in range(2)]
    for i, (mode, delay) in enumerate(kills):
        folder = tmp_path / str(i)
        folder.mkdir()
        out, cache = str(folder / "out.safetensors"), str(folder / "cache")
        argv = _jobs(example, out, cache)[job]
        proc = _start(mode, argv)
        if delay is None:
            _wait_for_line(proc, "STALLED")
        else:
            time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=TIMEOUT)
        if os.path.exists(out):  # renamed into place: the whole file
            assert open(out, "rb").read() == expected
            formats.read_lora(out)
        if mode.startswith("stall"):
            assert _temps(cache if job == "cache" else str(folder)), "the kill should have left a temporary file"
        if os.path.isdir(cache):
            _check_cache(cache)  # a torn entry never sits under an entry's name
        # the next run removes the dead process's temporary files and writes the right output
        os.path.exists(out) and os.remove(out)
        assert cli.main(argv) == 0
        assert open(out, "rb").read() == expected
        assert _temps(str(folder)) == []
        if job == "cache":
            assert _temps(cache) == [] and _check_cache(cache) == references["cache_entries"]


@pytest.mark.slow
def test_sigint_prints_one_line_and_exits_130(example, tmp_path):
    out = str(tmp_path / "out.safetensors")
    for mode in ("stall-output", "stall-cache"):
        proc = _start(mode, _jobs(example, out, str(tmp_path / mode))["cache"])  # a cold cache each
        _wait_for_line(proc, "STALLED")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 130 and err == "loraport: interrupted; nothing written\n", err
        assert not os.path.exists(out) and _temps(str(tmp_path)) == [] and _temps(str(tmp_path / mode)) == []
    # while torch is still being imported (python -m loraport): the same line, not a traceback
    proc = subprocess.Popen([sys.executable, "-m", "loraport", "--version"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=_sigint_default)  # fmt: skip
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    if proc.returncode == 0:  # the import beat the signal on a fast machine: nothing to check
        pytest.skip("the process finished before the signal arrived")
    assert proc.returncode == 130 and err.strip().splitlines() == ["loraport: interrupted; nothing written"], err


@pytest.mark.slow
def test_two_processes_share_one_cache(example, references, tmp_path):
    cache, go = str(tmp_path / "cache"), str(tmp_path / "go")
    outs = [str(tmp_path / f"o{i}.safetensors") for i in range(2)]
    env = {**ENV, "LORAPORT_TEST_GO": go}
    procs = [_start("run", _jobs(example, out, cache)["cache"], env) for out in outs]
    for p in procs:
        _wait_for_line(p, "READY")
    open(go, "w").close()  # both start their work now
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err
    for out in outs:
        assert open(out, "rb").read() == references["port"][0]  # the uncached run's bytes
    assert _temps(cache) == [] and _check_cache(cache) == references["cache_entries"]


def _mount_tmpfs(folder, size) -> str | None:
    """Mount a tmpfs of ``size`` at ``folder``; None when this machine allows it, else why not."""
    os.makedirs(folder)
    if shutil.which("mount") is None:
        return "no mount command"
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True, text=True)
    return None if res.returncode == 0 else f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode})"


def test_a_full_disk_gives_one_line_and_no_partial_output(example, tmp_path, capsys):
    disk = str(tmp_path / "disk")
    why = _mount_tmpfs(disk, "256k")
    if why:
        pytest.skip(why + "; tests/test_formats.py covers ENOSPC by a failing write instead")
    try:
        lora = os.path.join(disk, "lora.safetensors")
        shutil.copy(example["lora"], lora)  # 44 kB input on the small disk
        before = open(lora, "rb").read()
        with open(os.path.join(disk, "filler"), "wb") as f:  # leave ~20 kB: less than one output
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            f.write(b"\0" * max(free - 20_000, 0))
        out = os.path.join(disk, "out.safetensors")
        for argv in (["port", lora, "--source", example["source"], "--target", example["target"], "-o", out, "--quiet"],
                     ["resize", lora, "--rank", "3", "-o", out, "--quiet", "--format", "comfy"]):  # fmt: skip
            assert cli.main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert err == f"loraport: error: {out}: cannot write the output (No space left on device); nothing written"
            assert sorted(os.listdir(disk)) == ["filler", "lora.safetensors"]
            assert open(lora, "rb").read() == before
    finally:
        subprocess.run(["umount", disk], check=True)


def test_stale_temps_of_live_processes_are_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".o.safetensors.{int(dead.stdout)}.abc123.tmp"
    live = tmp_path / f".o.safetensors.{os.getpid()}.def456.tmp"
    other = tmp_path / f".p.safetensors.{int(dead.stdout)}.abc123.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"x")
    assert outfiles.remove_stale_temps(str(tmp_path), "o.safetensors") == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name])
    assert outfiles.remove_stale_temps(str(tmp_path)) == [str(other)]
