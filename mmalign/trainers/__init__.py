"""Preference and reward trainers for diffusion models.

``mmalign.trainers.losses`` holds every objective as a pure function of tensors (Diffusion-DPO, SmPO,
Adaptive-DPO, Diffusion-KTO, D3PO, DDPO/PPO, ReFL, DRaFT, AlignProp), each citing its reference and stating
its defaults. The shared training loop and the per-family modules (how a batch becomes a loss) live beside it.
Nothing heavy is imported here: import the submodule you need.
"""
