"""Fast check of the gate-fidelity runner (the runner itself decomposes 3072-wide pairs)."""

from benchmarks.gate import DRIFTS, ITERATIONS, measure


def test_gate_runner_measures_every_pair_against_the_exact_similarity():
    rows = list(measure(160, 96, 8))
    assert [name for name, *_ in rows][-1] == "unrelated" and len(rows) == 2 * len(DRIFTS) + 1
    exact = {name: value for name, value, _ in rows}
    assert exact["noise 0.05"] > exact["noise 0.5"] > exact["unrelated"] and exact["unrelated"] < 0.3
    for name, value, estimates in rows:
        assert len(estimates) == len(ITERATIONS)
        assert all(0.0 <= s <= 1.0 and t > 0 for s, t in estimates), name
        assert abs(estimates[-1][0] - value) < 0.1, name  # q = 2 on a 96-wide matrix: near exact


def test_gate_suite_runs_on_bf16_weights_and_decides_as_the_exact_gate(capsys):
    from benchmarks.gate import main

    main(["--suite", "--shape", "160", "320", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and ("dominant" in line or "slow decay" in line)]
    assert "bfloat16" in out.splitlines()[0] and len(rows) == 15
    assert all(line.split("|")[9].strip() == "yes" for line in rows), out
