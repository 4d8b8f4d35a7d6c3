"""FSDP2 (full and hybrid shard) and multi-node launches, on CPU processes with gloo: each equals one process on the
same global batch (to the rounding measured in tests/trainers/distributed.py), sharded checkpoints resume exactly on
the same process count and to rounding on another, and the final weights are the LoRA (or pipeline) one process
writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mmalign.trainers.distributed import accelerate_config
from tests.trainers import distributed
from tests.trainers.test_training import make_trainer

pytestmark = pytest.mark.kernels


def base_args(sd_folder, pairs_file, *extra: str) -> list[str]:
    args = [f"model={sd_folder}", f"data={pairs_file}", "resolution=32", "tracker=none", "progress=false"]
    return args + ["lr=1e-3", "optimizer=sgd", "lora_rank=4", "log_every=1", *extra]


@pytest.fixture(scope="module")
def one_process(sd_folder, pairs_file, tmp_path_factory):
    """The reference: one process, 4 SGD steps with EMA, a global batch of 2."""
    out = tmp_path_factory.mktemp("one") / "run"
    args = base_args(sd_folder, pairs_file, "max_steps=4", "ema_decay=0.5", "checkpoint_every=2")
    return {**distributed.train(args, out, 0), "out": out}


@pytest.fixture(scope="module")
def init_lora(sd_folder, pairs_file, tmp_path_factory):
    return distributed.initial_lora(make_trainer(sd_folder, pairs_file, tmp_path_factory.mktemp("init")))


def test_fsdp2_two_processes_equal_one_and_resume_sharded(sd_folder, pairs_file, one_process, init_lora, tmp_path):
    args = base_args(sd_folder, pairs_file, "max_steps=4", "ema_decay=0.5", "distributed=fsdp2", "checkpoint_every=2")
    fsdp = distributed.train(args, tmp_path / "fsdp", 2)
    distributed.assert_two_processes_equal_one({"one": one_process, "two": fsdp}, init_lora)
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in (checkpoint / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "trainable.safetensors").exists()  # nothing gathered into one file on the way

    # resumed from the step-2 shards on the same process count: bit-equal to the uninterrupted run
    resumed = distributed.train([*args, f"resume={checkpoint}"], tmp_path / "resumed", 2)
    assert [r["step"] for r in resumed["logs"]] == [3, 4]
    assert resumed["grad_norm"] == fsdp["grad_norm"][2:]
    assert all(torch.equal(resumed["weights"][k], fsdp["weights"][k]) for k in fsdp["weights"])
    # and by one process (DCP gathers the shards): equal to the rounding of a different process count
    single = [a for a in args if a != "distributed=fsdp2"] + [f"resume={checkpoint}"]
    alone = distributed.train(single, tmp_path / "alone", 1)
    assert distributed.update_error(alone["weights"], fsdp["weights"], init_lora) <= distributed.UPDATE_RTOL


def test_two_nodes_over_loopback_equal_one_process(sd_folder, pairs_file, one_process, init_lora, tmp_path):
    """Two torchrun launchers (``--nnodes 2``, one process each), as on two machines."""
    args = base_args(sd_folder, pairs_file, "max_steps=4", "ema_decay=0.5")
    nodes = distributed.train(args, tmp_path / "ddp", 2, nodes=2)
    distributed.assert_two_processes_equal_one({"one": one_process, "two": nodes}, init_lora)
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["distributed"] == "auto"


def test_fsdp2_hybrid_shard_over_two_nodes_of_two(sd_folder, pairs_file, init_lora, tmp_path):
    """Hybrid shard over a [2 nodes, 2 processes] mesh: parameters sharded within a node, replicated across; the
    global batch of 4 gives one process's update."""
    args = base_args(sd_folder, pairs_file, "max_steps=2")
    one = distributed.train(args, tmp_path / "one", 0, global_batch=4)
    hybrid = distributed.train([*args, "distributed=fsdp2-hybrid"], tmp_path / "hsdp", 4, global_batch=4, nodes=2)
    distributed.assert_two_processes_equal_one({"one": one, "two": hybrid}, init_lora)


def test_fsdp2_full_finetuning_saves_the_pipeline_one_process_saves(sd_folder, pairs_file, tmp_path):
    """lora_rank=0 under FSDP2: the shards are gathered into a diffusers pipeline folder equal (to rounding) to
    the one a single process writes."""
    from diffusers import UNet2DConditionModel

    args = base_args(sd_folder, pairs_file, "max_steps=2", "lora_rank=0", "reference=copy", "lr=1e-2")
    outs = {}
    distributed.train_here(args, tmp_path / "one")
    distributed.run_train([*args, "distributed=fsdp2"], tmp_path / "fsdp", 2)
    for name in ("one", "fsdp"):
        outs[name] = UNet2DConditionModel.from_pretrained(tmp_path / name / "unet").state_dict()
    start = UNet2DConditionModel.from_pretrained(sd_folder / "unet").state_dict()
    assert outs["one"].keys() == outs["fsdp"].keys() == start.keys()
    update = max(float((outs["one"][k] - start[k]).abs().max()) for k in start)
    error = max(float((outs["one"][k] - outs["fsdp"][k]).abs().max()) for k in start)
    assert update > 0 and error <= distributed.UPDATE_RTOL * update, (error, update)


def test_an_fsdp_run_refuses_a_one_process_checkpoint(sd_folder, pairs_file, one_process, tmp_path, monkeypatch):
    from mmalign.errors import MMAlignError
    from mmalign.trainers import loop

    checkpoint = one_process["out"] / "checkpoints" / "step-0000002"
    trainer = make_trainer(sd_folder, pairs_file, tmp_path / "f", f"resume={checkpoint}")
    monkeypatch.setattr(loop, "is_fsdp", lambda accelerator: True)
    with pytest.raises(MMAlignError, match="no sharded/ folder.*resume it without FSDP"):
        trainer.train()
    assert load_file(str(checkpoint / "trainable.safetensors"))


def test_flow_grpo_under_fsdp2_equals_one_process(sd3_folder, tmp_path):
    """``accelerate launch --config_file $(mmalign accelerate-config fsdp2)``, an online trainer on a flow-matching
    transformer: every process samples its share of each round through the
    sharded network (its forwards gather the shards), rewards are gathered for the group advantages, gradients
    reduce-scattered; the same update as one process."""
    from tests.trainers.test_flow_trainers import make_flow

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue sky\na green field\n")
    args = ["trainer=flow-grpo", f"model={sd3_folder}", f"data={prompts}", "resolution=32", "tracker=none"]
    args += ["progress=false", "max_steps=2", "lr=1e-2", "optimizer=sgd", "sample_steps=3", "log_every=1"]
    args += ["reward=jpeg-compressibility", "group_size=2", "lora_rank=4", "lora_alpha=8", "beta=0.04"]
    args += ["sample_batches=1", "checkpoint_every=1"]
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a yellow bird\n")  # the best held-out evaluation's weights are the ones saved
    args += [f"eval_prompts={held_out}", "eval_every=1", "eval_keep_best=true"]
    one = distributed.train(args, tmp_path / "one", 0)
    config = accelerate_config("fsdp2")  # the shipped file, through accelerate's own launcher (distributed=auto)
    distributed.run_train(args, tmp_path / "fsdp", 2, accelerate_config=config)
    assert (tmp_path / "fsdp" / "checkpoints" / "step-0000001" / "sharded").is_dir()  # FSDP did shard
    fsdp = distributed.read_run(tmp_path / "fsdp")
    assert len(fsdp["grad_norm"]) == 2
    init = distributed.initial_lora(make_flow("flow-grpo", sd3_folder, prompts, tmp_path / "init"))
    distributed.assert_two_processes_equal_one({"one": one, "two": fsdp}, init)
    evals = [[row["eval/reward"] for row in run["logs"] if "eval/reward" in row] for run in (one, fsdp)]
    assert len(evals[0]) == len(evals[1]) == 2  # held out after each step, on every process under FSDP
    assert all(abs(a - b) <= 1e-3 * abs(a) for a, b in zip(*evals)), evals


def test_fsdp_wraps_each_familys_blocks(sd_folder, sd3_folder):
    """The blocks FSDP shards one by one: diffusers' ``_no_split_modules`` where the model declares them (present in
    the model), else the family's ``block_class``."""
    from mmalign.models.generator import load_generator
    from mmalign.trainers.distributed import wrap_blocks

    unet = load_generator(sd_folder)
    assert set(wrap_blocks(unet.trainable, unet)) <= {
        "BasicTransformerBlock",
        "ResnetBlock2D",
        "CrossAttnUpBlock2D",
        "UpBlock2D",
    }
    assert {"BasicTransformerBlock", "ResnetBlock2D"} <= set(wrap_blocks(unet.trainable, unet))
    sd3 = load_generator(sd3_folder)
    assert wrap_blocks(sd3.trainable, sd3) == ["JointTransformerBlock"]

    class Block(torch.nn.Linear):
        pass

    network = torch.nn.Sequential(Block(2, 2), Block(2, 2))  # no _no_split_modules: the family's block class
    assert wrap_blocks(network, type("Family", (), {"block_class": "Block"})) == ["Block"]
