"""What loraport's own processes (the `loraport` command, `python -m loraport`) set up before torch
is imported: allocator and OpenMP settings, and a Ctrl-C handler for the import itself. A
program that merely imports loraport keeps its own settings. No torch import here."""

import ctypes
import os
import signal
import sys

# The environment of loraport's own processes (see `prepare_cli_process` for why each); the
# benchmarks give their child processes the same.
CLI_ENVIRONMENT = {
    "THP_MEM_ALLOC_ENABLE": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "MALLOC_MMAP_THRESHOLD_": str(256 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(512 << 20),
}


def cli_child_environment() -> dict[str, str]:
    """This process's environment with CLI_ENVIRONMENT's settings where it has none of its own:
    for a child process that should run as the loraport command does (the benchmarks' peers)."""
    return {**CLI_ENVIRONMENT, **os.environ}


_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3}  # glibc's M_TRIM_THRESHOLD, M_MMAP_THRESHOLD


def is_cli_process(argv: list[str]) -> bool:
    """True for `loraport ...` (the console script) and `python -m loraport ...`: processes that
    are loraport's own, whose allocator settings it may choose."""
    args = argv[1:]
    return (len(args) >= 2 and args[0] == "-m" and args[1] == "loraport") or (
        bool(args) and os.path.basename(args[0]) == "loraport"
    )


def interrupted_early(signum, frame):
    """SIGINT before the CLI's own handling is in place: its one line and status 130."""
    sys.stderr.write("loraport: interrupted; nothing written\n")
    os._exit(130)


def _mallopt(param: int, value: int) -> None:
    """glibc's mallopt for this process; nothing where the C library has none."""
    try:
        ctypes.CDLL(None).mallopt(param, value)
    except (OSError, AttributeError):
        pass


def prepare_cli_process(argv: list[str]) -> None:
    """The settings of `is_cli_process` processes; nothing for any other."""
    if not is_cli_process(argv):
        return
    # THP_MEM_ALLOC_ENABLE: torch's CPU allocator backs tensors of 2 MB and more with
    # transparent huge pages (read at torch's first allocation, so before `import torch`): far
    # fewer page faults for the fresh float copies of stacked base weights.
    # OMP_WAIT_POLICY: OpenMP's worker threads sleep between parallel regions instead of
    # spinning (read when torch loads libgomp): the port's reader thread works on the same cores
    # while the gate computes.
    # MALLOC_*: glibc keeps freed blocks below 256 MiB for the next allocation and returns free
    # memory to the kernel only past 512 MiB: each of the gate's products allocates a few MB of
    # bases and float64 workspace, and otherwise faulted in and zeroed fresh pages every time.
    # glibc read its variables when this process started, so they are also set with mallopt;
    # the environment passes them on to child processes (a catalog's workers).
    # The measurements: benchmarks/RESULTS.md. Library users can set all four themselves (docs/guide.md).
    for name, value in CLI_ENVIRONMENT.items():
        if name in os.environ:
            continue
        os.environ[name] = value
        if name in _MALLOPT:
            _mallopt(_MALLOPT[name], int(value))
    # Ctrl-C while torch is being imported: the CLI's one line and status 130, not a traceback
    # (cli.main puts Python's own handler back, and catches the KeyboardInterrupt it raises).
    # A process started with SIGINT ignored (`nohup loraport ... &` from a script) keeps it so.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupted_early)
