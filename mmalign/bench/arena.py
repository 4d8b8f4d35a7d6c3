"""Generator arenas: win rates and rankings from votes (human or AI judges, or reward models as judges).

Vote files are JSONL, one judgement per line; extra keys are ignored:

* K-wise (K >= 2): ``{"models": ["sd15", "sdxl", "flux", "pixart"], "ranks": [3, 1, 1, 2]}`` - lower rank is
  better, equal ranks are ties (K-Sort Arena's K-wise votes);
* pairwise, Chatbot Arena's battle format: ``{"model_a": "sd15", "model_b": "sdxl", "winner": "model_b"}`` with
  ``winner`` one of ``model_a``, ``model_b``, ``tie``, ``tie (bothbad)``;
* optional ``"judge"`` (``"human"``, ``"gpt-4o"``, a reward name...) and ``"prompt"`` on either form.

Rankings:

* **Elo** (Elo 1978; Chatbot Arena's ``compute_online_elo``): sequential updates in file order,
  ``R_i += k * (S_i - E_i)`` with ``E_i = 1 / (1 + 10^((R_j - R_i) / 400))``, a tie scores 0.5; a K-wise vote
  updates every model once from all its C(K, 2) pairs at the pre-vote ratings.
* **Bradley-Terry** maximum likelihood (Bradley & Terry 1952) by Hunter's (2004) MM algorithm
  ``g_i <- W_i / sum_j n_ij / (g_i + g_j)``; a tie is half a win for each side (as Chatbot Arena), and
  ``prior`` pseudo-games split evenly between every pair keep the estimate finite when a model never loses.
  The default ``prior = 0.1`` (also ``mmalign bench generators --bt-prior``) makes it a regularised (MAP) fit,
  not the plain maximum likelihood; ``prior = 0`` is the MLE.
  Reported on the Elo scale ``1000 + 400 log10 g_i`` (geometric mean of g = 1).
* **K-wise Bayesian** (K-Sort Arena, Li et al. 2024, arXiv:2408.14468: Gaussian capability posteriors updated
  from K-wise comparisons). Each model has ``N(mu, sigma^2)``, performance ``~ N(skill, beta^2)`` (Thurstone);
  a K-wise ranking is split into its C(K, 2) pairwise outcomes, each a probit (TrueSkill, Herbrich et al. 2006)
  moment-matching update at the pre-vote posterior, with ``c_iq^2 = sigma_i^2 + sigma_q^2 + 2 beta^2``,
  ``x = (mu_i - mu_q) / c_iq`` and the truncated-Gaussian corrections ``v, w`` of a win
  (``v = phi(x - e) / Phi(x - e)``, ``w = v (v + x - e)``) or of a draw within margin ``e``:
  ``mu_i += sigma_i^2 / c_iq * v``, ``sigma_i^2 *= 1 - sigma_i^2 / c_iq^2 * w``.
  ``pairing="mean"`` (default) averages each model's K - 1 pairwise corrections (weight 1 / (K - 1): the pairs of
  one ranking are not independent observations, a composite likelihood); for K = 2 it is TrueSkill's update.
  ``pairing="weng-lin"`` sums them with the damping ``gamma = sigma_i / c_iq`` of Weng & Lin (2011, JMLR 12,
  Algorithm "Thurstone-Mosteller full pair", as openskill's ``ThurstoneMostellerFull``); on simulated votes it
  reached the true order several times more slowly than ``"mean"`` (see tests/bench/test_arena.py). Defaults
  are TrueSkill's: mu0 = 25, sigma0 = 25/3, beta = sigma0 / 2, draw margin 0.1, variance floor
  ``kappa * sigma^2`` with kappa = 1e-4. Models are ranked by ``mu`` (``mu - 3 sigma``, the conservative score,
  is also reported). K-Sort Arena's exploration-exploitation matchmaking is not implemented: votes are taken
  as they come.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MMAlignError
from .protocols import Estimate

WINNERS = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}


@dataclass(frozen=True)
class Vote:
    """One judgement: K models with ranks (lower is better; equal ranks tie)."""

    models: tuple[str, ...]
    ranks: tuple[float, ...]
    judge: str = ""
    prompt: str = ""

    def __post_init__(self) -> None:
        if len(self.models) != len(self.ranks) or len(self.models) < 2:
            raise ValueError(f"a vote needs 2 or more models with one rank each, got {self.models} {self.ranks}")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"a model appears twice in one vote: {self.models}")

    def pairs(self) -> list[tuple[str, str, float]]:
        """``(a, b, s)`` for every pair, ``s`` = 1 if a won, 0.5 for a tie, 0 if a lost."""
        out = []
        for i, j in combinations(range(len(self.models)), 2):
            ri, rj = self.ranks[i], self.ranks[j]
            out.append((self.models[i], self.models[j], 1.0 if ri < rj else 0.5 if ri == rj else 0.0))
        return out


def parse_vote(row: Any) -> Vote:
    """A vote from one decoded JSON line (either format of the module docstring)."""
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    judge, prompt = str(row.get("judge", "")), str(row.get("prompt", ""))
    if "models" in row:
        models, ranks = row["models"], row.get("ranks")
        if not isinstance(models, list) or not isinstance(ranks, list):
            raise ValueError('"models" and "ranks" must be lists')
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in ranks):
            raise ValueError('"ranks" must be finite numbers')
        return Vote(tuple(str(m) for m in models), tuple(float(r) for r in ranks), judge, prompt)
    if {"model_a", "model_b", "winner"} <= set(row):
        if row["winner"] not in WINNERS:
            raise ValueError(f'"winner" must be one of {sorted(WINNERS)}, got {row["winner"]!r}')
        s = WINNERS[row["winner"]]
        return Vote((str(row["model_a"]), str(row["model_b"])), (1.0, 2.0 * s), judge, prompt)
    raise ValueError('expected "models" + "ranks", or "model_a" + "model_b" + "winner"')


def read_votes(path: str | os.PathLike) -> list[Vote]:
    """All votes of a JSONL file; a bad line is an error naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise MMAlignError(f"{path}: no such vote file")
    votes = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                votes.append(parse_vote(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as error:
                raise MMAlignError(f"{path}:{number}: {error}") from None
    if not votes:
        raise MMAlignError(f"{path}: no votes")
    return votes


def votes_from_scores(scores: Mapping[str, Mapping[tuple[str, str], float]]) -> list[Vote]:
    """One K-wise vote per (judge, prompt): the generators ordered by their score (higher is better; equal scores
    tie). ``scores[judge][(generator, prompt)]``; prompts with a single generator give no vote."""
    votes = []
    for judge, table in scores.items():
        by_prompt: dict[str, dict[str, float]] = {}
        for (generator, prompt), value in table.items():
            by_prompt.setdefault(prompt, {})[generator] = value
        for prompt in sorted(by_prompt):
            entries = by_prompt[prompt]
            if len(entries) < 2:
                continue
            models = tuple(sorted(entries))
            values = np.array([entries[m] for m in models])
            ranks = tuple(float(1 + (values > v).sum()) for v in values)
            votes.append(Vote(models, ranks, judge, prompt))
    return votes


def models_of(votes: Iterable[Vote]) -> list[str]:
    return sorted({m for vote in votes for m in vote.models})


# ---------------------------------------------------------------- win rates


def win_matrix(votes: Sequence[Vote], models: Sequence[str] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(models, wins, games)``: ``wins[i, j]`` = wins of i over j (ties count 0.5), ``games[i, j]`` = pairs."""
    models = list(models) if models is not None else models_of(votes)
    index = {m: i for i, m in enumerate(models)}
    wins = np.zeros((len(models), len(models)))
    games = np.zeros((len(models), len(models)))
    for vote in votes:
        for a, b, s in vote.pairs():
            i, j = index[a], index[b]
            wins[i, j] += s
            wins[j, i] += 1.0 - s
            games[i, j] += 1.0
            games[j, i] += 1.0
    return models, wins, games


def win_rate_matrix(votes: Sequence[Vote], models: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """``rate[i, j]`` = share of i's comparisons with j that i won (ties half); NaN where they never met."""
    models, wins, games = win_matrix(votes, models)
    with np.errstate(invalid="ignore", divide="ignore"):
        return models, np.where(games > 0, wins / np.where(games > 0, games, 1.0), np.nan)


# ---------------------------------------------------------------- Elo


class Elo:
    """Online Elo over votes; ``k_factor`` 32 (classic chess; Chatbot Arena used 4 over ~10^5 battles)."""

    def __init__(self, models: Sequence[str], k_factor: float = 32.0, scale: float = 400.0, initial: float = 1000.0):
        self.k_factor, self.scale, self.initial = k_factor, scale, initial
        self.rating = {m: initial for m in models}

    def update(self, vote: Vote) -> None:
        delta = dict.fromkeys(vote.models, 0.0)
        for a, b, s in vote.pairs():
            ra, rb = self.rating.setdefault(a, self.initial), self.rating.setdefault(b, self.initial)
            expected = 1.0 / (1.0 + 10.0 ** ((rb - ra) / self.scale))
            delta[a] += self.k_factor * (s - expected)
            delta[b] -= self.k_factor * (s - expected)
        for m, d in delta.items():
            self.rating[m] += d

    def ratings(self) -> dict[str, float]:
        return dict(self.rating)


def elo_ratings(votes: Sequence[Vote], models: Sequence[str] | None = None, **options: float) -> dict[str, float]:
    """Elo ratings after all ``votes`` in order (see :class:`Elo` for ``k_factor``, ``scale``, ``initial``)."""
    elo = Elo(models if models is not None else models_of(votes), **options)
    for vote in votes:
        elo.update(vote)
    return elo.ratings()


# ---------------------------------------------------------------- Bradley-Terry


def bradley_terry(
    votes: Sequence[Vote],
    models: Sequence[str] | None = None,
    *,
    prior: float = 0.1,
    max_iter: int = 10_000,
    tol: float = 1e-9,
    scale: float = 400.0,
    initial: float = 1000.0,
) -> dict[str, float]:
    """Bradley-Terry fit by Hunter's MM algorithm, on the Elo scale.

    Ties are half a win for each side; ``prior`` pseudo-games per pair (half won by each) regularise the fit:
    with the default 0.1 it is the maximum likelihood of the votes plus those pseudo-games, not of the votes
    alone; 0 gives the plain MLE, which exists only if every model both wins and loses within a connected graph.
    """
    models, wins, games = win_matrix(votes, models)
    n = len(models)
    off = ~np.eye(n, dtype=bool)
    wins = wins + off * prior / 2.0
    games = games + off * prior
    total_wins = wins.sum(axis=1)
    if np.any(total_wins <= 0):
        raise MMAlignError("Bradley-Terry: a model never wins; use prior > 0")
    gamma = np.ones(n)
    for _ in range(max_iter):
        denom = (games / (gamma[:, None] + gamma[None, :])).sum(axis=1)
        new = total_wins / denom
        new /= np.exp(np.log(new).mean())
        if np.max(np.abs(np.log(new) - np.log(gamma))) < tol:
            gamma = new
            break
        gamma = new
    return {m: initial + scale * math.log10(g) for m, g in zip(models, gamma)}


# ---------------------------------------------------------------- K-wise Bayesian (Thurstone-Mosteller)


def _pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def v_win(x: float, e: float) -> float:
    """Mean correction of a win observed with margin ``e``: ``phi(x - e) / Phi(x - e)``."""
    t = x - e
    denom = _cdf(t)
    return -t if denom < 1e-300 else _pdf(t) / denom


def w_win(x: float, e: float) -> float:
    """Variance correction of a win: ``v (v + x - e)``, in [0, 1]."""
    t = x - e
    if _cdf(t) < 1e-300:
        return 1.0
    v = v_win(x, e)
    return v * (v + t)


def v_draw(x: float, e: float) -> float:
    """Mean correction of a draw within margin ``e``: ``(phi(-e - x) - phi(e - x)) / (Phi(e - x) - Phi(-e - x))``."""
    denom = _cdf(e - x) - _cdf(-e - x)
    if denom < 1e-12:
        return e - x if x > 0 else -e - x
    return (_pdf(-e - x) - _pdf(e - x)) / denom


def w_draw(x: float, e: float) -> float:
    """Variance correction of a draw within margin ``e``."""
    denom = _cdf(e - x) - _cdf(-e - x)
    if denom < 1e-12:
        return 1.0
    v = v_draw(x, e)
    return v * v + ((e - x) * _pdf(e - x) + (e + x) * _pdf(e + x)) / denom


class KwiseBayes:
    """Gaussian skill posteriors updated from K-wise rankings by pairwise probit (Thurstone) moment matching."""

    PAIRINGS = ("mean", "weng-lin")

    def __init__(
        self,
        models: Sequence[str],
        mu: float = 25.0,
        sigma: float = 25.0 / 3.0,
        beta: float | None = None,
        draw_margin: float = 0.1,
        kappa: float = 1e-4,
        pairing: str = "mean",
    ):
        if pairing not in self.PAIRINGS:
            raise ValueError(f"pairing must be one of {self.PAIRINGS}, got {pairing!r}")
        self.mu0, self.sigma0 = mu, sigma
        self.beta = sigma / 2.0 if beta is None else beta
        self.draw_margin, self.kappa, self.pairing = draw_margin, kappa, pairing
        self.mu = {m: mu for m in models}
        self.var = {m: sigma * sigma for m in models}

    def update(self, vote: Vote) -> None:
        for m in vote.models:
            self.mu.setdefault(m, self.mu0)
            self.var.setdefault(m, self.sigma0**2)
        two_beta_sq = 2.0 * self.beta**2
        weight = 1.0 / (len(vote.models) - 1) if self.pairing == "mean" else 1.0
        new_mu, new_var = {}, {}
        for i, (mi, ri) in enumerate(zip(vote.models, vote.ranks)):
            omega = delta = 0.0
            for q, (mq, rq) in enumerate(zip(vote.models, vote.ranks)):
                if q == i:
                    continue
                c = math.sqrt(self.var[mi] + self.var[mq] + two_beta_sq)
                x = (self.mu[mi] - self.mu[mq]) / c
                e = self.draw_margin / c
                gamma = math.sqrt(self.var[mi]) / c if self.pairing == "weng-lin" else weight
                if ri < rq:  # i won
                    omega += self.var[mi] / c * v_win(x, e)
                    delta += gamma * self.var[mi] / c**2 * w_win(x, e)
                elif ri > rq:  # i lost
                    omega -= self.var[mi] / c * v_win(-x, e)
                    delta += gamma * self.var[mi] / c**2 * w_win(-x, e)
                else:
                    omega += self.var[mi] / c * v_draw(x, e)
                    delta += gamma * self.var[mi] / c**2 * w_draw(x, e)
            new_mu[mi] = self.mu[mi] + weight * omega
            new_var[mi] = self.var[mi] * max(1.0 - delta, self.kappa)
        self.mu.update(new_mu)
        self.var.update(new_var)

    def ratings(self) -> dict[str, float]:
        return dict(self.mu)

    def posterior(self) -> dict[str, tuple[float, float]]:
        """``model -> (mu, sigma)``."""
        return {m: (self.mu[m], math.sqrt(self.var[m])) for m in self.mu}


def kwise_ratings(
    votes: Sequence[Vote], models: Sequence[str] | None = None, **options: float
) -> dict[str, tuple[float, float]]:
    """Posterior ``(mu, sigma)`` per model after all ``votes`` in order (options of :class:`KwiseBayes`)."""
    rater = KwiseBayes(models if models is not None else models_of(votes), **options)
    for vote in votes:
        rater.update(vote)
    return rater.posterior()


# ---------------------------------------------------------------- rankings, intervals, simulation


def ranking(ratings: Mapping[str, float]) -> list[str]:
    """Models from best to worst (equal ratings by name)."""
    return sorted(ratings, key=lambda m: (-ratings[m], m))


def bootstrap_ratings(
    votes: Sequence[Vote],
    method: Callable[[Sequence[Vote], Sequence[str]], Mapping[str, float]],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Estimate]:
    """Percentile CI of each model's rating over ``n_resamples`` resamples of the votes (with replacement, in
    resampled order; Chatbot Arena's bootstrap of Elo / BT)."""
    models = models_of(votes)
    point = method(votes, models)
    if n_resamples <= 0:
        return {m: Estimate(point[m], math.nan, math.nan, len(votes), level) for m in models}
    rng = np.random.default_rng(seed)
    samples = np.empty((n_resamples, len(models)))
    for b in range(n_resamples):
        resampled = [votes[i] for i in rng.integers(0, len(votes), size=len(votes))]
        rated = method(resampled, models)
        samples[b] = [rated[m] for m in models]
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha], axis=0)
    return {m: Estimate(point[m], float(lo), float(hi), len(votes), level) for m, lo, hi in zip(models, low, high)}


def simulate_votes(
    skills: Mapping[str, float], n_votes: int, k: int, rng: np.random.Generator, noise: float = 1.0
) -> list[Vote]:
    """Thurstone votes: each vote shows ``k`` models drawn uniformly without replacement and ranks them by
    ``skill + N(0, noise^2)``."""
    models = list(skills)
    votes = []
    for _ in range(n_votes):
        shown = [models[i] for i in rng.choice(len(models), size=k, replace=False)]
        performance = np.array([skills[m] for m in shown]) + rng.normal(0.0, noise, size=k)
        ranks = tuple(float(1 + (performance > p).sum()) for p in performance)
        votes.append(Vote(tuple(shown), ranks, judge="simulated"))
    return votes


def votes_to_true_order(rater: Any, votes: Iterable[Vote], true_order: Sequence[str]) -> int | None:
    """Votes fed to ``rater`` (an :class:`Elo` or :class:`KwiseBayes`) until its ranking equals ``true_order`` and
    stays equal to the end of ``votes``; None if it is wrong after the last vote."""
    target = list(true_order)
    last_wrong, count = 0, 0
    for count, vote in enumerate(votes, 1):
        rater.update(vote)
        if ranking(rater.ratings()) != target:
            last_wrong = count
    if last_wrong == count:
        return None
    return last_wrong + 1


# ---------------------------------------------------------------- generator reports

METHODS = ("elo", "bt", "kwise")


def read_generator_scores(
    path: str | os.PathLike, generators: Mapping[str, str] | None = None
) -> dict[str, dict[tuple[str, str], float]]:
    """``scores[reward][(generator, prompt)]`` from an ``mmalign score`` JSONL: the mean over a generator's images
    of one prompt (several seeds). The generator is the record's ``"generator"`` key, else ``generators[path]``,
    else the name of the image's folder (``outputs/<generator>/<image>``)."""
    path = Path(path)
    if not path.is_file():
        raise MMAlignError(f"{path}: no such scores file")
    sums: dict[str, dict[tuple[str, str], list[float]]] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, score = str(row["path"]), float(row["score"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise MMAlignError(
                    f"{path}:{number}: expected a JSON object with 'path' and a numeric 'score'"
                ) from None
            generator = row.get("generator") or (generators or {}).get(image) or Path(image).parent.name
            if not generator:
                raise MMAlignError(f"{path}:{number}: cannot tell the generator of {image!r}; add a 'generator' key")
            reward = str(row.get("reward") or path.stem)
            sums.setdefault(reward, {}).setdefault((str(generator), str(row.get("prompt", ""))), []).append(score)
    if not sums:
        raise MMAlignError(f"{path}: no score records")
    return {reward: {key: float(np.mean(v)) for key, v in table.items()} for reward, table in sums.items()}


def mean_rewards(
    scores: Mapping[str, Mapping[tuple[str, str], float]],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, Estimate]]:
    """Mean reward per generator with a percentile bootstrap CI over its prompts, per reward."""
    from .protocols import bootstrap_ratio

    out: dict[str, dict[str, Estimate]] = {}
    for reward, table in scores.items():
        per_generator: dict[str, list[float]] = {}
        for (generator, _), value in sorted(table.items()):
            per_generator.setdefault(generator, []).append(value)
        out[reward] = {
            g: bootstrap_ratio(v, n_resamples=n_resamples, seed=seed, level=level)
            for g, v in sorted(per_generator.items())
        }
    return out


def generator_report(
    votes: Sequence[Vote],
    *,
    scores: Mapping[str, Mapping[tuple[str, str], float]] | None = None,
    methods: Sequence[str] = METHODS,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    elo_options: Mapping[str, float] | None = None,
    bt_options: Mapping[str, float] | None = None,
    kwise_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Win-rate matrix and rankings of ``votes`` by each method, JSON-ready.

    Elo and Bradley-Terry intervals are vote bootstraps (:func:`bootstrap_ratings`); the K-wise interval is the
    posterior ``mu +- z sigma``. With ``scores``, the mean reward of each generator (bootstrap over prompts).
    """
    from statistics import NormalDist

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise MMAlignError(f"unknown method(s) {sorted(unknown)}; use {', '.join(METHODS)}")
    if not votes:
        raise MMAlignError("no votes to rank")
    models, wins, games = win_matrix(votes)
    boot = {"n_resamples": n_resamples, "seed": seed, "level": level}
    ratings: dict[str, dict[str, Estimate]] = {}
    if "elo" in methods:
        ratings["elo"] = bootstrap_ratings(votes, lambda v, m: elo_ratings(v, m, **(elo_options or {})), **boot)
    if "bt" in methods:
        ratings["bt"] = bootstrap_ratings(votes, lambda v, m: bradley_terry(v, m, **(bt_options or {})), **boot)
    posterior: dict[str, tuple[float, float]] = {}
    if "kwise" in methods:
        posterior = kwise_ratings(votes, models, **(kwise_options or {}))
        z = NormalDist().inv_cdf(0.5 + level / 2.0)
        ratings["kwise"] = {
            m: Estimate(mu, mu - z * s, mu + z * s, len(votes), level) for m, (mu, s) in posterior.items()
        }
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(games > 0, wins / np.where(games > 0, games, 1.0), np.nan)
        overall = wins.sum(axis=1) / np.maximum(games.sum(axis=1), 1.0)
    judges: dict[str, int] = {}
    for vote in votes:
        judges[vote.judge or "unnamed"] = judges.get(vote.judge or "unnamed", 0) + 1
    report: dict[str, Any] = {
        "models": models,
        "n_votes": len(votes),
        "k": sorted({len(v.models) for v in votes}),
        "judges": judges,
        "win_rate": rate.tolist(),
        "games": games.astype(int).tolist(),
        "overall_win_rate": dict(zip(models, overall.tolist())),
        "ratings": {method: {m: e.as_dict() for m, e in r.items()} for method, r in ratings.items()},
        "rankings": {method: ranking({m: e.value for m, e in r.items()}) for method, r in ratings.items()},
        "settings": {
            "bootstrap": boot,
            "elo": {"k_factor": 32.0, "scale": 400.0, "initial": 1000.0, **(elo_options or {})},
            "bt": {"prior": 0.1, "ties": "half a win each", **(bt_options or {})},
            "kwise": {
                "model": "Thurstone pairwise probit updates, averaged over each model's K-1 pairs",
                "pairing": "mean",
                "mu": 25.0,
                "sigma": 25.0 / 3.0,
                "draw_margin": 0.1,
                **(kwise_options or {}),
            },
        },
    }
    if posterior:
        report["kwise_posterior"] = {
            m: {"mu": mu, "sigma": s, "conservative": mu - 3 * s} for m, (mu, s) in posterior.items()
        }
    if scores:
        report["mean_reward"] = {
            reward: {g: e.as_dict() for g, e in table.items()} for reward, table in mean_rewards(scores, **boot).items()
        }
    return report


def _fmt(estimate: Mapping[str, Any] | None, digits: int = 0) -> str:
    if not estimate or estimate.get("value") is None:
        return "–"
    value, low, high = (estimate.get(k) for k in ("value", "low", "high"))
    if low is None or high is None or math.isnan(low):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _order(report: Mapping[str, Any]) -> list[str]:
    """Display order: Bradley-Terry (order-free maximum likelihood) when present, else K-wise, else Elo."""
    for method in ("bt", "kwise", "elo"):
        if method in report["rankings"]:
            return list(report["rankings"][method])
    return list(report["models"])


def report_markdown(report: Mapping[str, Any]) -> str:
    """The ranking table (in Bradley-Terry order when computed) and the win-rate matrix, as markdown."""
    methods = list(report["ratings"])
    order = _order(report)
    rewards = list(report.get("mean_reward", {}))
    names = {"elo": "Elo", "bt": "Bradley-Terry", "kwise": "K-wise mu"}
    header = ["rank", "generator", *(names[m] for m in methods), "win rate %", *(f"mean {r}" for r in rewards)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for position, model in enumerate(order, 1):
        cells = [str(position), model]
        cells += [_fmt(report["ratings"][m][model], 0 if m != "kwise" else 2) for m in methods]
        cells.append(f"{100 * report['overall_win_rate'][model]:.1f}")
        cells += [_fmt(report["mean_reward"][r].get(model), 3) for r in rewards]
        lines.append("| " + " | ".join(cells) + " |")
    judges = ", ".join(f"{k} ({v})" for k, v in report["judges"].items())
    lines += [
        "",
        f"{report['n_votes']} votes (K = {', '.join(map(str, report['k']))}; judges: {judges}); "
        f"{100 * report['settings']['bootstrap']['level']:.0f}% intervals: vote bootstrap for Elo and "
        "Bradley-Terry, posterior for K-wise.",
    ]
    index = {m: i for i, m in enumerate(report["models"])}
    lines += [
        "",
        "Win rate of row over column (%):",
        "",
        "| | " + " | ".join(order) + " |",
        "|---|" + "---|" * len(order),
    ]
    for a in order:
        row = []
        for b in order:
            value = report["win_rate"][index[a]][index[b]]
            row.append("–" if a == b or value is None or math.isnan(value) else f"{100 * value:.0f}")
        lines.append(f"| {a} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_win_rates(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Heatmap of the win-rate matrix, rows and columns in ranking order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = _order(report)
    index = [report["models"].index(m) for m in order]
    rate = np.array(report["win_rate"], dtype=np.float64)[np.ix_(index, index)]
    size = 1.0 + 0.6 * len(order)
    fig = Figure(figsize=(size + 1.5, size))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(rate * 100.0), vmin=0, vmax=100, cmap="RdBu")
    for i in range(len(order)):
        for j in range(len(order)):
            if i != j and np.isfinite(rate[i, j]):
                ax.text(j, i, f"{100 * rate[i, j]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=45, ha="right")
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels(order)
    ax.set_title("win rate of row over column (%)", fontsize="small")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_generator_report(report: Mapping[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """``generators.json``, ``generators.md`` and ``win_rates.png`` in ``out``."""
    from .runner import json_safe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "generators.json", "markdown": out / "generators.md", "plot": out / "win_rates.png"}
    paths["json"].write_text(json.dumps(json_safe(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(report_markdown(report), encoding="utf-8")
    plot_win_rates(report, paths["plot"])
    return paths
