"""The fuzzer over every file reader of loraport, at benchmark scale:
``python -m benchmarks.fuzz --cases N --seed S [--cli-cases M]``.

The fuzzer itself (readers, mutations, the property each case must hold) is
``loraport.testing.fuzz``, shared with the test suite's fast subset (tests/test_fuzz.py). Prints
a table of cases and failures per reader and mutation, the first failures with their
tracebacks, and the seconds taken; exits 1 when any case failed. Recorded runs:
benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from loraport.testing.fuzz import report, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cli-cases", type=int, default=10, help="single-file cases rerun as CLI subprocesses")
    p.add_argument("--readers", nargs="*", default=(), help="only the readers starting with these (e.g. adapter-)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"loraport fuzz: {args.cases} cases, seed {args.seed}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {sys.platform}")  # fmt: skip
    result = run(args.cases, args.seed, args.cli_cases, only=args.readers)
    print(report(result))
    return 1 if result["failures"] or result["cli"]["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
