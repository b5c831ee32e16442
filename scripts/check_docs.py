"""Run every command the documentation shows, as written, and fail on the first one that breaks.

What it runs, in document order: each line of the ```bash blocks of README.md and docs/*.md
(backslash continuations joined, comments dropped), each ```python block (with the venv's
python), and the examples in the `examples:` part of every `loraport SUBCOMMAND --help`. A
command fails on a non-zero exit or a Python traceback in its output. Where a command names a
user's file (my_lora.safetensors, source.safetensors, ...), the bundled example's file is put in
its place (USER_FILES below); outputs go to examples/out/docs/. A command whose comment says it
needs a GPU is listed as not run, with that reason; there is no other way to skip one.

It also holds the README to what it says about the test suite: the README must state
"runs N tests in about M minutes", and the pytest run among the commands must agree (N within
15 %, M within a factor of 2 of the measured wall time).

    python3 scripts/check_docs.py            # from the repository root; needs only Python
    python3 scripts/check_docs.py --list     # print the commands with substitutions, run nothing

The first README block is the set-up (it makes .venv), so the check needs nothing installed."""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = "examples/out"  # written by the set-up command (examples/make_tiny_example.py)
OUTPUTS = "examples/out/docs"  # where the commands' outputs go

# A user's file named in the docs -> the bundled example's file that stands in for it.
USER_FILES = {
    "my_lora.safetensors": f"{EXAMPLE}/lora.safetensors",
    "lora.safetensors": f"{EXAMPLE}/lora.safetensors",
    "a.safetensors": f"{EXAMPLE}/lora.safetensors",
    "b.safetensors": f"{EXAMPLE}/ported.safetensors",
    "source.safetensors": f"{EXAMPLE}/source.safetensors",
    "target.safetensors": f"{EXAMPLE}/target.safetensors",
    "hunyuan_t2v.safetensors": f"{EXAMPLE}/source.safetensors",
    "hunyuan_i2v.safetensors": f"{EXAMPLE}/target.safetensors",
    "base.safetensors": f"{EXAMPLE}/source.safetensors",
    "finetune.safetensors": f"{EXAMPLE}/target.safetensors",
    "hunyuan_video.safetensors": f"{EXAMPLE}/source.safetensors",
    # the multi-expert recipe (Wan 2.2 A14B) runs on the Hunyuan example: the same code path
    "wan21_lora.safetensors": f"{EXAMPLE}/lora.safetensors",
    "wan2.1_t2v_14b.safetensors": f"{EXAMPLE}/source.safetensors",
    "wan2.2_t2v_high_noise.safetensors": f"{EXAMPLE}/target.safetensors",
    "wan2.2_t2v_low_noise.safetensors": f"{EXAMPLE}/target.safetensors",
    # no LyCORIS file is bundled: convert runs on the plain LoRA, the same path end to end
    "lycoris_loha.safetensors": f"{EXAMPLE}/lora.safetensors",
    "dora.safetensors": f"{EXAMPLE}/lora.safetensors",
}
# Output folders named in the docs -> under OUTPUTS.
USER_DIRS = ("ported_catalog",)
# The only reasons a documented command may be left out here (this machine has no GPU).
NOT_RUN = {"needs a GPU": re.compile(r"needs an? (NVIDIA |CUDA )?GPU", re.I)}
SUITE_CLAIM = re.compile(r"runs (\d[\d,]*) tests in about (\d+(?:\.\d+)?) minutes")
PYTEST_SUMMARY = re.compile(r"=+ (.*?) in ([\d.]+)s(?: \([\d:]+\))? =+\s*$", re.M)
TIMEOUT_S = 1800


def blocks(path: str):
    """(language, first line number, text) of each fenced code block in a Markdown file."""
    lang, start, lines = None, 0, []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fence = re.match(r"\s*```(\w*)", line)
            if fence and lang is None:
                lang, start, lines = fence.group(1).lower() or "text", number + 1, []
            elif fence:
                yield lang, start, "".join(lines)
                lang = None
            elif lang is not None:
                lines.append(line)


def split_comment(line: str) -> tuple[str, str]:
    """(command, comment) of one shell line; a # inside quotes is not a comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def shell_commands(text: str):
    """(command, comment) for each command of a bash block."""
    joined, pending = [], ""
    for line in text.splitlines():
        command, comment = split_comment(line)
        if command.endswith("\\"):
            pending += command[:-1] + " "
            continue
        joined.append((pending + command).strip())
        pending = ""
        if joined[-1]:
            yield joined[-1], comment


def substitute(command: str) -> str:
    """The command with user files replaced by the bundled example's and bare output names by
    paths under OUTPUTS."""

    def one(match: re.Match) -> str:
        name = match.group(0)
        if name in USER_FILES:
            return USER_FILES[name]
        return f"{OUTPUTS}/{name}"

    # a bare file name (no folder) ending in a model/report extension, not part of a path
    command = re.sub(r"(?<![\w/.-])[\w.-]+\.(?:safetensors|json|jsonl)(?![\w/])", one, command)
    for folder in USER_DIRS:
        command = re.sub(rf"(?<![\w/.-]){folder}(?![\w/.-])", f"{OUTPUTS}/{folder}", command)
    return command


def help_examples(venv_bin: str) -> list[tuple[str, str, str]]:
    """The commands under 'examples:' in each `loraport SUB --help`."""
    out = subprocess.run([f"{venv_bin}/loraport", "--help"], capture_output=True, text=True, check=True).stdout
    subs = re.search(r"\{([\w,-]+)\}", out)
    found = []
    for sub in subs.group(1).split(",") if subs else []:
        text = subprocess.run([f"{venv_bin}/loraport", sub, "--help"], capture_output=True, text=True, check=True).stdout
        part = text.split("examples:", 1)
        for line in part[1].splitlines() if len(part) > 1 else []:
            command, comment = split_comment(line.strip())
            if command.startswith("loraport "):
                found.append((f"loraport {sub} --help", command, comment))
    return found


def run(command: str, language: str, venv: str) -> tuple[int, str, float]:
    """Run one command from the repository root with the venv first on PATH, streaming its output."""
    env = dict(os.environ, VIRTUAL_ENV=os.path.join(ROOT, venv), PATH=f"{os.path.join(ROOT, venv, 'bin')}:{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    argv = ["bash", "-eo", "pipefail", "-c", command] if language != "python" else [f"{venv}/bin/python", "-c", command]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            output.append(line)
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = 124
    sys.stdout.flush()
    return rc, "".join(output), time.perf_counter() - t0


def check_suite_claim(readme: str, pytest_output: str, seconds: float) -> list[str]:
    """Problems with the README's statement about the suite, against this run of it."""
    claim = SUITE_CLAIM.search(readme)
    if not claim:
        return ["README.md no longer says 'runs N tests in about M minutes'"]
    stated_tests, stated_minutes = int(claim.group(1).replace(",", "")), float(claim.group(2))
    summary = PYTEST_SUMMARY.findall(pytest_output)
    if not summary:
        return ["the pytest command printed no summary line"]
    counts = dict((word, int(n)) for n, word in re.findall(r"(\d+) (\w+)", summary[-1][0]))
    ran = sum(counts.get(k, 0) for k in ("passed", "skipped", "failed", "xfailed", "xpassed", "error", "errors"))
    problems = []
    if abs(ran - stated_tests) > 0.15 * stated_tests:
        problems.append(f"README.md says {stated_tests} tests; this run collected {ran}")
    minutes = seconds / 60
    if not stated_minutes / 2 <= minutes <= stated_minutes * 2:
        problems.append(f"README.md says about {claim.group(2)} minutes; this run took {minutes:.1f}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default=".venv", help="the venv the set-up command makes (default .venv)")
    ap.add_argument("--list", action="store_true", help="print what would run, run nothing")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    docs = ["README.md", *sorted(glob.glob("docs/**/*.md", recursive=True))]
    todo = []  # (where, language, command, comment)
    for path in docs:
        for language, line, text in blocks(path):
            if language in ("bash", "sh", "shell"):
                todo += [(f"{path}:{line}", "bash", c, comment) for c, comment in shell_commands(text)]
            elif language == "python":
                todo.append((f"{path}:{line}", "python", text, ""))
    failures, not_run, pytest_run, ran = [], [], None, 0

    def execute(items) -> bool:
        nonlocal pytest_run, ran
        for where, language, command, comment in items:
            reason = next((name for name, rx in NOT_RUN.items() if rx.search(comment)), None)
            shown = substitute(command)
            if args.list:
                print(f"{where}: {'[not run: ' + reason + '] ' if reason else ''}{shown}")
                continue
            if reason:
                not_run.append((where, command, reason))
                continue
            if os.path.isdir(EXAMPLE):
                os.makedirs(OUTPUTS, exist_ok=True)
            print(f"\n== check_docs: {where}: {shown}", flush=True)
            rc, output, seconds = run(shown, language, args.venv)
            ran += 1
            if rc != 0 or "Traceback (most recent call last)" in output:
                failures.append(f"{where}: exit {rc}{' with a traceback' if rc == 0 else ''}: {command}")
                return False  # later commands may depend on this one
            if language == "bash" and re.search(r"(^|\s)-m pytest(\s|$)", command) and "benchmarks" not in command:
                pytest_run = (output, seconds)
        return True

    if execute(todo) and not args.list:
        execute([(w, "bash", c, m) for w, c, m in help_examples(os.path.join(ROOT, args.venv, "bin"))])
    if args.list:
        return 0
    if not failures:
        if pytest_run is None:
            failures.append("the documentation shows no pytest command, so nothing states the suite")
        else:
            with open("README.md", encoding="utf-8") as f:
                failures += check_suite_claim(f.read(), *pytest_run)
    print(f"\n== check_docs: ran {ran} commands from {', '.join(docs)} and the --help examples")
    for where, command, reason in not_run:
        print(f"   not run ({reason}): {where}: {command}")
    for problem in failures:
        print(f"   FAILED: {problem}")
    print(f"== check_docs: {'FAILED' if failures else 'passed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
