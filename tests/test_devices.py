"""--device: cpu, cuda, cuda:N and auto resolve (loraport.devices); anything else, or a GPU this
torch, this build or this machine lacks, is one line naming the device and what is available,
exit status 2, before any file is read, and no output -- in every command and in the Python API."""

import pytest
import torch

import loraport
from loraport import cli, devices, merge, port, resize
from loraport.errors import InputError
from loraport.toolbox import extract

GPUS = torch.cuda.device_count() if torch.cuda.is_available() and loraport.cuda_built() else 0
# Devices that are wrong here: never valid names, and the GPUs this machine does not have.
WRONG = ["gpu", "mps", "cuda:x", "CUDA", f"cuda:{GPUS + 1}"] + (["cuda", "cuda:0", "cuda:1"] if GPUS == 0 else [])


def _commands(tmp_path):
    """Each command's argv with inputs that do not exist: an error about them would mean that
    something was read before the device was checked."""
    missing = str(tmp_path / "missing.safetensors")
    out = str(tmp_path / "out.safetensors")
    return {
        "port": ["port", missing, "--source", missing, "--target", missing, "-o", out],
        "resize": ["resize", missing, "--rank", "2", "-o", out],
        "extract": ["extract", "--base", missing, "--tuned", missing, "--rank", "2", "-o", out],
        "merge": ["merge", missing, missing, "-o", out],
        "convert": ["convert", missing, "--rank", "2", "-o", out],
    }


@pytest.mark.parametrize("device", WRONG, ids=lambda d: f"device={d}")  # not the id "cuda": that marks a CUDA test
@pytest.mark.parametrize("command", ["port", "resize", "extract", "merge", "convert"])
def test_a_wrong_or_absent_device_is_one_line_and_exit_2_before_any_reading(tmp_path, capsys, command, device):
    argv = _commands(tmp_path)[command] + ["--device", device]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert repr(device) in lines[0] and "available here: cpu" in lines[0], lines[0]
    assert "missing" not in lines[0]  # nothing was opened
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []  # no output, not even a temporary file


@pytest.mark.parametrize("device", WRONG, ids=lambda d: f"device={d}")  # not the id "cuda": that marks a CUDA test
def test_the_python_api_raises_value_error_naming_the_device(tmp_path, device):
    missing = tmp_path / "missing.safetensors"
    calls = [
        lambda: port(missing, missing, missing, tmp_path / "o.safetensors", device=device),
        lambda: resize(missing, tmp_path / "o.safetensors", rank=2, device=device),
        lambda: extract(missing, missing, tmp_path / "o.safetensors", rank=2, device=device),
        lambda: merge([missing], tmp_path / "o.safetensors", device=device),
        lambda: loraport.convert(missing, tmp_path / "o.safetensors", rank=2, device=device),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=f"device {device!r}") as caught:
            call()
        assert isinstance(caught.value, InputError)
    assert list(tmp_path.iterdir()) == []


def test_valid_devices_resolve_to_what_the_job_runs_on():
    assert devices.resolve_device("cpu") == "cpu"
    assert devices.resolve_device(torch.device("cpu")) == "cpu"
    assert devices.resolve_device("auto") == (f"cuda:{torch.cuda.current_device()}" if GPUS else "cpu")
    assert devices.available_devices() == ["cpu", *(f"cuda:{i}" for i in range(GPUS))]
    if GPUS:
        assert devices.resolve_device("cuda") == f"cuda:{torch.cuda.current_device()}"
        assert devices.resolve_device(f"cuda:{GPUS - 1}") == f"cuda:{GPUS - 1}"


def test_the_cli_defaults_to_auto():
    parser = cli.parser()
    for argv in (["port", "l", "--source", "s", "--target", "t"], ["resize", "l", "-o", "o"]):
        assert parser.parse_args(argv).device == "auto"
