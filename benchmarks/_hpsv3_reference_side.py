"""Reference side of benchmarks/parity_hpsv3.py: runs in the hpsv3 package's own environment (transformers 4.45).

Builds a tiny Qwen2-VL folder (tests/qwen2vl_tiny.py), creates the reference ``Qwen2VLRewardModelBT`` through
``hpsv3.train.create_model_and_processor`` (which adds ``<|Reward|>`` and resizes the embedding), randomises its
weights, saves ``HPSv3.safetensors`` in the published layout, then scores the images with the package's own
``HPSv3RewardInferencer`` on CPU in float32. Writes ``{"mu": [...], "sigma": [...]}``.

    /work/venv-hpsv3/bin/python benchmarks/_hpsv3_reference_side.py WORKDIR IMAGES.json OUT.json
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import qwen2vl_tiny  # noqa: E402


def main(workdir: str, images_json: str, out_json: str) -> None:
    import safetensors.torch
    from hpsv3.inference import HPSv3RewardInferencer
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    work = Path(workdir)
    folder = qwen2vl_tiny.write_backbone_folder(work / "backbone")
    torch.manual_seed(0)
    base = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(str(folder)))
    base.save_pretrained(str(folder), safe_serialization=True)
    yaml = work / "HPSv3_tiny.yaml"
    yaml.write_text(
        "rm_head_type: ranknet\nlora_enable: False\nmodel_name_or_path: " + str(folder) + "\n"
        "use_special_tokens: true\nreward_token: special\noutput_dim: 2\nbf16: False\ntorch_dtype: float32\n"
        "disable_flash_attn2: True\noutput_dir: " + str(work / "out") + "\n"
    )
    # a reward model of the reference class, with every weight randomised, saved as the release does
    from hpsv3.train import create_model_and_processor
    from hpsv3.utils.parser import DataConfig, ModelConfig, PEFTLoraConfig, TrainingConfig, parse_args_with_yaml

    (_, training_args, model_config, lora_config), _ = parse_args_with_yaml(
        (DataConfig, TrainingConfig, ModelConfig, PEFTLoraConfig), str(yaml), is_train=False
    )
    model, _, _ = create_model_and_processor(model_config, lora_config, training_args)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = 1.0
            parameter.copy_(
                torch.randn(parameter.shape, generator=generator) * scale / max(1, parameter.shape[-1]) ** 0.5
                + (1.0 if "norm" in name and parameter.ndim == 1 else 0.0)
            )
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    checkpoint = work / "HPSv3.safetensors"
    safetensors.torch.save_file(state, str(checkpoint))

    inferencer = HPSv3RewardInferencer(config_path=str(yaml), checkpoint_path=str(checkpoint), device="cpu")
    items = json.loads(Path(images_json).read_text())
    mus, sigmas, single = [], [], []
    with torch.no_grad():
        rewards = inferencer.reward([i["path"] for i in items], [i["prompt"] for i in items])
        for item in items:
            single.append(inferencer.reward([item["path"]], [item["prompt"]])[0][0].item())
    mus = rewards[:, 0].tolist()
    sigmas = rewards[:, 1].tolist()
    info = {"vocab": int(model.config.vocab_size), "reward_token_id": inferencer.model.special_token_ids}
    Path(out_json).write_text(json.dumps({"mu": mus, "sigma": sigmas, "mu_one_by_one": single, "info": info}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
