"""A fast subset of the fuzzer (loraport.testing.fuzz, which benchmarks/fuzz.py runs at scale):
a few hundred mutated files over every reader and mutation end in success or a one-line
InputError, with nothing left behind; two cases also run end to end as `python -m loraport
inspect` subprocesses. The full run (>= 20,000 cases) is recorded in benchmarks/RESULTS.md."""

import pytest

from loraport.testing import fuzz


@pytest.mark.slow
def test_fuzz_subset_finds_nothing():
    result = fuzz.run(400, 2026, cli_cases=2)
    assert result["failures"] == [] and result["cli"]["failures"] == [], fuzz.report(result)
    readers = {reader for reader, _ in result["counts"]}
    assert readers == set(fuzz.readers())  # every reader was fuzzed
    assert sum(result["counts"].values()) >= 400 and result["cli"]["cases"] == 2


def test_the_fuzzer_would_see_a_reader_bug(monkeypatch):
    """The property is not vacuous: an exception that is not an InputError counts as a failure."""
    real = fuzz.formats.read_lora

    def buggy(path, **kwargs):
        real(path, **kwargs)
        raise ZeroDivisionError("a reader bug")

    monkeypatch.setattr(fuzz.formats, "read_lora", buggy)
    result = fuzz.run(60, 1)
    assert any("ZeroDivisionError: a reader bug" in p for _, _, p in result["failures"])
