"""What loraport's own processes (the `loraport` command, `python -m loraport`) set up before torch
is imported: allocator and OpenMP settings, and a Ctrl-C handler for the import itself. A
program that merely imports loraport keeps its own settings. No torch import here."""

import os
import signal
import sys


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


def prepare_cli_process(argv: list[str]) -> None:
    """The settings of `is_cli_process` processes; nothing for any other."""
    if not is_cli_process(argv):
        return
    # torch's CPU allocator then backs tensors of 2 MB and more with transparent huge pages
    # (read once, at torch's first allocation, so before `import torch`). The port allocates a
    # fresh float copy of every stacked base-weight chunk; measured on a quarter-size
    # Hunyuan-shaped port (benchmarks/RESULTS.md): 13.6M -> 0.61M page faults, 53-55 -> 29-35 s
    # kernel time, 102 -> 82-95 s wall. Library users can set it themselves (README).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # OpenMP's worker threads then sleep between parallel regions instead of spinning (libgomp
    # reads it when torch loads it): the port's reader thread copies the next chunk out of the
    # page cache on the same cores while the gate computes, and spinning workers took 22% of
    # both cores' samples in a profile of the default port (benchmarks/RESULTS.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Ctrl-C while torch is being imported: the CLI's one line and status 130, not a traceback
    # (cli.main puts Python's own handler back, and catches the KeyboardInterrupt it raises).
    signal.signal(signal.SIGINT, interrupted_early)
