"""The CLI's contract with scripts: exit statuses (0 done, 2 bad input or usage, 3 nothing to
write, 1 a bug with its traceback, 141 a closed stdout), one-line messages without a doubled
prefix, --version and --debug, the listed CLI pitfalls, and its outputs (umask mode, the same
bytes for the same run, a bad -o refused before any work)."""

import os
import subprocess
import sys

import pytest

from loraport import cli, formats
from loraport.cli import main
from loraport.testing import tiny

ENV = tiny.subprocess_env()  # the loraport this test imported, installed or from the source tree


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return tiny.write_example(str(tmp_path_factory.mktemp("tiny")))


def _bases(example):
    return ["--source", example["source"], "--target", example["target"]]


def _fails(capsys, argv, pattern, status=2):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == status, err
    assert len(err.splitlines()) == 1 and err.startswith("loraport: error: "), err
    assert "loraport: error: loraport" not in err, err  # no doubled prefix
    assert pattern in err, err
    return err


def test_nothing_to_port_exits_3_not_2(example, tmp_path, capsys):
    out = str(tmp_path / "o.safetensors")
    _fails(capsys, ["port", example["lora"], *_bases(example), "-o", out, "--min-similarity", "1", "--quiet"],
           "no module was ported or copied ({'skipped': 29}); nothing written", status=3)  # fmt: skip
    assert not os.path.exists(out)


def test_an_internal_error_is_not_dressed_as_bad_input(example, tmp_path, monkeypatch, capsys):
    def buggy(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "port", buggy)
    with pytest.raises(ValueError, match="a bug"):  # the interpreter prints it and exits 1
        main(["port", example["lora"], *_bases(example), "-o", str(tmp_path / "o.safetensors")])
    code = (
        "import sys, loraport.cli as c\n"
        "def buggy(*a, **k): raise KeyError('a bug')\n"
        "c.port = buggy\n"
        "sys.exit(c.main(sys.argv[1:]))\n"
    )
    res = subprocess.run([sys.executable, "-c", code, "port", example["lora"], *_bases(example), "-o",
                          str(tmp_path / "o.safetensors")], capture_output=True, text=True, env=ENV)  # fmt: skip
    assert res.returncode == 1 and "Traceback" in res.stderr and "KeyError: 'a bug'" in res.stderr


def test_debug_shows_the_traceback_of_an_input_error(example, tmp_path, capsys):
    argv = ["port", example["lora"], *_bases(example), "-o", str(tmp_path / "o.safetensors"), "--max-vram", "lots"]
    for flags in (["--debug"], None):
        args = ["--debug", *argv] if flags else [*argv, "--debug"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "InputError" in err
        assert err.strip().splitlines()[-1] == "loraport: error: cannot read a size from 'lots' (e.g. 2GB, 512MiB)"


def test_help_lists_exit_codes_and_version(capsys):
    for argv in (["--help"], ["port", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "exit status:" in text and "3    nothing to write" in text and "130  interrupted" in text
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "loraport 0.1.0"


def test_listed_cli_pitfalls(example, tmp_path, capsys):
    out = str(tmp_path / "o.safetensors")
    common = [*_bases(example), "-o", out, "--quiet"]
    folder = os.path.dirname(example["lora"])
    _fails(capsys, ["port", folder, *common], f"{folder}: is a folder; give the LoRA's .safetensors file")
    # a hunyuan LoRA forced to flux (whose key map shares its block names) or to sd15 (shares none)
    err = _fails(capsys, ["port", example["lora"], *common, "--arch", "flux"], "read with --arch flux, but the source")
    assert "a flux LoRA" not in err
    _fails(capsys, ["port", example["lora"], *common, "--arch", "sd15"],
           "none of its 29 modules is in the sd15 key map (--arch sd15); its names look like a hunyuan-video LoRA")  # fmt: skip
    _fails(capsys, ["port", example["lora"], *common, "--rank", "5"], "rank 5 is above the LoRA's largest rank 4")
    for bad in ("2", "-0.1", "nan"):
        _fails(capsys, ["port", example["lora"], *common, "--min-similarity", bad], "min_similarity must be in [0, 1]")
    _fails(capsys, ["port", example["lora"], *common, "--max-vram", "lots"], "error: cannot read a size from 'lots'")
    assert not os.path.exists(out)


def test_a_closed_stdout_ends_quietly(example):
    cmd = f"'{sys.executable}' -m loraport inspect '{example['source']}' | head -c 10"
    res = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, text=True, env=ENV)
    assert res.stderr == "" and res.returncode in (0, 141)  # 0: all was written before head left


def test_bad_output_paths_are_refused_before_any_work(example, tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("the job ran")

    for job in ("port", "resize", "merge"):
        monkeypatch.setattr(cli, job, no_work)
    folder = str(tmp_path)
    cases = [
        (folder, f"{folder}: is a folder; give the output file's path"),
        (str(tmp_path / "no" / "o.safetensors"), "output folder"),
        ("/proc/o.safetensors", "/proc/o.safetensors: cannot write in /proc"),
    ]
    if os.geteuid() != 0:  # root writes in a read-only folder anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((str(locked / "o.safetensors"), "cannot write in"))
    for out, pattern in cases:
        _fails(capsys, ["port", example["lora"], *_bases(example), "-o", out], pattern)
        _fails(capsys, ["resize", example["lora"], "--rank", "2", "-o", out], pattern)
        _fails(capsys, ["merge", f"{example['lora']}:0.5", "-o", out], pattern)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(example, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "o.safetensors"
        formats.write_lora(formats.read_lora(example["lora"]), out, format="comfy")
        assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask
    finally:
        os.umask(old)


def test_identical_runs_write_identical_bytes(example, tmp_path, capsys):
    paths = [str(tmp_path / f"o{i}.safetensors") for i in range(2)]
    for out in paths:
        assert main(["port", example["lora"], *_bases(example), "-o", out, "--quiet", "--rank", "3"]) == 0
    a, b = (open(p, "rb").read() for p in paths)
    assert a == b
    lf = formats.read_lora(example["lora"])
    lf.metadata.update({f"key{i}": str(i) for i in range(40)})  # many keys: a hash map's order would show
    outs = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    for out in outs:
        formats.write_lora(lf, out, format="kohya")
    assert len({out.read_bytes() for out in outs}) == 1
    text = outs[0].read_bytes()[8:].decode(errors="replace")
    assert "time" not in text.lower()  # no timestamp in the header
