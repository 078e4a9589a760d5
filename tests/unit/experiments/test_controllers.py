"""The controller benchmark's default rule: the heuristic stays unless another controller
beats it at 95% confidence (paired over seeds) on most held-out tasks."""

from __future__ import annotations

from esper.experiments.controllers import beats_heuristic, recommend


def _row(paired, n=5):
    return {"paired": paired, "n": n, "accuracy": (0.0, 0.0)}


def test_a_mean_lead_inside_the_noise_does_not_win() -> None:
    # The held-out table's fixed schedule on digits: +1.86 ± 2.39 over 5 seeds (t ≈ 1.74 < 2.78).
    assert not beats_heuristic((1.86, 2.39), 5)
    assert beats_heuristic((1.86, 0.5), 5)
    assert not beats_heuristic((-3.0, 0.1), 5)
    assert not beats_heuristic((2.0, 1.0), 1)


def test_recommend_keeps_the_heuristic_unless_a_significant_winner_on_most_tasks() -> None:
    noisy = {"heuristic": _row(None), "fixed": _row((1.86, 2.39)), "gnn": _row((1.04, 2.49))}
    choice, why = recommend({"digits": noisy, "mnist1d": noisy})
    assert choice == "heuristic"
    assert all("no controller beats the heuristic" in w for w in why)
    clear = {"heuristic": _row(None), "gnn": _row((3.0, 0.5)), "fixed": _row((0.2, 2.0))}
    assert recommend({"digits": clear, "mnist1d": clear})[0] == "gnn"
    # Winning one task of two is a tie with the heuristic: the incumbent stays.
    assert recommend({"digits": clear, "mnist1d": noisy})[0] == "heuristic"
