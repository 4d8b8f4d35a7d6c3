"""Named components, imported on first use.

A registry maps a name (``hpsv2.1``) to a ``"module:attribute"`` string and default keyword arguments, so
``import mmalign`` stays fast and a broken optional backend is reported only when it is asked for
(the open_clip pattern of named configs crossed with pretrained tags).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import MMAlignError


class UnknownNameError(MMAlignError, KeyError):
    """A name that is not in a registry; the message lists close matches."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the sentence readable
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    """One registered component: where its factory lives and the defaults it is built with."""

    name: str
    target: str
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def load(self) -> Callable[..., Any]:
        module_name, _, attribute = self.target.partition(":")
        module = importlib.import_module(module_name)
        factory = module
        for part in attribute.split("."):
            factory = getattr(factory, part)
        return factory


class Registry:
    """A table of named components of one kind (rewards, trainers, modalities, datasets)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, target: str, description: str = "", /, **defaults: Any) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = Entry(name, target, dict(defaults), description)

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._entries))}."
            ) from None

    def build(self, name: str, **kwargs: Any) -> Any:
        entry = self.entry(name)
        return entry.load()(**{**entry.defaults, **kwargs})

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[name] for name in self.names())


REWARDS = Registry("reward")

REWARDS.register(
    "hpsv2",
    "mmalign.rewards.hps:HPSReward.from_pretrained",
    "HPSv2.0: open_clip ViT-H-14, letterboxed 224 px, cosine (tgxs002/HPSv2)",
    version="v2.0",
)
REWARDS.register(
    "hpsv2.1",
    "mmalign.rewards.hps:HPSReward.from_pretrained",
    "HPSv2.1: open_clip ViT-H-14, letterboxed 224 px, cosine (tgxs002/HPSv2)",
    version="v2.1",
)
REWARDS.register(
    "pickscore",
    "mmalign.rewards.clip:PickScoreReward.from_pretrained",
    "PickScore v1: CLIP-H/14, logit_scale.exp() * cosine (yuvalkirstain/PickScore)",
)
REWARDS.register(
    "imagereward",
    "mmalign.rewards.imagereward:ImageReward.from_pretrained",
    "ImageReward v1.0: BLIP ViT-L/16 + cross-attention BERT + affine head (THUDM/ImageReward)",
)
REWARDS.register(
    "clipscore",
    "mmalign.rewards.clip:CLIPScoreReward.from_pretrained",
    "CLIPScore (Hessel et al.): 2.5 * max(cos, 0), ViT-B/32, 'A photo depicts ' prefix",
)
REWARDS.register(
    "clipscore-tm",
    "mmalign.rewards.clip:TorchmetricsCLIPScoreReward.from_pretrained",
    "CLIPScore as torchmetrics: 100 * cos per sample, ViT-L/14",
)
REWARDS.register(
    "aesthetic",
    "mmalign.rewards.aesthetic:AestheticReward.from_pretrained",
    "LAION aesthetic predictor v2: CLIP ViT-L/14 embedding + linear head, about 1-10",
)
REWARDS.register(
    "jpeg-compressibility",
    "mmalign.rewards.jpeg:JpegReward",
    "DDPO: minus the JPEG size in kB at quality 95",
    sign=-1.0,
)
REWARDS.register(
    "jpeg-incompressibility",
    "mmalign.rewards.jpeg:JpegReward",
    "DDPO: the JPEG size in kB at quality 95",
    sign=1.0,
)

REWARDS.register(
    "hpsv3",
    "mmalign.rewards.hpsv3:HPSv3Reward.from_pretrained",
    "HPSv3: Qwen2-VL-7B + uncertainty head at <|Reward|>, score = mu (MizzenAI/HPSv3)",
)
REWARDS.register(
    "mps",
    "mmalign.rewards.mps:MPSReward.from_pretrained",
    "MPS (Kwai-Kolors/MPS): CLIP-H + condition-masked fusion, logit_scale.exp() * cosine, overall condition",
    dimension="overall",
)
for _dim in ("aesthetics", "detail", "semantic"):
    REWARDS.register(
        f"mps-{_dim}",
        "mmalign.rewards.mps:MPSReward.from_pretrained",
        f"MPS, overall checkpoint under the {_dim} word group of the overall condition (no per-dimension release)",
        dimension=_dim,
    )
REWARDS.register(
    "videoreward",
    "mmalign.rewards.videoreward:VideoAlignReward.from_pretrained",
    "VideoReward (VideoAlign): Qwen2-VL-2B, VQ + MQ + TA normalised, 2 fps (KlingTeam/VideoReward)",
    dimension="Overall",
)
for _dim in ("VQ", "MQ", "TA"):
    REWARDS.register(
        f"videoreward-{_dim.lower()}",
        "mmalign.rewards.videoreward:VideoAlignReward.from_pretrained",
        f"VideoReward (VideoAlign): the normalised {_dim} dimension alone",
        dimension=_dim,
    )

REWARDS.register(
    "reward3d",
    "mmalign.rewards.reward3d:Reward3D.from_pretrained",
    "Reward3D (DreamReward) Scorer: ImageReward BLIP features of 4 views, 128-d intermediates concatenated -> "
    "linear scorer (yejunliang23/Reward3D Reward3D_Scorer.pt); multiview",
    variant="scorer",
)
REWARDS.register(
    "reward3d-cvf",
    "mmalign.rewards.reward3d:Reward3D.from_pretrained",
    "Reward3D (DreamReward) CrossViewFusion: 4 views' BLIP features, cross-view attention with a sigmoid gate, "
    "mean -> ImageReward head (Reward3D_CrossViewFusion.pt); multiview",
    variant="crossviewfusion",
)
REWARDS.register(
    "vqascore",
    "mmalign.rewards.vqascore:VQAScoreReward.from_pretrained",
    'VQAScore (t2v_metrics): P("Yes") of Qwen2.5-VL-7B asked \'Does this figure show "{prompt}"?\', images, [0, 1]',
    modality="image",
)
REWARDS.register(
    "vqascore-video",
    "mmalign.rewards.vqascore:VQAScoreReward.from_pretrained",
    'VQAScore (t2v_metrics) on whole videos: P("Yes") of Qwen2.5-VL-7B, frames at 8 fps, [0, 1]',
    modality="video",
)

TRAINERS = Registry("trainer")

TRAINERS.register("dpo", "mmalign.trainers.dpo:DiffusionDPOTrainer", "Diffusion-DPO (sigmoid, hinge, ipo)")
TRAINERS.register("sft", "mmalign.trainers.dpo:SFTTrainer", "supervised fine-tuning on the winners")
TRAINERS.register("smpo", "mmalign.trainers.dpo:SmPOTrainer", "SmPO: DPO with a reward-smoothed preference")
TRAINERS.register("adaptive-dpo", "mmalign.trainers.dpo:AdaptiveDPOTrainer", "Adaptive-DPO: minority-aware DPO")
TRAINERS.register("kto", "mmalign.trainers.dpo:KTOTrainer", "Diffusion-KTO: unpaired desirable/undesirable")
REWARDS.register(
    "clap",
    "mmalign.rewards.clap:ClapReward.from_pretrained",
    "CLAP (LAION HTSAT-unfused): cosine(text, audio), 48 kHz mono, one deterministic 10 s window (centre)",
    windows="center",
)
REWARDS.register(
    "clap-music",
    "mmalign.rewards.clap:ClapReward.from_pretrained",
    "CLAP for music (laion/larger_clap_music): cosine(text, audio), mean over 10 s windows covering the track",
    default_repo="laion/larger_clap_music",
    name="clap-music",
    windows="cover",
)
REWARDS.register(
    "audiobox-aesthetics",
    "mmalign.rewards.audiobox:AudioboxAestheticsReward.from_pretrained",
    "Audiobox Aesthetics (facebook/audiobox-aesthetics): mean of content enjoyment, content usefulness and "
    "production quality, 16 kHz mono, length-weighted mean over 10 s chunks, 1-10 scale; no prompt",
    axis="overall",
)
for _axis, _what in (
    ("PQ", "production quality"),
    ("PC", "production complexity (a description, not a quality)"),
    ("CE", "content enjoyment"),
    ("CU", "content usefulness"),
):
    REWARDS.register(
        f"audiobox-{_axis.lower()}",
        "mmalign.rewards.audiobox:AudioboxAestheticsReward.from_pretrained",
        f"Audiobox Aesthetics {_axis}: {_what} alone, 1-10 scale; no prompt",
        axis=_axis,
    )
TRAINERS.register("ddpo", "mmalign.trainers.online:DDPOTrainer", "DDPO: PPO-clip on the DDIM chain, any reward")
TRAINERS.register("d3po", "mmalign.trainers.online:D3POTrainer", "D3PO: online pairs from the same x_T, per-step DPO")
TRAINERS.register("refl", "mmalign.trainers.online:ReFLTrainer", "ReFL: one-step reward feedback (ImageReward)")
TRAINERS.register("draft", "mmalign.trainers.online:DRaFTTrainer", "DRaFT-K / DRaFT-LV reward backpropagation")
TRAINERS.register("alignprop", "mmalign.trainers.online:AlignPropTrainer", "AlignProp: checkpointed reward backprop")
TRAINERS.register("flow-grpo", "mmalign.trainers.flow:FlowGRPOTrainer", "Flow-GRPO: group-relative PPO on the flow SDE")
TRAINERS.register(
    "flow-grpo-fast",
    "mmalign.trainers.flow:FlowGRPOFastTrainer",
    "Flow-GRPO-Fast: SDE on a random window, ODE elsewhere",
)
TRAINERS.register("dance-grpo", "mmalign.trainers.flow:DanceGRPOTrainer", "DanceGRPO: shared group noise, step subsets")
TRAINERS.register("mix-grpo", "mmalign.trainers.flow:MixGRPOTrainer", "MixGRPO: a sliding SDE window, ODE elsewhere")
TRAINERS.register(
    "diffusionnft", "mmalign.trainers.flow:DiffusionNFTTrainer", "DiffusionNFT: forward-process negative-aware tuning"
)
REWARDS.register(
    "toyworld",
    "mmalign.toyworld.reward:ToyReward.from_pretrained",
    "Toyworld learned reward: tiny CLIP (32 px) cosine trained on judge-ranked pairs (assets/toyworld/reward)",
)
REWARDS.register(
    "toyworld-judge",
    "mmalign.toyworld.reward:JudgeReward.from_pretrained",
    "Toyworld exact judge: mean of the colour, shape, count and position checks, in [0, 1] (not differentiable)",
)
REWARDS.register(
    "toyworld-video",
    "mmalign.toyworld.media_reward:VideoMediaReward.from_pretrained",
    "Toy video world learned reward: tiny CLIP cosine over stacked frames, trained to rank videos as the world's "
    "judge does (assets/toyworld/video_reward)",
)
REWARDS.register(
    "toyworld-audio",
    "mmalign.toyworld.media_reward:AudioMediaReward.from_pretrained",
    "Toy audio world learned reward: tiny CLIP cosine over the spectrogram, trained to rank clips as the world's "
    "judge does (assets/toyworld/audio_reward)",
)
REWARDS.register(
    "toyworld-multiview",
    "mmalign.toyworld.media_reward:MultiViewMediaReward.from_pretrained",
    "Toy multi-view world learned reward: tiny CLIP cosine over stacked views, trained to rank view sets as the "
    "world's judge does (assets/toyworld/multiview_reward)",
)
REWARDS.register(
    "toyworld-video-judge",
    "mmalign.toyworld.reward:VideoJudgeReward.from_pretrained",
    "Toy video world exact judge: mean of the colour, shape, count and direction-of-motion checks, in [0, 1] "
    "(videos; not differentiable)",
)
REWARDS.register(
    "toyworld-multiview-judge",
    "mmalign.toyworld.reward:MultiViewJudgeReward.from_pretrained",
    "Toy multi-view world exact judge: mean of the body colour and shape, the dot seen from each azimuth and the "
    "body's agreement across the 4 views, in [0, 1] (view sets; not differentiable)",
)
REWARDS.register(
    "toyworld-audio-judge",
    "mmalign.toyworld.reward:AudioJudgeReward.from_pretrained",
    "Toy audio world exact judge: mean of the pitch (spectrum), beep count and tempo (envelope) checks, in [0, 1] "
    "(audio; not differentiable)",
)
