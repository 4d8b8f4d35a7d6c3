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
