"""Reference side of benchmarks/parity_reward3d.py: runs in DreamReward's own environment (transformers 4.28.1,
timm 0.6.13, fairscale 0.4.13; /work/ref-r3d) with DreamReward's ``Reward3D`` package on ``sys.path``.

Builds the reference classes (``Reward3D_`` = Reward3D_Scorer: BLIP ViT-L/16 + BERT-base + MLP(768) + Scorer;
``Reward3D`` = CrossViewFusion) at their published widths but with fewer blocks (``VISION_DEPTH`` ViT-L blocks via
BLIP's own ``VisionTransformer``, put in place of ``create_vit``; ``TEXT_LAYERS`` BERT layers in a copy of
DreamReward's ``med_config.json``: two full-size .pt files did not fit the disk here), randomises every weight
(seeded; the two share the BLIP and MLP weights), saves each state dict with ``torch.save`` as
``Reward3D_Scorer.pt`` / ``Reward3D_CrossViewFusion.pt`` (the published format), and scores the view sets with
the reference forward on CPU in float32, in eval mode: views preprocessed by the model's own ``preprocess``
(``_transform(224)`` on Pillow images), prompts tokenised by ``blip.tokenizer`` with ``padding="max_length",
truncation=True, max_length=100`` as ``DreamReward_guidance1.py``. The tensor path applies the guidance's tensor
``_transform()`` (Resize(224, bicubic), CenterCrop(224), Normalize), re-written here because the guidance module
imports threestudio and MVDream.

    cd WORKDIR && /work/ref-r3d/bin/python benchmarks/_reward3d_reference_side.py SRC WORKDIR SETS.json OUT.json \
        VISION_DEPTH TEXT_LAYERS

``SRC`` holds DreamReward's ``Reward3D/`` folder; ``WORKDIR`` a ``bert-base-uncased/`` tokenizer folder (BLIP's
``init_tokenizer`` loads ``BertTokenizer.from_pretrained('bert-base-uncased')``, found there offline).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def randomise(model: torch.nn.Module, seed: int, only: str = "") -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith(only):
                continue
            if parameter.ndim == 1 and ("norm" in name.lower() or "LayerNorm" in name):
                value = (
                    1.0 + 0.1 * torch.randn(parameter.shape, generator=generator)
                    if name.endswith("weight")
                    else (0.1 * torch.randn(parameter.shape, generator=generator))
                )
            else:
                fan_in = parameter.shape[-1] if parameter.ndim > 1 else parameter.shape[0]
                value = torch.randn(parameter.shape, generator=generator) / fan_in**0.5
            parameter.copy_(value)


def main(src: str, workdir: str, sets_json: str, out_json: str, vision_depth: str, text_layers: str) -> None:
    sys.path.insert(0, src)
    import Reward3D as r3d
    import Reward3D.models.BLIP.blip_pretrain as blip_pretrain
    from Reward3D.models.BLIP.vit import VisionTransformer
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize

    torch.set_num_threads(2)
    work = Path(workdir)
    med = json.loads((Path(src) / "scripts/med_config.json").read_text())
    med["num_hidden_layers"] = int(text_layers)
    med_config = str(work / "med_config.json")
    Path(med_config).write_text(json.dumps(med))

    def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        """BLIP's create_vit('large') with fewer blocks: the same class, width 1024, 16 heads, patch 16."""
        assert vit == "large"
        encoder = VisionTransformer(
            img_size=image_size, patch_size=16, embed_dim=1024, depth=int(vision_depth), num_heads=16,
            use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer, drop_path_rate=0.1,
        )  # fmt: skip
        return encoder, 1024

    blip_pretrain.create_vit = create_vit  # BLIP_Pretrain looks it up in its module at construction
    sets = json.loads(Path(sets_json).read_text())
    tensor_transform = Compose(
        [
            Resize(224, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(224),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    out = {}
    shared = None
    for label, cls, fusion_prefix, file in (
        ("scorer", r3d.Reward3D_, "Scorer.", "Reward3D_Scorer.pt"),
        ("crossviewfusion", r3d.Reward3D, "cross_view_adapter.", "Reward3D_CrossViewFusion.pt"),
    ):
        torch.manual_seed(0)
        model = cls(med_config=med_config, device="cpu")
        if shared is None:
            randomise(model, seed=1)
            shared = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("blip.", "mlp."))}
        else:
            model.load_state_dict(shared, strict=False)
            randomise(model, seed=2, only=fusion_prefix)
        model.eval()
        torch.save(model.state_dict(), str(work / file))
        tokenizer = model.blip.tokenizer

        def tokens(prompts, tokenizer=tokenizer):
            g = tokenizer(prompts, padding="max_length", truncation=True, max_length=100, return_tensors="pt")
            return g.input_ids, g.attention_mask

        files, tensors, singles = [], [], []
        with torch.no_grad():
            pixels, prompts, raw = [], [], []
            for item in sets:
                images = [Image.open(path) for path in item["views"]]
                pixels += [model.preprocess(image) for image in images]
                prompts += item["view_prompts"]
                raw += [torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
                        for im in images]  # fmt: skip
            ids, mask = tokens(prompts)
            files = model(torch.stack(pixels), ids, mask).squeeze(-1).tolist()
            for index in range(len(sets)):
                part = slice(4 * index, 4 * index + 4)
                singles.append(model(torch.stack(pixels[part]), ids[part], mask[part]).squeeze(-1).item())
            tensor_pixels = torch.stack([tensor_transform(view) for view in raw])  # the guidance's tensor path
            tensors = model(tensor_pixels, ids, mask).squeeze(-1).tolist()
        out[label] = {"files": files, "one_by_one": singles, "tensor": tensors, "tokens": ids[:, :12].tolist()}
        del model
    import transformers

    out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    Path(out_json).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:7])
