"""Arena rankings: vote parsing, win rates, Elo, Bradley-Terry, K-wise Bayesian updating, recovery from
simulated votes, and votes needed by K-wise vs Elo."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import optimize, stats

from mmalign.bench import arena as A
from mmalign.errors import MMAlignError

# Alphabetical order differs from the true order, so an untouched rater is not right by accident.
SKILLS = {"delta": 1.5, "bravo": 1.0, "foxtrot": 0.5, "alpha": 0.0, "echo": -0.5, "charlie": -1.0}
TRUE_ORDER = sorted(SKILLS, key=lambda m: -SKILLS[m])


def test_read_votes_both_formats(tmp_path):
    path = tmp_path / "votes.jsonl"
    lines = [
        {"models": ["a", "b", "c"], "ranks": [2, 1, 2], "judge": "human", "prompt": "a cat"},
        {"model_a": "a", "model_b": "b", "winner": "model_a", "judge": "gpt-4o"},
        {"model_a": "a", "model_b": "c", "winner": "model_b"},
        {"model_a": "b", "model_b": "c", "winner": "tie (bothbad)"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    votes = A.read_votes(path)
    assert votes[0].pairs() == [("a", "b", 0.0), ("a", "c", 0.5), ("b", "c", 1.0)]
    assert votes[1].pairs() == [("a", "b", 1.0)] and votes[1].judge == "gpt-4o"
    assert votes[2].pairs() == [("a", "c", 0.0)]
    assert votes[3].pairs() == [("b", "c", 0.5)]
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"model_a": "a", "model_b": "b", "winner": "x"}) + "\n")
    with pytest.raises(MMAlignError, match="votes.jsonl:2"):
        A.read_votes(path)


def test_win_rate_matrix_hand_case():
    votes = [
        A.Vote(("A", "B"), (1, 2)),
        A.Vote(("B", "A"), (2, 1)),
        A.Vote(("A", "B"), (2, 1)),
        A.Vote(("A", "C"), (1, 1)),
    ]
    models, rate = A.win_rate_matrix(votes)
    assert models == ["A", "B", "C"]
    assert rate[0, 1] == pytest.approx(2 / 3) and rate[1, 0] == pytest.approx(1 / 3)
    assert rate[0, 2] == 0.5 and rate[2, 0] == 0.5
    assert math.isnan(rate[1, 2])


def test_elo_hand_case():
    ratings = A.elo_ratings([A.Vote(("A", "B"), (1, 2))])
    assert ratings == pytest.approx({"A": 1016.0, "B": 984.0})
    ratings = A.elo_ratings([A.Vote(("A", "B"), (1, 2)), A.Vote(("A", "B"), (1, 1))])
    expected_b = 1.0 / (1.0 + 10 ** ((1016 - 984) / 400))  # B's expected score in the tie
    assert ratings["B"] == pytest.approx(984 + 32 * (0.5 - expected_b))
    assert sum(ratings.values()) == pytest.approx(2000.0)


def test_bradley_terry_mm_equals_direct_mle():
    votes = [A.Vote(("A", "B"), (1, 2))] * 3 + [A.Vote(("A", "B"), (2, 1))]
    ratings = A.bradley_terry(votes, prior=0.0)
    assert ratings["A"] - ratings["B"] == pytest.approx(400 * math.log10(3.0), abs=1e-6)
    rng = np.random.default_rng(0)
    votes = A.simulate_votes({"x": 0.5, "y": 0.0, "z": -0.3, "w": 0.2}, 300, 2, rng)
    models, wins, games = A.win_matrix(votes)
    bt = A.bradley_terry(votes, prior=0.0)

    def nll(theta):  # independent MLE: -sum_ij w_ij log sigma(theta_i - theta_j)
        diff = theta[:, None] - theta[None, :]
        return -(wins * -np.logaddexp(0.0, -diff)).sum() + 1e3 * theta.mean() ** 2

    theta = optimize.minimize(nll, np.zeros(len(models)), method="BFGS", options={"gtol": 1e-10}).x
    expected = 1000 + 400 * (theta - theta.mean()) / math.log(10)
    assert [bt[m] for m in models] == pytest.approx(expected.tolist(), abs=1e-3)


@pytest.mark.parametrize("pairing", ["mean", "weng-lin"])
def test_kwise_update_matches_thurstone_two_player_formula(pairing):
    rater = A.KwiseBayes(["A", "B"], pairing=pairing)
    rater.update(A.Vote(("A", "B"), (1, 2)))
    sigma, beta = 25 / 3, 25 / 6
    c = math.sqrt(2 * sigma**2 + 2 * beta**2)
    t = -0.1 / c  # mu difference 0 minus the draw margin
    v = stats.norm.pdf(t) / stats.norm.cdf(t)
    w = v * (v + t)
    gamma = 1.0 if pairing == "mean" else sigma / c  # TrueSkill for K = 2; Weng-Lin damps the variance update
    post = rater.posterior()
    assert post["A"][0] == pytest.approx(25 + sigma**2 / c * v)
    assert post["B"][0] == pytest.approx(25 - sigma**2 / c * v)
    assert post["A"][1] == pytest.approx(math.sqrt(sigma**2 * (1 - gamma * sigma**2 / c**2 * w)))
    rater.update(A.Vote(("A", "B"), (1, 1)))  # a draw pulls them together
    tied = rater.posterior()
    assert tied["A"][0] < post["A"][0] and tied["B"][0] > post["B"][0] and tied["A"][1] < post["A"][1]


def test_kwise_mean_pairing_averages_the_pair_updates():
    vote = A.Vote(("A", "B", "C"), (1, 2, 3))
    mean, summed = A.KwiseBayes("ABC", pairing="mean"), A.KwiseBayes("ABC", pairing="weng-lin")
    mean.update(vote)
    summed.update(vote)
    for m in "ABC":  # equal priors: the mean update moves mu by half the summed one (K - 1 = 2 pairs)
        assert mean.mu[m] - 25 == pytest.approx((summed.mu[m] - 25) / 2)
    assert mean.mu["A"] > 25 > mean.mu["C"] and mean.mu["B"] == pytest.approx(25)


@pytest.mark.parametrize("seed", [0, 1])
def test_rankings_recover_the_true_order(seed):
    rng = np.random.default_rng(seed)
    pairwise = A.simulate_votes(SKILLS, 3000, 2, rng)
    kwise = A.simulate_votes(SKILLS, 800, 4, rng)
    assert A.ranking(A.elo_ratings(pairwise, k_factor=8.0)) == TRUE_ORDER
    assert A.ranking(A.bradley_terry(pairwise)) == TRUE_ORDER
    assert A.ranking(A.bradley_terry(kwise)) == TRUE_ORDER
    assert A.ranking({m: mu for m, (mu, _) in A.kwise_ratings(kwise).items()}) == TRUE_ORDER


def votes_needed(seed: int, horizon: int = 2000) -> dict[str, int]:
    """Votes until each rater's ranking is right and stays right to ``horizon`` (horizon + 1 if never)."""
    out = {}
    rng = np.random.default_rng(seed)
    pairwise = A.simulate_votes(SKILLS, horizon, 2, rng)
    kwise = A.simulate_votes(SKILLS, horizon, 4, rng)
    models = list(SKILLS)
    cases = {
        "elo k=32, pairwise": (A.Elo(models, k_factor=32), pairwise),
        "elo k=4, pairwise": (A.Elo(models, k_factor=4), pairwise),
        "elo k=4, 4-wise": (A.Elo(models, k_factor=4), kwise),
        "k-wise weng-lin, 4-wise": (A.KwiseBayes(models, pairing="weng-lin"), kwise),
        "k-wise mean, 4-wise": (A.KwiseBayes(models), kwise),
    }
    for name, (rater, votes) in cases.items():
        needed = A.votes_to_true_order(rater, votes, TRUE_ORDER)
        out[name] = horizon + 1 if needed is None else needed
    return out


def test_kwise_needs_fewer_votes_than_elo(capsys):
    runs = [votes_needed(seed) for seed in range(5)]
    mean = {name: float(np.mean([run[name] for run in runs])) for name in runs[0]}
    with capsys.disabled():
        print(f"\nvotes until the true order of 6 generators holds to vote 2000 (mean of 5 seeds): {mean}")
    for name, value in mean.items():
        if name.startswith("elo"):
            assert mean["k-wise mean, 4-wise"] < value, name


def test_votes_from_scores_and_bootstrap():
    scores = {"hps": {("g1", "p1"): 0.3, ("g2", "p1"): 0.2, ("g3", "p1"): 0.2, ("g1", "p2"): 0.1}}
    votes = A.votes_from_scores(scores)
    assert votes == [A.Vote(("g1", "g2", "g3"), (1.0, 2.0, 2.0), "hps", "p1")]  # p2 has one generator: no vote
    rng = np.random.default_rng(0)
    sim = A.simulate_votes(SKILLS, 400, 4, rng)
    first = A.bootstrap_ratings(sim, lambda v, m: A.bradley_terry(v, m), n_resamples=30, seed=1)
    again = A.bootstrap_ratings(sim, lambda v, m: A.bradley_terry(v, m), n_resamples=30, seed=1)
    assert first == again
    assert all(e.low <= e.value <= e.high for e in first.values())
    report = A.generator_report(sim, n_resamples=20)
    assert report["rankings"]["bt"] == TRUE_ORDER and report["rankings"]["kwise"] == TRUE_ORDER
    assert set(report["ratings"]) == {"elo", "bt", "kwise"}
    assert "Win rate of row over column" in A.report_markdown(report)
