"""The shipped toyworld flow-matching pipeline (``assets/toyworld/flow_pipeline``): loads through the trainers'
loader as a T5-less SD3 generator, samples equal plain diffusers, judge adherence is a number; and the pieces of
its training script (reduced tokenizer, prompt encoding with gradients, exact resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmalign.toyworld.sampling import ASSETS, evaluate_flow, load_flow_generator, sample_flow
from mmalign.toyworld.world import Prompt, all_prompts

FLOW = ASSETS / "flow_pipeline"
needs_pipeline = pytest.mark.skipif(not (ASSETS / "pipeline").is_dir(), reason="assets/toyworld not built")
needs_flow = pytest.mark.skipif(not FLOW.is_dir(), reason="assets/toyworld/flow_pipeline not built")
PROMPTS = ["two red circles on the left", "one blue square at the top", "three green triangles on the right"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def generator():
    return load_flow_generator()


@needs_flow
def test_loads_as_a_t5_less_sd3_generator_in_fp32(generator):
    from safetensors import safe_open

    from mmalign.models.sd3 import GENERATOR_CONFIG, SD3Generator

    assert isinstance(generator, SD3Generator) and generator.parametrisation == "flow"
    assert not generator.has_t5 and generator.max_sequence_length == 16
    assert json.loads((FLOW / GENERATOR_CONFIG).read_text()) == {"max_sequence_length": 16}
    modules = [generator.transformer, generator.vae, *generator.text_encoders[:2]]
    assert {p.dtype for m in modules for p in m.parameters()} == {torch.float32}
    assert generator.latent_shape(32, 32) == (8, 8, 8)
    assert generator.vae.config.shift_factor is not None
    weights = sorted(FLOW.rglob("*.safetensors"))
    assert len(weights) == 4 and not list(FLOW.rglob("*.bin"))
    for path in weights:
        with safe_open(str(path), "pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F16"}, path  # noqa: SIM118
    assert sum(p.stat().st_size for p in FLOW.rglob("*") if p.is_file()) <= 8 * 1024 * 1024
    summary = json.loads((FLOW / "training.json").read_text())
    assert summary["recipe"]["max_sequence_length"] == 16 and summary["adherence_heldout"]


@needs_flow
def test_samples_are_fast_deterministic_and_equal_plain_diffusers(generator):
    from diffusers import StableDiffusion3Pipeline

    images = sample_flow(generator, PROMPTS + PROMPTS[:1], [1, 2, 3, 1], steps=4)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], images[3])  # one prompt and seed, one image, whatever the batch
    assert not np.array_equal(images[0], images[1])
    pipe = StableDiffusion3Pipeline.from_pretrained(str(FLOW), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)],
        max_sequence_length=generator.max_sequence_length,
        output_type="np",
    ).images
    reference = np.clip(np.rint(reference * 255), 0, 255).astype(np.uint8)
    assert np.abs(reference.astype(int) - images[:3].astype(int)).max() <= 1


@needs_flow
def test_judge_adherence_of_a_few_samples_is_a_number(generator):
    prompts = [Prompt("red", "circle", 1, "left"), Prompt("yellow", "square", 2, "bottom")]
    for guidance in (1.0, 3.0):
        scores = evaluate_flow(generator, prompts, samples_per_prompt=2, steps=6, guidance=guidance).scores
        assert set(scores) == {"color", "shape", "count", "position", "overall", "exact"}
        assert all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in scores.values()), scores


@needs_pipeline
def test_small_tokenizer_splits_every_prompt_as_clip(tmp_path):
    from transformers import CLIPTokenizer

    from mmalign.toyworld.train_flow_pipeline import write_small_tokenizer

    source = ASSETS / "pipeline" / "tokenizer"
    small = CLIPTokenizer.from_pretrained(str(write_small_tokenizer(tmp_path / "small", source)))
    full = CLIPTokenizer.from_pretrained(str(source))
    assert len(small) < 600 and small.model_max_length == full.model_max_length == 16
    for text in [p.text for p in all_prompts()] + [""]:
        assert small.tokenize(text) == full.tokenize(text), text
    assert small("").input_ids == [small.bos_token_id, small.eos_token_id]
    assert len(small("a purple hexagon").input_ids) > 4  # other words: smaller pieces, not an error


@needs_flow
def test_training_encoding_equals_the_generator(generator):
    from mmalign.toyworld.train_flow_pipeline import encode
    from mmalign.toyworld.train_pipeline import TokenCache

    texts = PROMPTS + [""]
    ids = [TokenCache(t)(texts) for t in generator.tokenizers[:2]]
    width = generator.transformer.config.joint_attention_dim
    with torch.no_grad():
        embeds, pooled = encode(generator.text_encoders[:2], ids, generator.max_sequence_length, width)
    expected = generator.encode_conditions(texts)
    assert torch.equal(embeds, expected["prompt_embeds"])
    assert torch.equal(pooled, expected["pooled_prompt_embeds"])


@needs_pipeline
def test_training_resumes_exactly(tmp_path):
    """Four steps in one go (a checkpoint written at step 2) equal two more steps from that checkpoint."""
    from transformers import CLIPTokenizer

    from mmalign.toyworld.train_flow_pipeline import FlowPipelineRecipe, build_parts, train_flow, write_small_tokenizer
    from mmalign.toyworld.train_pipeline import TokenCache

    source = ASSETS / "pipeline" / "tokenizer"
    tokenizers = [
        CLIPTokenizer.from_pretrained(str(source)),
        CLIPTokenizer.from_pretrained(str(write_small_tokenizer(tmp_path / "t2", source))),
    ]
    recipe = FlowPipelineRecipe(steps=4, batch=4, checkpoint_every=2, width=32, layers=1)
    latents = torch.randn((16, 8, 8, 8), generator=torch.Generator().manual_seed(0))
    prompts = all_prompts()[:16]
    runs = []
    for _ in range(2):  # the second run finds the first one's checkpoint
        parts = build_parts(recipe, tokenizers[1])
        caches = [TokenCache(t) for t in tokenizers]
        train_flow(parts, caches, latents, prompts, recipe, lambda m: None, checkpoint=tmp_path / "state.pt")
        runs.append({**parts["transformer"].state_dict(), **parts["text_encoder_2"].state_dict()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
