"""Reference side of benchmarks/parity_mps.py: runs in the reference's own environment (transformers 4.27.3,
as Kwai-Kolors/MPS's requirements.txt pins) with the fetched repository on ``sys.path``.

Writes a tiny CLIP folder (transformers 4.27 ``CLIPModel`` with random weights, projection 1024 so that the
reference's hard-coded ``Cross_model(dim=1024, layer_num=4, heads=16)`` fits; a ``CLIPImageProcessor`` at
64 px; the CLIP BPE tokenizer files from WORKDIR/tokenizer), builds the reference ``trainer.models.clip_model.
CLIPModel`` on it (its own constructor), randomises the fusion network's LayerNorm gains, projects the
common direction of random text features out of ``text_projection`` (so that the condition masks select),
pickles the whole module with ``torch.save(model)`` as the release does (``MPS_overall_checkpoint.pth``),
loads it back with
``torch.load`` and scores every image with ``eval_overall_mps_on_hpdv2.infer_one_sample`` (one image at a time,
threshold 0.3) for each condition. Two precisions:

* ``fp16``: the module in float16 on CPU, the function as published (it casts the image and mask to half);
* ``fp32``: the module in float32; ``infer_one_sample`` casts the image to half, which a float32 model on
  transformers 4.27 cannot take (no dtype cast in its vision embeddings), so ``Tensor.half`` is made the
  identity for the duration of the call. Nothing else is touched.

    /work/ref-mps/bin/python benchmarks/_mps_reference_side.py MPS_REPO WORKDIR ITEMS.json CONDITIONS.json OUT.json
"""

import json
import sys
import types
from pathlib import Path

import torch


def main(repo: str, workdir: str, items_json: str, conditions_json: str, out_json: str) -> None:
    sys.path.insert(0, repo)
    for name in ("cv2", "fire"):  # imported at the top of the eval script, unused by infer_one_sample
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                stub = types.ModuleType(name)
                stub.Fire = lambda *a, **k: None
                sys.modules[name] = stub
    import eval_overall_mps_on_hpdv2 as reference
    import transformers
    from trainer.models.clip_model import CLIPModel
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor
    from transformers import CLIPModel as HFCLIPModel

    work = Path(workdir)
    folder = work / "clip"
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=49408,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
            hidden_act="gelu",
        ),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=16,
            image_size=64,
            hidden_act="gelu",
        ),
        projection_dim=1024,
        logit_scale_init_value=4.6052,
    )
    HFCLIPModel(config).save_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    tokenizer.save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(str(folder))

    model = CLIPModel(str(folder))  # the reference constructor: XCLIPModel.from_pretrained + Cross_model(1024, 4, 16)
    generator = torch.Generator().manual_seed(1)
    conditions = json.loads(Path(conditions_json).read_text())
    with torch.no_grad():
        # A random text tower gives all tokens nearly one feature direction, so the 0.3 mask would keep every
        # token; projecting that direction out of text_projection (a weight edit) makes the masks select.
        ids = tokenizer(
            [item["prompt"] for item in json.loads(Path(items_json).read_text())] + list(conditions.values()),
            padding="max_length",
            max_length=77,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        hidden = model.model.text_model(input_ids=ids)[0].flatten(0, 1)
        weight = model.model.text_projection.weight
        direction = torch.nn.functional.normalize(
            torch.nn.functional.normalize(hidden @ weight.T, dim=-1).mean(0), dim=0
        )
        weight.sub_(torch.outer(direction, direction @ weight))
        for name, parameter in model.cross_model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    checkpoint = work / "MPS_overall_checkpoint.pth"
    torch.save(model, checkpoint)  # the published format: a pickled whole module

    items = json.loads(Path(items_json).read_text())
    image_processor = CLIPImageProcessor.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    out = {"transformers": transformers.__version__, "torch": torch.__version__}
    real_half = torch.Tensor.half
    for precision in ("fp32", "fp16"):
        model = torch.load(checkpoint, weights_only=False).eval()  # as the eval script (its default then)
        if precision == "fp16":
            model = model.half()
        else:
            torch.Tensor.half = lambda self, *args, **kwargs: self
        try:
            scores = {}
            for key, condition in conditions.items():
                scores[key] = [
                    float(
                        reference.infer_one_sample(
                            item["path"], item["prompt"], model, image_processor, tokenizer, "cpu", condition=condition
                        )[0]
                    )
                    for item in items
                ]
        finally:
            torch.Tensor.half = real_half
        out[precision] = scores
    Path(out_json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:6])
