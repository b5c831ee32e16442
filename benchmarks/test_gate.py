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
