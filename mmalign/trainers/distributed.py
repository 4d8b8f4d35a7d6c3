"""Which distributed engine trains: DDP, FSDP2 (full or hybrid shard) or DeepSpeed ZeRO, all through accelerate.

``distributed=`` of :class:`~mmalign.trainers.loop.TrainConfig` picks it:

- ``auto`` (default): what the launcher says. ``accelerate launch --config_file X`` sets accelerate's environment
  (``ACCELERATE_USE_FSDP``, ``ACCELERATE_USE_DEEPSPEED``, ``FSDP_*``) and accelerate builds the plugin from it;
  under plain ``torchrun`` (or one process) it is DDP.
- ``ddp``: DDP (one replica of the trainable network per process; gradients all-reduced).
- ``fsdp2`` / ``fsdp2-hybrid``: FSDP2 (``torch.distributed.fsdp.fully_shard``) with the ``fsdp_config`` of the
  shipped ``mmalign/configs/accelerate/<name>.yaml``; hybrid shards within a machine and replicates across machines
  over a ``[NNODES, LOCAL_WORLD_SIZE]`` mesh. Both also run on CPUs with gloo (accelerate itself only enables FSDP
  on accelerators; :func:`build_accelerator` switches it on for CPU processes, which is how the suite tests it).
- ``deepspeed-zero2`` / ``deepspeed-zero3``: DeepSpeed through accelerate (CUDA and ``pip install deepspeed``).

The blocks FSDP wraps come from the generator family: diffusers' ``_no_split_modules`` of the trainable network
(FLUX: both its double- and single-stream blocks), else the family's ``block_class``. The same YAML files are the
``--config_file`` of ``accelerate launch`` (``mmalign accelerate-config NAME`` prints a path).

Checkpoints under FSDP are sharded (:mod:`torch.distributed.checkpoint`: each process writes its shards, and a run
resumes on another process count); the final weights are gathered into the same LoRA or full safetensors that one
process writes (:func:`full_state_dict`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import ConfigError

Distributed = Literal["auto", "ddp", "fsdp2", "fsdp2-hybrid", "deepspeed-zero2", "deepspeed-zero3"]
ENGINES: tuple[str, ...] = ("auto", "ddp", "fsdp2", "fsdp2-hybrid", "deepspeed-zero2", "deepspeed-zero3")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def accelerate_config(name: str) -> Path:
    """The shipped accelerate config file of engine ``name`` (``fsdp2``, ``fsdp2-hybrid``, ``deepspeed-zero2``,
    ``deepspeed-zero3``)."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no accelerate config {name!r}; shipped: {', '.join(names)}")
    return path


def launcher_engine() -> str:
    """The engine ``accelerate launch`` asked for through the environment: ``fsdp``, ``deepspeed`` or ``ddp``."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp"


def _fsdp_plugin(name: str) -> Any:
    """accelerate's ``FullyShardedDataParallelPlugin`` from the ``fsdp_config`` of the shipped YAML ``name``."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from ..config import load_yaml

    options = dict(load_yaml(accelerate_config(name)).get("fsdp_config") or {})
    keys = {
        "fsdp_version": "fsdp_version",
        "fsdp_auto_wrap_policy": "auto_wrap_policy",
        "fsdp_reshard_after_forward": "reshard_after_forward",
        "fsdp_state_dict_type": "state_dict_type",
        "fsdp_cpu_ram_efficient_loading": "cpu_ram_efficient_loading",
        "fsdp_offload_params": "cpu_offload",
        "fsdp_activation_checkpointing": "activation_checkpointing",
        "fsdp_transformer_layer_cls_to_wrap": "transformer_cls_names_to_wrap",
    }
    unknown = sorted(set(options) - set(keys))
    if unknown:
        raise ConfigError(f"{accelerate_config(name)}: unknown fsdp_config keys {unknown}")
    return FullyShardedDataParallelPlugin(**{keys[k]: v for k, v in options.items()})


def _deepspeed_plugin(name: str) -> Any:
    from accelerate.utils import DeepSpeedPlugin, is_deepspeed_available

    from ..config import load_yaml

    if not is_deepspeed_available():
        raise ConfigError(f"distributed={name} needs DeepSpeed: pip install deepspeed (and a CUDA device)")
    options = dict(load_yaml(accelerate_config(name)).get("deepspeed_config") or {})
    options.pop("zero3_save_16bit_model", None)
    return DeepSpeedPlugin(**options)


def build_accelerator(engine: str, mixed_precision: str, log_with: str | None, project_dir: str) -> Any:
    """The run's ``Accelerator`` for ``engine`` (one of :data:`ENGINES`). On a machine without CUDA the processes
    form a gloo group (accelerate's ``cpu=True``), and FSDP2 is switched on there by hand: accelerate only enables
    it for accelerator devices, while ``fully_shard`` itself runs on CPU tensors with gloo."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    if engine not in ENGINES:
        raise ConfigError(f"distributed={engine!r}: choose one of {', '.join(ENGINES)}")
    launched = launcher_engine()
    wanted = {"fsdp2": "fsdp", "fsdp2-hybrid": "fsdp", "deepspeed-zero2": "deepspeed", "deepspeed-zero3": "deepspeed"}
    if engine in wanted and launched != "ddp" and launched != wanted[engine]:
        raise ConfigError(f"distributed={engine}, but accelerate launch was configured for {launched}")
    if engine == "ddp" and launched != "ddp":
        raise ConfigError(f"distributed=ddp, but accelerate launch was configured for {launched}")
    cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = {}
    plugin = None
    if engine.startswith("fsdp2"):
        plugin = _fsdp_plugin(engine)
        if not cpu:
            kwargs["fsdp_plugin"] = plugin
    elif engine.startswith("deepspeed") or (engine == "auto" and launched == "deepspeed"):
        if cpu:
            raise ConfigError(f"distributed={engine} (DeepSpeed) needs CUDA; on CPUs use distributed=fsdp2 or ddp")
        if engine != "auto":
            kwargs["deepspeed_plugin"] = _deepspeed_plugin(engine)
    elif engine == "auto" and launched == "fsdp" and cpu:
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set
    accelerator = Accelerator(
        mixed_precision=mixed_precision, log_with=log_with, project_dir=project_dir, cpu=cpu, **kwargs
    )
    launched_plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type == DistributedType.FSDP and launched_plugin and launched_plugin.fsdp_version != 2:
        raise ConfigError("mmalign trains with FSDP2 (fsdp_version: 2 in the accelerate config)")
    if plugin is not None and cpu and accelerator.num_processes > 1:
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        from accelerate.state import PartialState

        # both shared states: AcceleratorState() re-reads PartialState's fields whenever it is constructed again
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    if engine == "fsdp2-hybrid" and accelerator.num_processes > 1:
        _hybrid_mesh(accelerator)
    return accelerator


def _hybrid_mesh(accelerator: Any) -> None:
    """A ``[dp_replicate, dp_shard]`` mesh of ``[NNODES, LOCAL_WORLD_SIZE]`` (torchrun's environment; accelerate
    launch sets the same variables) for hybrid sharding."""
    from accelerate.parallelism_config import ParallelismConfig

    world = accelerator.num_processes
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % local:
        raise ConfigError(f"distributed=fsdp2-hybrid: {world} processes are not whole machines of {local}")
    config = ParallelismConfig(dp_replicate_size=world // local, dp_shard_size=local)
    accelerator.state.parallelism_config = config
    accelerator.state.device_mesh = config.get_device_mesh(accelerator.device.type)


def is_fsdp(accelerator: Any) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


def deepspeed_stage(accelerator: Any) -> int:
    """The ZeRO stage when DeepSpeed trains, else 0."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


@contextmanager
def loading_context(accelerator: Any) -> Iterator[None]:
    """Where the generator is loaded: under ZeRO-3 without transformers' DeepSpeed config, which would make every
    ``from_pretrained`` partition its weights (the frozen text encoders then fail: seen on an H200 with
    transformers 5.24, a CLIP text model whose position table had 0 rows); only the trained network, prepared
    later, is partitioned."""
    if deepspeed_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def configure_deepspeed(accelerator: Any, batch_size: int, grad_accum: int, max_grad_norm: float) -> None:
    """DeepSpeed's batch keys from the training config (mmalign makes its own batches, so accelerate cannot infer
    ``train_micro_batch_size_per_gpu`` from a dataloader): the micro-batch, the accumulation (DeepSpeed steps its
    optimizer on the boundary and scales each backward by it) and the clipping norm."""
    if not deepspeed_stage(accelerator):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = grad_accum
    config["train_batch_size"] = batch_size * grad_accum * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm


def wrap_blocks(model: torch.nn.Module, policy: Any) -> list[str]:
    """Class names of the blocks FSDP wraps one by one: ``model``'s ``_no_split_modules`` (diffusers declares
    them), else the generator family's ``block_class``."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    if not names and getattr(policy, "block_class", None):
        names = [policy.block_class]
    present = {type(m).__name__ for m in model.modules()}
    return [name for name in names if name in present]


def set_wrap_blocks(accelerator: Any, model: torch.nn.Module, policy: Any) -> None:
    """Fill in the blocks to wrap when the accelerate config leaves them empty."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or not is_fsdp(accelerator) or plugin.transformer_cls_names_to_wrap:
        return
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if plugin.auto_wrap_policy is transformer_auto_wrap_policy or plugin.auto_wrap_policy is None:
        plugin.transformer_cls_names_to_wrap = wrap_blocks(model, policy)
        plugin.auto_wrap_policy = transformer_auto_wrap_policy


def shard_frozen(accelerator: Any, model: torch.nn.Module, policy: Any) -> torch.nn.Module:
    """A frozen network (the full fine-tuning's reference copy) sharded like the trained one, so that FSDP does not
    keep a whole replica of it on every process; its forwards gather the shards (every process calls them)."""
    from torch.distributed.fsdp import fully_shard

    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    blocks = set(wrap_blocks(model, policy))
    for module in reversed(list(model.modules())):  # inner blocks first (the UNet's up-blocks hold ResNet blocks)
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state_dict(
    accelerator: Any, model: torch.nn.Module, names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """``model``'s parameters (only ``names`` when given) as whole CPU tensors. Under FSDP each is gathered from
    its shards, a collective that every process must call; elsewhere the local tensors."""
    wanted = None if names is None else set(names)
    out = {}
    for name, param in model.named_parameters():
        if wanted is not None and name not in wanted:
            continue
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):  # a DTensor shard (FSDP2)
            tensor = tensor.full_tensor()
        out[name] = tensor.cpu().contiguous()
    return out


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: Any, extra: dict[str, Any] | None = None) -> None:
    """The trainable parameters and optimizer state of an FSDP2 model, each process writing its own shards into
    ``folder`` (torch.distributed.checkpoint); ``extra`` (e.g. EMA shadow tensors) goes along."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    dcp.save({"model": model_state, "optim": optim_state, **(extra or {})}, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: Any, extra: dict[str, Any] | None = None) -> None:
    """Load what :func:`save_sharded` wrote, on any process count (DCP re-shards on load); ``extra`` tensors
    are filled in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state, **(extra or {})}
    dcp.load(state, checkpoint_id=str(folder))  # fails naming any trainable key the checkpoint lacks
    # not strict: the frozen weights are not in a checkpoint by design (the keys loaded are exactly the trainable ones)
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
