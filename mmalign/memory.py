"""Device memory and precision facts that loaders and the training loop decide on: free bytes on a device, whether
a CPU computes bf16 natively, and a check that a model of N parameters fits before it is built (a clear error
with the figures instead of an out-of-memory kill halfway through loading)."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import WeightsError

GIB = 2**30
#: CPU flags of native bf16 arithmetic (AVX-512 BF16, AMX): there bf16 matmuls run about 2x fp32 here
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def free_device_memory(device: torch.device | str) -> int | None:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` of ``/proc/meminfo`` on
    the CPU; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device | str) -> bool:
    """True on CUDA devices with bf16 support and on CPUs with native bf16 (:data:`NATIVE_BF16_FLAGS`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return bool(cpu_flags() & set(NATIVE_BF16_FLAGS))


def auto_dtype(dtype: str | torch.dtype, device: torch.device | str) -> str | torch.dtype:
    """``"auto"``: ``"bf16"`` where bf16 is native (:func:`native_bf16`), else ``"fp32"``; anything else as it is."""
    if dtype != "auto":
        return dtype
    return "bf16" if native_bf16(device) else "fp32"


def ensure_fits(what: str, parameters: int, dtype: torch.dtype, device: torch.device | str, extra: int = 0) -> int:
    """Raise :class:`WeightsError` when ``parameters`` in ``dtype`` (plus ``extra`` bytes held while loading, e.g.
    a checkpoint read whole before it is copied in) exceed the free memory of ``device``; returns the bytes needed.
    Unknown free memory passes."""
    need = parameters * torch.empty((), dtype=dtype).element_size() + extra
    free = free_device_memory(device)
    if free is not None and need > free:
        hint = "" if dtype != torch.float32 else "; dtype=bf16 halves the weights"
        raise WeightsError(
            f"{what}: {parameters / 1e9:.2f}B parameters in {str(dtype).removeprefix('torch.')} need "
            f"{need / GIB:.1f} GiB to load on {device}, and {free / GIB:.1f} GiB are free{hint}"
        )
    return need


def meta_parameter_count(build) -> int:
    """The parameters of the module ``build()`` makes, counted on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


# -- placing a model across devices (accelerate's big-model inference) -------------------------------------
#: the named strategies of accelerate / transformers ``device_map``
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_max_memory(spec: str | dict | None) -> dict[int | str, int | str] | None:
    """``max_memory`` for a device map: a dict as accelerate takes it, or the command-line form ``"0=20GiB,1=20GiB,
    cpu=60GiB"`` (GPU indices, ``cpu``, ``mps``)."""
    if spec is None or isinstance(spec, dict):
        return spec
    memory: dict[int | str, int | str] = {}
    for part in str(spec).split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"max_memory {spec!r}: expected DEVICE=SIZE pairs such as '0=20GiB,cpu=60GiB'")
        key, value = key.strip(), value.strip()
        memory[int(key) if key.isdigit() else key] = int(value) if value.isdigit() else value  # bytes, or "20GiB"
    return memory


def execution_device(device_map: dict[str, int | str | torch.device]) -> torch.device:
    """Where a placed model's inputs go: the first accelerator of its device map (an int is a CUDA index), else the
    CPU (a map of only ``cpu`` and ``disk`` runs on the CPU)."""
    for where in device_map.values():
        if isinstance(where, int):
            return torch.device("cuda", where)
        if str(where) not in ("cpu", "disk", "meta"):
            return torch.device(where)
    return torch.device("cpu")


def placed_device(device: torch.device | str, device_map: object) -> torch.device | str:
    """The device whose precision ``dtype="auto"`` follows: a GPU when a device map is given and CUDA is there,
    else ``device``."""
    return "cuda" if device_map is not None and torch.cuda.is_available() else device


def infer_device_map(
    module: torch.nn.Module,
    device_map: str | dict[str, int | str],
    max_memory: str | dict | None = None,
    dtype: torch.dtype | None = None,
    no_split: list[str] | None = None,
) -> dict[str, int | str]:
    """A device map for ``module`` (real or on the meta device): ``device_map`` a strategy of :data:`DEVICE_MAPS`
    (with ``max_memory`` per device, accelerate's ``infer_auto_device_map``) or an explicit ``{"submodule":
    device}`` map, returned as it is. Blocks named in ``no_split`` (default: the model's ``_no_split_modules``) stay
    whole. The map is not merged into parents (``clean_result=False``): every module that runs keeps its own hook,
    so a reward may call a submodule (the language model, the LM head) directly. Raises :class:`WeightsError` for
    an unknown strategy."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, dict):
        return dict(device_map)
    if device_map not in DEVICE_MAPS:
        raise WeightsError(f"device_map {device_map!r}: expected one of {', '.join(DEVICE_MAPS)} or a dict")
    memory = parse_max_memory(max_memory)
    no_split = list(no_split if no_split is not None else getattr(module, "_no_split_modules", None) or [])
    if device_map != "sequential":
        memory = get_balanced_memory(
            module, memory, no_split_module_classes=no_split, dtype=dtype, low_zero=device_map == "balanced_low_0"
        )
    return infer_auto_device_map(
        module, max_memory=memory, no_split_module_classes=no_split, dtype=dtype, clean_result=False
    )


def check_offload(device_map: dict[str, int | str], offload_folder: str | Path | None) -> None:
    """A map that sends modules to disk needs a folder to write them to."""
    if "disk" in {str(v) for v in device_map.values()} and offload_folder is None:
        raise WeightsError(
            "the device map sends modules to disk (the GPUs and the CPU are too small for the model): give an "
            "offload folder (offload_folder= / --offload-folder) or more max_memory"
        )


def place_module(
    module: torch.nn.Module,
    device_map: str | dict[str, int | str],
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
    dtype: torch.dtype | None = None,
    no_split: list[str] | None = None,
) -> dict[str, int | str]:
    """Spread a loaded ``module`` over the GPUs, the CPU and disk as :func:`infer_device_map` maps it
    (accelerate's ``dispatch_model``; modules mapped to ``"disk"`` are written to ``offload_folder`` and read back
    per forward). Returns the map."""
    from accelerate import dispatch_model

    placement = infer_device_map(module, device_map, max_memory, dtype, no_split)
    check_offload(placement, offload_folder)
    folder = None if offload_folder is None else str(offload_folder)
    dispatch_model(module, device_map=placement, offload_dir=folder, force_hooks=True)
    return placement
