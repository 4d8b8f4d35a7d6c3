"""Wan 2.2 A14B's two experts against diffusers' WanPipeline on a tiny two-expert pipeline (two Wan DiTs of other
random weights, ``boundary_ratio`` 0.7, so the 4-step Euler schedule at shift 3 runs t = 1000, 857 on the
high-noise expert and 667, 429 on the low-noise one): loading, the Euler chain with a second guidance scale,
per-row routing, Flow-DPO training both experts or one, Flow-GRPO with guidance_2, and the LoRA it saves loaded
into WanPipeline's two transformers."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.errors import ConfigError, WeightsError
from mmalign.models.flow_rollout import sample_flow_trajectories
from mmalign.models.generator import load_generator
from mmalign.models.wan import WanExperts, WanGenerator
from tests import tiny

PROMPTS = ["a red apple", "a blue sky video"]
BOUNDARY = 0.7

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def a14b_folder(tmp_path_factory):
    return tiny.make_wan_pipeline(tmp_path_factory.mktemp("a14b") / "pipe", seed=0, euler=True, boundary_ratio=BOUNDARY)


@pytest.fixture(scope="module")
def a14b(a14b_folder):
    return load_generator(str(a14b_folder))


def test_loads_as_a_two_expert_generator(a14b, tmp_path):
    assert isinstance(a14b, WanGenerator) and a14b.two_experts and a14b.boundary_timestep == 700.0
    experts = a14b.trainable
    assert isinstance(experts, WanExperts) and experts.high is a14b.transformer and experts.low is a14b.transformer_2
    assert experts.trained == ("high", "low") and a14b.trained_experts == "both" and a14b.guidance_2 is None
    assert not torch.equal(experts.high.proj_out.weight, experts.low.proj_out.weight)
    for broken in ({"boundary_ratio": 0.875}, {"transformer_2": ["diffusers", "WanTransformer3DModel"]}):
        folder = tmp_path / str(len(broken))
        folder.mkdir(exist_ok=True)
        index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"], **broken}
        (folder / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(WeightsError, match="need both transformer_2 and boundary_ratio"):
            load_generator(str(folder))  # refused before any weight loads


def test_rows_go_to_the_expert_of_their_timestep(a14b):
    """One batch at t = 900, 700 (the boundary: high, as the pipeline's ``t >= boundary``), 699 and 100 equals each
    expert called alone on its rows; guidance switches per row to guidance_2 below the boundary."""
    conditions = a14b.encode_conditions(PROMPTS * 2)
    x = torch.randn((4, *a14b.latent_shape(32, 32)), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 700.0, 699.0, 100.0])
    with torch.no_grad():
        mixed = a14b.predict(a14b.trainable, x, t, conditions)
        high = a14b.predict(a14b.transformer, x[:2], t[:2], conditions.select([0, 1]))
        low = a14b.predict(a14b.transformer_2, x[2:], t[2:], conditions.select([2, 3]))
    torch.testing.assert_close(mixed, torch.cat([high, low]), rtol=1e-6, atol=1e-6)
    a14b.guidance_2 = 2.0
    try:
        v_u, v_c = torch.zeros_like(x), torch.ones_like(x)
        scales = a14b.combine_guidance(v_u, v_c, 5.0, t).flatten(1)[:, 0].tolist()
        assert scales == [5.0, 5.0, 2.0, 2.0] and float(a14b.combine_guidance(v_u, v_c, 5.0, 800.0).max()) == 5.0
    finally:
        a14b.guidance_2 = None


def test_a_one_sided_batch_keeps_a_graph_and_sync_experts_calls_both(a14b):
    """Gradients on: rows all on the frozen expert's side still give a (zero-gradient) graph; ``sync_experts``
    calls the idle expert too (on one row, times 0), so every process runs both experts and the output is unchanged."""
    experts = a14b.trainable
    conditions = a14b.encode_conditions(PROMPTS)
    x = torch.randn((2, *a14b.latent_shape(32, 32)), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900.0, 800.0])
    experts.requires_grad_(False).low.proj_out.weight.requires_grad_(True)  # one "trained" parameter, on low
    calls = []
    hook = experts.low.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        out = a14b.predict(experts, x, t, conditions)
        assert out.requires_grad and not calls
        out.sum().backward()
        assert torch.count_nonzero(experts.low.proj_out.weight.grad) == 0
        experts.sync_experts = True
        synced = a14b.predict(experts, x, t, conditions)
        assert calls == [1]
        torch.testing.assert_close(synced, out, rtol=0, atol=0)
    finally:
        hook.remove()
        experts.sync_experts = False
        experts.requires_grad_(True)
        experts.low.proj_out.weight.grad = None


def test_flow_grpo_guides_the_low_noise_stage_at_guidance_2(a14b_folder, tmp_path):
    from tests.trainers.conftest import make_flow

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue sky\n")
    trainer = make_flow(
        "flow-grpo", a14b_folder, prompts, tmp_path / "out", "guidance=2.0", "guidance_2=3.0", "sample_steps=4"
    )  # trains the SDE steps at t = 1000, 857 (high) and 667 (low)
    assert trainer.policy.guidance_2 == 3.0
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    trainer.train()
    assert not [k for k, v in trainer._trainable_state().items() if torch.equal(before[k], v)]


@pytest.mark.parametrize("guidance_2", [None, 2.0])
def test_euler_chain_equals_the_pipeline_with_both_guidance_scales(a14b, a14b_folder, guidance_2):
    from diffusers import WanPipeline

    steps, guidance = 4, 5.0
    a14b.guidance_2 = guidance_2
    try:
        conditions, uncond = a14b.encode_conditions(PROMPTS), a14b.unconditional(2)
        trajectory = sample_flow_trajectories(
            a14b, a14b.trainable, conditions, uncond, torch.Generator().manual_seed(7), steps, guidance,
            latent_shape=a14b.latent_shape(32, 32), sde_window=(0, 0),
        )  # fmt: skip
    finally:
        a14b.guidance_2 = None
    pipe = WanPipeline.from_pretrained(str(a14b_folder))
    pipe.set_progress_bar_config(disable=True)
    seen = []
    latents = pipe(
        prompt=PROMPTS, height=32, width=32, num_frames=5, num_inference_steps=steps, guidance_scale=guidance,
        guidance_scale_2=guidance_2, max_sequence_length=16, latents=trajectory.latents[:, 0].clone(),
        output_type="latent", callback_on_step_end=lambda p, i, t, kw: seen.append(float(t)) or {},
    ).frames  # fmt: skip
    assert seen == trajectory.timesteps.tolist() and sum(t >= 700 for t in seen) == 2  # two high, two low
    delta = (trajectory.final - latents).abs().max().item()
    print(f"Wan 2.2 A14B Euler chain (CFG 5, guidance_2 {guidance_2}) vs WanPipeline: max |delta| = {delta:.3g}")
    torch.testing.assert_close(trajectory.final, latents, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def trained(a14b_folder, tmp_path_factory):
    from tests.trainers.conftest import write_pairs
    from tests.trainers.test_training import make_trainer

    pairs = write_pairs(tmp_path_factory.mktemp("pairs"))
    out = tmp_path_factory.mktemp("dpo")
    trainer = make_trainer(
        a14b_folder, pairs, out, "trainer=dpo", "lr=1e-2", "beta=100", "max_steps=3",
        "validation_prompts=[a red apple]", "sample_steps=4", "guidance=2.0", "guidance_2=3.0",
    )  # fmt: skip
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    trainer.train()
    return trainer, before, out


def test_flow_dpo_trains_the_lora_of_both_experts(trained):
    trainer, before, out = trained
    names = trainer.trainable_names
    assert {n.split(".")[0] for n in names} == {"high", "low"} and all("lora_" in n for n in names)
    unchanged = sorted(k for k, v in trainer._trainable_state().items() if torch.equal(before[k], v))
    assert not unchanged, unchanged
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "transformer_2" / "pytorch_lora_weights.safetensors").is_file()
    from PIL import Image

    assert Image.open(trainer.sample_grid()).size == (5 * 32, 32)  # WanPipeline over both trained experts


def test_the_saved_lora_loads_into_both_transformers_of_wan_pipeline(trained, a14b_folder):
    from diffusers import WanPipeline

    trainer, _, out = trained
    pipe = WanPipeline.from_pretrained(str(a14b_folder))
    pipe.load_lora_weights(str(out))
    pipe.load_lora_weights(str(out / "transformer_2"), load_into_transformer_2=True)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    policy = trainer.policy
    conditions = trainer._embeds(["a red apple"] * 2)
    x = torch.randn((2, *policy.latent_shape(32, 32)), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        ours = policy.predict(model, x, t, conditions)
        high = policy.predict(pipe.transformer, x[:1], t[:1], conditions.select([0]))
        low = policy.predict(pipe.transformer_2, x[1:], t[1:], conditions.select([1]))
        pipe.transformer_2.disable_lora()
        base_low = policy.predict(pipe.transformer_2, x[1:], t[1:], conditions.select([1]))
    torch.testing.assert_close(torch.cat([high, low]), ours, rtol=1e-5, atol=1e-5)
    assert (low - base_low).abs().max() > 1e-4


def test_experts_high_trains_the_high_noise_expert_only(a14b_folder, trained, tmp_path):
    from tests.trainers.test_training import make_trainer

    pairs = trained[0].config.data
    trainer = make_trainer(a14b_folder, pairs, tmp_path, "trainer=dpo", "lr=1e-2", "beta=100", "experts=high")
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.trained == ("high",) and not getattr(model.low, "peft_config", None)
    assert trainer.trainable_names and all(n.startswith("high.") and "lora_" in n for n in trainer.trainable_names)
    low = {k: v.clone() for k, v in model.low.state_dict().items()}
    trainer.train()
    assert all(torch.equal(v, low[k]) for k, v in model.low.state_dict().items())
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file() and not (tmp_path / "transformer_2").exists()


def test_expert_settings_are_refused_on_one_transformer(tmp_path):
    from mmalign.models.generator import configure_output

    single = load_generator(str(tiny.make_wan_pipeline(tmp_path / "wan21", euler=True)))
    for setting in ({"experts": "high"}, {"guidance_2": 3.0}):
        with pytest.raises(ConfigError, match="not a two-expert"):
            configure_output(single, **setting)


def test_save_pipeline_writes_both_experts_and_the_boundary(a14b, tmp_path):
    a14b.guidance_2 = 3.0
    try:
        a14b.save_pipeline(tmp_path / "saved")
    finally:
        a14b.guidance_2 = None
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["boundary_ratio"] == BOUNDARY and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    again = load_generator(str(tmp_path / "saved"))
    assert again.two_experts and again.guidance_2 == 3.0
    assert torch.equal(again.transformer_2.proj_out.weight, a14b.transformer_2.proj_out.weight)


@pytest.mark.slow  # two torchrun processes per engine, about 40 s each on a loaded machine: MMALIGN_SLOW=1
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_processes_equal_one_with_rows_routed_apart(a14b_folder, trained, engine, tmp_path):
    """One pair per process: the processes' rows go to different experts. ``sync_experts`` makes both call both
    experts in the same order (FSDP2 would otherwise gather different experts' shards of the same shapes and mix
    them), and the run equals one process (plain SGD, as tests/trainers/distributed.py compares runs)."""
    from safetensors.torch import load_file

    from tests.trainers import distributed

    args = [
        f"model={a14b_folder}", f"data={trained[0].config.data}", "trainer=dpo", "resolution=32", "max_steps=2",
        "lora_rank=4", "tracker=none", "progress=false", "log_every=1", "lr=1e-2", "beta=100", "optimizer=sgd",
        f"distributed={engine}",
    ]  # fmt: skip
    runs = {"one": distributed.train(args, tmp_path / "one", 0), "two": distributed.train(args, tmp_path / "two", 2)}
    torch.testing.assert_close(torch.tensor(runs["two"]["grad_norm"]), torch.tensor(runs["one"]["grad_norm"]))
    for name in ("pytorch_lora_weights.safetensors", "transformer_2/pytorch_lora_weights.safetensors"):
        one, two = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-6
