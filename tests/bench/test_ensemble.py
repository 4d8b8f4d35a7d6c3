"""Calibrated ensembles: the Bradley-Terry fit (recovery, objective, non-negativity), the ensemble file and the
``ensemble:FILE`` reward built from tiny CLIP rewards, and ``mmalign bench rewards --fit-ensemble`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mmalign
from mmalign.bench import protocols as P
from mmalign.bench.ensemble import (
    EnsembleFit,
    bt_objective,
    fit_ensemble,
    fit_weights,
    save_ensemble,
)
from mmalign.bench.runner import Group, RewardSpec, ScoreTable
from mmalign.cli import main
from mmalign.errors import ConfigError
from mmalign.rewards.ensemble import EnsembleReward
from tests import tiny


def synthetic(true_w, n_pairs=20000, seed=0, extra=None):
    """Groups of one pair each and member score tables drawn from a known Bradley-Terry model: member k's raw
    score is ``mu_k + sigma_k x_k``, the utility ``sum_k w_k x_k``, the label ~ Bernoulli(sigma(u_a - u_b))."""
    rng = np.random.default_rng(seed)
    k = len(true_w)
    mus, sigmas = rng.normal(0, 5, k), rng.uniform(0.2, 30, k)
    x = rng.normal(size=(n_pairs, 2, k))
    utility = x @ np.asarray(true_w)
    a_wins = rng.random(n_pairs) < P.sigmoid(utility[:, 0] - utility[:, 1])
    raw = mus + sigmas * x
    columns = [raw[..., j] for j in range(k)]
    if extra is not None:
        columns.append(extra(utility, rng))
    tables = [ScoreTable(f"m{j}") for j in range(len(columns))]
    groups = []
    for i in range(n_pairs):
        keys = [f"a{i}", f"b{i}"]
        ranks = [1.0, 2.0] if a_wins[i] else [2.0, 1.0]
        groups.append(Group(f"p{i}", keys, keys, ranks))
        for table, column in zip(tables, columns):
            table.add(keys[0], f"p{i}", column[i, 0])
            table.add(keys[1], f"p{i}", column[i, 1])
    return tables, groups


def test_fit_recovers_known_weights():
    true_w = [2.0, 0.5, 0.0]
    tables, groups = synthetic(true_w)
    fit = fit_ensemble(tables, groups, l2=1e-4)
    assert fit.weights == pytest.approx(true_w, abs=0.08)
    assert fit.info["pairs"] == 20000 and fit.info["items"] == 40000
    # standardisation stats are the fitting items' mean and (ddof 0) std
    values = np.array([tables[1].get(k, g.prompt) for g in groups for k in g.keys])
    assert fit.means[1] == pytest.approx(values.mean()) and fit.stds[1] == pytest.approx(values.std())


def test_weights_stay_non_negative_where_the_unconstrained_optimum_is_negative():
    # humans dislike what member 2 likes: its unconstrained weight is about -1
    tables, groups = synthetic([1.5, 0.0, -1.0], n_pairs=4000, seed=1)
    fit = fit_ensemble(tables, groups, l2=1e-3)
    assert (fit.weights >= 0).all() and fit.weights[2] == 0.0
    from scipy.optimize import minimize

    from mmalign.bench.ensemble import pair_differences

    diffs, labels = pair_differences(tables, groups, fit.means, fit.stds)
    free = minimize(bt_objective, np.zeros(3), args=(diffs, labels, 1e-3), jac=True, method="L-BFGS-B").x
    assert free[2] < -0.5  # the bound is active
    # the constrained optimum satisfies the KKT conditions: zero gradient where w > 0, >= 0 where w = 0
    _, grad = bt_objective(fit.weights, diffs, labels, 1e-3)
    active = fit.weights == 0
    assert np.abs(grad[~active]).max() < 1e-5 and (grad[active] > 0).all()


def test_objective_and_gradient_against_an_independent_derivation():
    rng = np.random.default_rng(3)
    diffs = rng.normal(size=(7, 3))
    labels = np.array([1.0, 1.0, 0.8, 1.0, 0.6, 1.0, 0.9])
    w = np.array([0.3, 1.2, 0.05])
    value, grad = bt_objective(w, diffs, labels, l2=0.01)
    wt = torch.tensor(w, requires_grad=True)
    d, y = torch.tensor(diffs), torch.tensor(labels)
    m = d @ wt
    # written from the definition: -mean[y log sigma(m) + (1 - y) log(1 - sigma(m))] + l2/2 |w|^2
    loss = -(y * torch.log(torch.sigmoid(m)) + (1 - y) * torch.log(1 - torch.sigmoid(m))).mean()
    loss = loss + 0.5 * 0.01 * (wt * wt).sum()
    loss.backward()
    assert value == pytest.approx(loss.item(), rel=1e-12)
    assert grad == pytest.approx(wt.grad.numpy(), rel=1e-10)
    # by hand: one pair d = (1, 0) at w = 0 -> log 2 and gradient (-1/2, 0)
    value, grad = bt_objective(np.zeros(2), np.array([[1.0, 0.0]]), None, l2=0.0)
    assert value == pytest.approx(np.log(2.0)) and grad == pytest.approx([-0.5, 0.0])
    # hard labels: exactly the brief's -mean log sigma(w . d)
    value, _ = bt_objective(w, diffs, None, l2=0.0)
    assert value == pytest.approx(-np.mean(np.log(P.sigmoid(diffs @ w))))


def test_fit_weights_refuses_no_pairs():
    with pytest.raises(mmalign.errors.MMAlignError, match="non-tied pair"):
        fit_weights(np.zeros((0, 2)))


# ---------------------------------------------------------------- the ensemble reward


@pytest.fixture(scope="module")
def clip_folder_b(tmp_path_factory):
    return tiny.make_clip_model(tmp_path_factory.mktemp("clip_b"), seed=1, image_size=64)


def specs(clip_folder, clip_folder_b):
    return [
        RewardSpec("pickscore", weights=str(clip_folder), processor=str(clip_folder)),
        RewardSpec("clipscore-tm", weights=str(clip_folder_b), processor=str(clip_folder_b)),
    ]


def test_ensemble_file_round_trips_and_scores_sum_w_z(clip_folder, clip_folder_b, image_files, tmp_path):
    fit = EnsembleFit(["pickscore", "clipscore-tm"], np.array([3.0, -2.0]), np.array([0.5, 4.0]), np.array([0.7, 1.3]))
    path = save_ensemble(tmp_path / "ens.json", specs(clip_folder, clip_folder_b), fit, {"note": "by hand"})
    data = json.loads(path.read_text())
    assert data["format"] == "mmalign-ensemble" and data["fit"]["note"] == "by hand"
    assert [m["weight"] for m in data["members"]] == [0.7, 1.3] and data["members"][1]["std"] == 4.0

    ensemble = mmalign.load_reward(f"ensemble:{path}")
    assert isinstance(ensemble, EnsembleReward) and ensemble.modality == "image" and ensemble.is_differentiable
    assert ensemble.info()["members"][0] == {"label": "pickscore", "weight": 0.7, "mean": 3.0, "std": 0.5}
    assert ensemble.info()["dtype"] == "fp32" and ensemble.uses_prompt
    prompts = ["a red cube", "a cat", "two spheres", "a red cube", "a dog"]
    members = [
        mmalign.load_reward("pickscore", weights=str(clip_folder), processor=str(clip_folder)),
        mmalign.load_reward("clipscore-tm", weights=str(clip_folder_b), processor=str(clip_folder_b)),
    ]
    raw = [m.score([str(p) for p in image_files], prompts).double() for m in members]
    by_hand = 0.7 * (raw[0] - 3.0) / 0.5 + 1.3 * (raw[1] + 2.0) / 4.0
    got = ensemble.score([str(p) for p in image_files], prompts).double()
    assert torch.allclose(got, by_hand, rtol=1e-5, atol=1e-5)

    # the tensor path: Σ w z of the members' tensor scores, with gradients reaching the pixels
    images = torch.rand(2, 3, 40, 48, requires_grad=True)
    scores = ensemble.score_tensor(images, prompts[:2])
    raw_t = [m.score_tensor(images, prompts[:2]).double() for m in members]
    expected = 0.7 * (raw_t[0] - 3.0) / 0.5 + 1.3 * (raw_t[1] + 2.0) / 4.0
    assert torch.allclose(scores.double(), expected, rtol=1e-5, atol=1e-5)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0

    from mmalign.scoring import media_scorers

    assert media_scorers(ensemble, ["image"]) == {}
    with pytest.raises(mmalign.errors.MMAlignError, match="ensemble of image rewards"):
        media_scorers(ensemble, ["video"])  # files of another modality: refused with a reason, not lifted

    # a relative member path is resolved against the file's folder
    moved = json.loads(path.read_text())
    (tmp_path / "models").mkdir()
    import shutil

    shutil.copytree(clip_folder, tmp_path / "models" / "a")
    moved["members"][0]["weights"] = moved["members"][0]["processor"] = "models/a"
    (tmp_path / "rel.json").write_text(json.dumps(moved))
    again = mmalign.load_reward(f"ensemble:{tmp_path / 'rel.json'}")
    assert torch.allclose(again.score([str(image_files[0])], prompts[0]).double(), got[:1], atol=1e-5)


def test_reward_spec_parsing_and_trainer_reward(clip_folder, clip_folder_b, image_files, tmp_path):
    from mmalign.trainers.online import WeightedReward, build_reward, parse_reward_spec

    assert parse_reward_spec("ensemble:runs/e.json") == [("ensemble:runs/e.json", 1.0)]
    assert parse_reward_spec("ensemble:runs/e.json:0.5,hpsv2.1:2") == [("ensemble:runs/e.json", 0.5), ("hpsv2.1", 2.0)]
    assert parse_reward_spec("ensemble:/abs/v1:2/e.json") == [("ensemble:/abs/v1:2/e.json", 1.0)]
    with pytest.raises(ConfigError, match="names no ensemble file"):
        parse_reward_spec("ensemble:")
    fit = EnsembleFit(["a", "b"], np.array([0.0, 0.0]), np.array([1.0, 2.0]), np.array([1.0, 0.5]))
    path = save_ensemble(tmp_path / "e.json", specs(clip_folder, clip_folder_b), fit)
    reward = build_reward(f"ensemble:{path}:0.5")
    assert isinstance(reward, WeightedReward) and reward.is_differentiable and reward.weights == [0.5]
    images = torch.rand(2, 3, 32, 32)
    direct = mmalign.load_reward(f"ensemble:{path}").score_tensor(images, ["x", "y"])
    assert torch.allclose(reward(images, ["x", "y"]), 0.5 * direct, atol=1e-6)
    # on a video generator each image member is lifted (mean over frames), the calibration kept
    from mmalign.rewards.lifted import lift
    from mmalign.trainers.online import for_modality

    video_reward = for_modality(reward, "video")
    assert video_reward.rewards[0].modality == "video"
    videos = torch.rand(2, 3, 3, 32, 32)
    members = [lift(m, "video").score_tensor(videos, ["x", "y"]) for m in reward.rewards[0].rewards]
    by_hand = 0.5 * (1.0 * members[0] / 1.0 + 0.5 * members[1] / 2.0)
    assert torch.allclose(video_reward(videos, ["x", "y"]), by_hand, atol=1e-5)


class _Fake:
    def __init__(self, name, modality):
        self.name, self.modality = name, modality


def test_refuses_mixed_modalities_and_bad_files(tmp_path, clip_folder):
    with pytest.raises(ConfigError, match="one modality.*pickscore: image.*clap: audio"):
        EnsembleReward([_Fake("pickscore", "image"), _Fake("clap", "audio")], [0, 0], [1, 1], [1, 1])
    good = {
        "format": "mmalign-ensemble",
        "version": 1,
        "members": [{"name": "pickscore", "weights": str(clip_folder), "mean": 0.0, "std": 1.0, "weight": 1.0}],
    }
    cases = [
        ({**good, "members": []}, "key 'members' must be a non-empty list"),
        ({**good, "format": "other"}, "key 'format'"),
        ({**good, "version": 7}, "key 'version'"),
        ({**good, "members": [{**good["members"][0], "std": 0}]}, r"members\[0\]\.std' must be positive"),
        ({**good, "members": [{**good["members"][0], "weight": -1}]}, r"members\[0\]\.weight' must be non-negative"),
        ({**good, "members": [{k: v for k, v in good["members"][0].items() if k != "mean"}]}, r"members\[0\]\.mean'"),
        ({**good, "members": [{**good["members"][0], "wieght": 1}]}, r"members\[0\]\.wieght' is not a member key"),
        ({**good, "members": [{**good["members"][0], "name": 3}]}, r"members\[0\]\.name'"),
    ]
    for number, (content, message) in enumerate(cases):
        path = tmp_path / f"bad{number}.json"
        path.write_text(json.dumps(content))
        with pytest.raises(ConfigError, match=message):
            mmalign.load_reward(f"ensemble:{path}")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a JSON ensemble file"):
        mmalign.load_reward(f"ensemble:{tmp_path / 'junk.json'}")
    with pytest.raises(ConfigError, match="no such ensemble file"):
        mmalign.load_reward(f"ensemble:{tmp_path / 'absent.json'}")
    (tmp_path / "ok.json").write_text(json.dumps(good))
    with pytest.raises(ConfigError, match="drop weights"):
        mmalign.load_reward(f"ensemble:{tmp_path / 'ok.json'}", weights="x.pt")


# ---------------------------------------------------------------- the CLI end to end


def test_cli_fit_ensemble_end_to_end(clip_folder, clip_folder_b, tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    lines = []
    for p in range(8):
        for i in range(2):
            names = [f"{p}_{i}_{j}.png" for j in range(2)]
            for j, name in enumerate(names):
                tiny.random_image(100 * p + 10 * i + j, (40, 32)).save(root / name)
            lines.append({"prompt": f"prompt {p}", "chosen": str(root / names[0]), "rejected": str(root / names[1])})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    argv = ["bench", "rewards", "--protocol", "pairs", "--data", str(pairs), "--no-progress", "--bootstrap", "30"]
    members = ["--reward", "pickscore", "--weights", str(clip_folder), "--processor", str(clip_folder)]
    members += ["--reward", "clipscore-tm", "--weights", str(clip_folder_b), "--processor", str(clip_folder_b)]
    assert main([*argv, *members, "--fit-ensemble", "--out", str(out), "--seed", "3"]) == 0
    captured = capsys.readouterr()
    assert "| ensemble | pairs:held-out |" in captured.out and "| member | weight |" in captured.out
    assert "held out" in captured.err

    results = {r["reward"]: r for r in (json.loads(f.read_text()) for f in out.glob("*.json")) if "reward" in r}
    assert set(results) == {"pickscore", "clipscore-tm", "ensemble"}
    file = json.loads((out / "ensemble.json").read_text())
    weights = [m["weight"] for m in file["members"]]
    assert min(weights) >= 0 and results["ensemble"]["settings"]["ensemble"]["weights"] == pytest.approx(weights)
    assert file["fit"]["pairs"] == 8 and results["ensemble"]["counts"]["pairs"] == 8  # 4 prompts x 2 each way
    for r in results.values():
        low, value, high = (r["metrics"]["accuracy"][k] for k in ("low", "value", "high"))
        assert low <= value <= high

    assert main(["bench", "leaderboard", str(out), "--out", str(tmp_path / "board")]) == 0  # skips ensemble.json
    assert "ensemble" in capsys.readouterr().out

    # the saved ensemble, reloaded as a reward, reproduces the held-out accuracy pair by pair
    ensemble = mmalign.load_reward(f"ensemble:{out / 'ensemble.json'}")
    from mmalign.bench.runner import load_benchmark, split_by_prompt

    _, test = split_by_prompt(load_benchmark("pairs", pairs).test, 0.5, 3)
    held_prompts = {g.prompt for g in test}
    held = [line for line in lines if line["prompt"] in held_prompts]
    chosen = ensemble.score([line["chosen"] for line in held], [line["prompt"] for line in held]).numpy()
    rejected = ensemble.score([line["rejected"] for line in held], [line["prompt"] for line in held]).numpy()
    expected = P.pairwise_accuracy(chosen, rejected)
    assert results["ensemble"]["metrics"]["accuracy"]["value"] == pytest.approx(expected)

    # `ensemble:FILE` is a reward like the others in `bench rewards` and `score`
    assert main([*argv, "--reward", f"ensemble:{out / 'ensemble.json'}"]) == 0
    assert f"| ensemble:{out / 'ensemble.json'} | pairs |" in capsys.readouterr().out
    scores = tmp_path / "scores.jsonl"
    argv_score = ["score", lines[0]["chosen"], "--reward", f"ensemble:{out / 'ensemble.json'}", "--prompt", "prompt 0"]
    assert main([*argv_score, "--out", str(scores), "--no-progress"]) == 0
    record = json.loads(scores.read_text().splitlines()[0])
    assert record["score"] == pytest.approx(float(ensemble.score([lines[0]["chosen"]], "prompt 0")[0]), abs=1e-5)


def test_cli_fit_ensemble_refusals(clip_folder, tmp_path, capsys):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("")
    base = ["bench", "rewards", "--protocol", "pairs", "--data", str(pairs), "--no-progress"]
    one = ["--reward", "pickscore", "--weights", str(clip_folder)]
    assert main([*base, *one, "--fit-ensemble"]) == 2
    assert "at least two --reward" in capsys.readouterr().err
    assert main([*base, "--scores", str(pairs), "--fit-ensemble"]) == 2
    assert "not --scores" in capsys.readouterr().err
    assert main([*base, *one, "--ensemble-out", str(tmp_path / "e.json")]) == 2
    assert "goes with --fit-ensemble" in capsys.readouterr().err


def test_label_with_an_ensemble_reward(tmp_path):
    """`mmalign label --reward ensemble:FILE` ranks a tiny generator's samples by the ensemble's score."""
    from mmalign.rewards.ensemble import EnsembleSpec, Member

    members = [
        Member("jpeg-compressibility", mean=-2.0, std=0.5, weight=0.3),
        Member("jpeg-incompressibility", mean=1.0, std=2.0, weight=1.0),
    ]
    path = EnsembleSpec(members).save(tmp_path / "jpeg.json")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    sd = tiny.make_sd_pipeline(tmp_path / "sd")
    out = tmp_path / "labels"
    argv = ["label", "--model", str(sd), "--reward", f"ensemble:{path}", "--prompts", str(prompts), "--k", "2"]
    assert main([*argv, "--out", str(out), "--steps", "2", "--resolution", "32"]) == 0
    rows = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    ensemble = mmalign.load_reward(f"ensemble:{path}")
    for row in rows:
        images = [str(out / name) for name in row["images"]]
        expected = ensemble.score(images, row["prompt"]).tolist()
        assert row["scores"] == pytest.approx(expected, abs=1e-5)
        assert row["ranking"] == sorted(range(2), key=lambda i: -row["scores"][i])


def test_smpo_refuses_an_ensemble_with_a_reason(tmp_path):
    from types import SimpleNamespace

    from mmalign.rewards.ensemble import EnsembleSpec, Member
    from mmalign.trainers import dpo

    path = EnsembleSpec([Member("jpeg-compressibility", mean=0.0, std=1.0, weight=1.0)]).save(tmp_path / "e.json")
    config = SimpleNamespace(smpo_reward=f"ensemble:{path}", smpo_reward_weights=None, smpo_reward_processor=None)
    with pytest.raises(ConfigError, match="ensembles are not accepted"):
        dpo.SmPOTrainer._score_pairs_with_reward(SimpleNamespace(config=config, pairs=[]))
