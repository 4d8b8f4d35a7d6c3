"""The Diffusion-DPO family on tiny SD / SDXL pipelines: learning, every parameter trained, exact resume,
two processes equal one, outputs loadable by diffusers, bad rows counted, NaN guard, CLI precedence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmalign.commands.train import resolve_trainer_config
from tests.trainers.conftest import interrupt_then_resume, write_pairs

REPO = Path(__file__).resolve().parents[2]


def make_trainer(model, data, out, *overrides):
    base = [
        f"model={model}",
        f"data={data}",
        f"output_dir={out}",
        "resolution=32",
        "batch_size=2",
        "tracker=none",
        "progress=false",
        "log_every=1",
        "max_steps=2",
        "lr=1e-3",
        "lora_rank=4",
    ]
    cls, config = resolve_trainer_config(None, base + list(overrides))
    return cls(config)


def trainable(trainer):
    return {k: v.clone() for k, v in trainer._trainable_state().items()}


@torch.no_grad()
def eval_loss(trainer, micro_index=0):
    batch = trainer.make_batch(micro_index)
    out = trainer.compute_loss(batch)
    return float(out.loss), float(out.implicit_acc)


def test_dpo_learns_a_fixed_batch_and_trains_every_parameter(sd_folder, pairs_file, tmp_path):
    trainer = make_trainer(
        sd_folder,
        pairs_file,
        tmp_path / "out",
        "max_steps=12",
        "max_train_samples=2",
        "lr=3e-3",
        "random_crop=false",
        "hflip=false",
        "beta=500",
    )
    before_params = trainable(trainer)
    losses_before = [eval_loss(trainer, i) for i in range(4)]
    trainer.train()
    losses_after = [eval_loss(trainer, i) for i in range(4)]
    mean = lambda xs, k: sum(x[k] for x in xs) / len(xs)  # noqa: E731
    assert mean(losses_after, 0) < mean(losses_before, 0) - 1e-3
    assert mean(losses_after, 1) >= mean(losses_before, 1)
    after = trainable(trainer)
    unchanged = [k for k in before_params if torch.equal(before_params[k], after[k])]
    assert not unchanged and all("lora" in k for k in after)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "out" / "log.jsonl").is_file()


def test_lora_output_loads_into_diffusers_and_changes_images(sd_folder, pairs_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    make_trainer(sd_folder, pairs_file, tmp_path / "lora", "lr=5e-2").train()
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        g = torch.Generator().manual_seed(0)
        return pipe("a bright image", num_inference_steps=2, height=32, width=32, generator=g, output_type="np").images

    before = sample()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert abs(sample() - before).max() > 1e-4


@pytest.mark.parametrize(
    "targets", ["[to_k,to_q,to_v,to_out.0]", "[to_k,to_q,to_v,to_out.0,conv1,time_emb_proj,proj_in]"]
)
def test_loaded_lora_equals_the_trained_unet(targets, sd_folder, pairs_file, tmp_path):
    """Every targeted module's LoRA survives save -> ``load_lora_weights`` (diffusers' attention-only renaming
    once dropped the attention LoRA of a file that also held conv/linear LoRA)."""
    from diffusers import UNet2DConditionModel

    trainer = make_trainer(sd_folder, pairs_file, tmp_path / "lora", "lr=5e-2", f"lora_targets={targets}")
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.unet).eval()
    loaded = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet").eval()
    loaded.load_lora_adapter(str(tmp_path / "lora"), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
    base = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet").eval()
    x, t, h = torch.randn(2, 4, 4, 4), torch.tensor([500, 20]), torch.randn(2, 77, 32)
    with torch.no_grad():
        want, got, untouched = (m(x, t, h).sample for m in (trained, loaded, base))
    assert (want - untouched).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_full_finetune_with_copy_reference_saves_pipeline(sd_folder, pairs_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    trainer = make_trainer(sd_folder, pairs_file, tmp_path / "full", "lora_rank=0", "lr=1e-4")
    assert trainer.ref_unet is not None and trainer.config.reference_mode == "copy"
    before = trainable(trainer)
    trainer.train()
    after = trainable(trainer)
    assert len(after) == sum(1 for _ in trainer.policy.unet.parameters())
    assert all(not torch.equal(before[k], after[k]) for k in before)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "full")
    saved = dict(pipe.unet.named_parameters())
    assert all(torch.equal(saved[k], after[k]) for k in after)


def test_interrupted_and_resumed_run_equals_uninterrupted(sd_folder, pairs_file, tmp_path, monkeypatch):
    common = ["max_steps=4", "checkpoint_every=2", "ema_decay=0.9", "lr_scheduler=linear", "prompt_dropout=0.3"]
    common += ["deterministic=true"] if torch.cuda.is_available() else []  # GPU kernels are not bit-exact otherwise

    def build(out, *extra):
        return make_trainer(sd_folder, pairs_file, out, *common, *extra)

    full, resumed = interrupt_then_resume(build, tmp_path, monkeypatch, steps=4)
    expected = trainable(full)
    got = trainable(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    ema_a = [p.clone() for p in full.ema.shadow_params]
    assert all(torch.equal(a, b) for a, b in zip(ema_a, resumed.ema.shadow_params))


@pytest.mark.kernels
def test_two_processes_equal_one_with_the_same_global_batch(sd_folder, pairs_file, tmp_path):
    """The global gradient and the SGD update of 2 processes equal 1's to the measured rounding
    (tests/trainers/distributed.py), and a deliberately wrong split (gradients not all-reduced) fails them."""
    from tests.trainers import distributed

    args = [f"model={sd_folder}", f"data={pairs_file}", "resolution=32", "tracker=none", "progress=false"]
    args += ["max_steps=2", "lr=1e-3", "optimizer=sgd", "lora_rank=4", "random_crop=false", "log_every=1"]
    runs = distributed.train_one_and_two(args, tmp_path)
    init = distributed.initial_lora(make_trainer(sd_folder, pairs_file, tmp_path / "init"))
    distributed.assert_two_processes_equal_one(runs, init)
    assert len((tmp_path / "two" / "log.jsonl").read_text().splitlines()) == 2  # one process logs

    bug = [str(REPO / "tests" / "trainers" / "unsynchronised_train.py")]
    wrong = distributed.train(args, tmp_path / "wrong", 2, entry=bug)
    with pytest.raises(AssertionError):
        distributed.assert_two_processes_equal_one({"one": runs["one"], "two": wrong}, init)
    assert distributed.update_error(runs["one"]["weights"], wrong["weights"], init) > 100 * distributed.UPDATE_RTOL


def test_sdxl_dpo_trains(sdxl_folder, pairs_file, tmp_path):
    trainer = make_trainer(sdxl_folder, pairs_file, tmp_path / "xl")
    assert trainer.policy.is_sdxl
    batch = trainer.make_batch(0)
    assert batch["time_ids"].shape == (2, 6) and batch["embeds"].pooled.shape == (2, 32)
    before = trainable(trainer)
    trainer.train()
    after = trainable(trainer)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "xl" / "pytorch_lora_weights.safetensors").is_file()


def test_bad_rows_are_skipped_and_counted(sd_folder, tmp_path):
    data = write_pairs(tmp_path / "data", count=4, bad_rows=True)
    trainer = make_trainer(sd_folder, data, tmp_path / "out", "max_steps=1")
    summary = trainer.train()
    assert summary["pairs"] == 4 and summary["skipped_rows"] == 2


def test_nan_guard_skips_the_step(sd_folder, pairs_file, tmp_path, monkeypatch):
    trainer = make_trainer(sd_folder, pairs_file, tmp_path / "nan", "max_steps=1")
    before = trainable(trainer)
    original = trainer.compute_loss

    def poisoned(batch):
        out = original(batch)
        return type(out)(loss=out.loss * float("nan"), metrics=out.metrics)

    monkeypatch.setattr(trainer, "compute_loss", poisoned)
    summary = trainer.train()
    assert summary["skipped_steps"] == 1
    after = trainable(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_smpo_needs_scores_and_uses_them(sd_folder, tmp_path):
    import json

    from mmalign.errors import ConfigError

    data = write_pairs(tmp_path / "d", count=4)
    with pytest.raises(ConfigError, match="smpo needs reward scores"):
        make_trainer(sd_folder, data, tmp_path / "o", "trainer=smpo")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for i, row in enumerate(rows):  # the third pair is mis-ordered by its scores: SmPO swaps it
        row["score_chosen"], row["score_rejected"] = (0.2, 0.25) if i == 2 else (0.25, 0.15)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = make_trainer(sd_folder, data, tmp_path / "o2", "trainer=smpo")
    assert str(trainer.pairs[2].chosen).endswith("l2.png")
    expected = torch.sigmoid(torch.tensor((0.25 - 0.15) / (0.28201571106910706 - 0.11543526500463486)))
    torch.testing.assert_close(trainer.preferences[0], expected.float())
    trainer.train()


def test_recipe_precedence_and_trainer_choice(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# mmalign train r.yaml\ntrainer: smpo\nbeta: 1234\nlr: 2e-6\nmax_steps: 7\n")
    cls, config = resolve_trainer_config(str(recipe), ["lr=3e-6"])
    assert cls.__name__ == "SmPOTrainer" and config.beta == 1234 and config.lr == 3e-6 and config.max_steps == 7
    assert config.batch_size == 1  # default
    cls, config = resolve_trainer_config(str(recipe), ["trainer=dpo"])
    assert cls.__name__ == "DiffusionDPOTrainer" and config.beta == 1234


def test_packaged_recipes_load():
    from mmalign.config import find_recipe, list_recipes, recipe_command

    names = list_recipes()
    assert {"train/sd15-dpo", "train/sdxl-dpo", "train/sd15-smpo", "train/sd15-adaptive-dpo"} <= set(names)
    for name in names:
        if name.startswith("train/"):
            assert recipe_command(find_recipe(name)).startswith("mmalign train")
            resolve_trainer_config(name, ["data=x.jsonl"])


def test_smpo_with_renoise_trains(sd_folder, tmp_path):
    import json

    data = write_pairs(tmp_path / "d", count=2)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for row in rows:
        row["score_chosen"], row["score_rejected"] = 0.26, 0.12
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = make_trainer(sd_folder, data, tmp_path / "o", "trainer=smpo", "renoise_steps=2")
    before = trainable(trainer)
    trainer.train()
    after = trainable(trainer)
    assert sum(not torch.equal(before[k], after[k]) for k in before) == len(before)


def test_tensorboard_logs_and_sample_grid(sd_folder, pairs_file, tmp_path):
    trainer = make_trainer(
        sd_folder,
        pairs_file,
        tmp_path / "tb",
        "tracker=tensorboard",
        "max_steps=1",
        "validation_prompts=[a bright image, light]",
        "sample_steps=2",
        "guidance=2.0",
    )
    trainer.train()
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))
    grids = list((tmp_path / "tb" / "samples").glob("*.png"))
    from PIL import Image

    assert len(grids) == 1 and Image.open(grids[0]).size == (64, 32)


def test_precomputed_reference_equals_frozen_copy(sd_folder, pairs_file, tmp_path):
    """Full fine-tuning without a second model in memory gives exactly the weights of the frozen-copy run."""
    common = ["lora_rank=0", "lr=1e-4", "max_steps=3", "grad_accum=2"]
    copy = make_trainer(sd_folder, pairs_file, tmp_path / "copy", *common, "reference=copy")
    copy.train()
    pre = make_trainer(sd_folder, pairs_file, tmp_path / "pre", *common, "reference=precomputed")
    assert pre.ref_unet is None
    pre.train()
    assert len(pre._reference_table) == 3 * 2
    a, b = trainable(copy), trainable(pre)
    assert all(torch.equal(a[k], b[k]) for k in a)
    from mmalign.errors import MMAlignError

    with pytest.raises(MMAlignError, match="no recorded reference output for 99:pair"):
        pre.reference_mse("pair", {"micro_index": 99}, torch.zeros(1), None, None, None, None)


def test_policy_targets_follow_prediction_type(tmp_path):
    """epsilon -> the noise; v_prediction -> scheduler.get_velocity = sqrt(ab)·eps − sqrt(1 − ab)·x0."""
    from mmalign.models.policy import DiffusionPolicy
    from tests import tiny

    policy = DiffusionPolicy.from_pretrained(str(tiny.make_sd_pipeline(tmp_path / "v", prediction_type="v_prediction")))
    assert policy.prediction_type == "v_prediction"
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    noisy, target = policy.noisy_and_target(x0, noise, t)
    ab = policy.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    torch.testing.assert_close(target, ab.sqrt() * noise - (1 - ab).sqrt() * x0)


def test_timestep_range_confines_the_drawn_timesteps(sd_folder, pairs_file, tmp_path):
    trainer = make_trainer(sd_folder, pairs_file, tmp_path / "out", "batch_size=8", "timestep_range=[0.5,0.75]")
    steps = trainer.policy.noise_scheduler.config.num_train_timesteps
    drawn = torch.cat([trainer.draw_noise(trainer.make_batch(i))[0] for i in range(4)])
    assert drawn.min() >= steps // 2 and drawn.max() < steps * 3 // 4
    assert len(drawn.unique()) > 8  # still random within the range
    for bad in ("[0.5]", "[0.8,0.2]", "[0.0,1.5]"):
        with pytest.raises(ValueError, match="timestep_range"):
            make_trainer(sd_folder, pairs_file, tmp_path / "bad", f"timestep_range={bad}")
