"""Tolerances for one quantity computed along two kernel paths: a batch vs one item at a time, one process vs
two, or this CPU's kernels vs another's. BLAS (MKL, oneDNN) and ATen pick their kernels by the CPU (AVX2,
AVX-512, AMX) and by the shapes (the batch size), and these round differently; nothing guarantees bit-equality
across them, so tests that compare across them use these constants, never ``==``.

Measured (torch 2.14.1; a tiny PickScore CLIP, 8 images each scored alone and in batches of 2 to 8; fp32): the
largest relative difference of a score was 1.2e-6 with AVX-512 kernels (Intel Xeon with avx512_bf16/fp16, no
AMX), 5.5e-7 with AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
ONEDNN_MAX_CPU_ISA=AVX2`` on the same machine) and 5.5e-7 without SIMD (``ATEN_CPU_CAPABILITY=default``).
``KERNEL_RTOL`` leaves a margin of 8 over the worst; a real error (a wrong frame, a wrong preprocessing step, a
wrong aggregation) moves a score by far more.
"""

KERNEL_RTOL = 1e-5
#: for quantities near zero (cosines), where a relative bound means nothing
KERNEL_ATOL = 1e-6


def kernel_approx(expected):
    """``pytest.approx`` with the kernel tolerances."""
    import pytest

    return pytest.approx(expected, rel=KERNEL_RTOL, abs=KERNEL_ATOL)
