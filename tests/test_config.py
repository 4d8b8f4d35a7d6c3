"""Typed recipes: defaults < YAML < command line, coercion to annotated types, errors naming file and key."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mmalign import config as cfg
from mmalign.config import (
    find_recipe,
    list_recipes,
    load_config,
    load_yaml,
    parse_overrides,
    recipe_command,
    save_config,
    to_dict,
)
from mmalign.errors import ConfigError


@dataclass
class Lora:
    rank: int = 4
    alpha: float = 1.0
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_v"])


@dataclass
class Recipe:
    lr: float = 1e-5
    max_steps: int = 10
    model: str = "x"
    lora_rank: int = 4
    use_ema: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    validation_prompts: list[str] = field(default_factory=lambda: ["a cat", "a dog"])
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    resume: str | None = None
    seed: int | None = 0
    output_dir: Path = Path("out")
    loss_weights: dict[str, float] = field(default_factory=lambda: {"mse": 1.0})
    nested: Lora = field(default_factory=lambda: Lora(alpha=2.0))
    trainer: str = "dpo"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class Plain:
    name: str
    steps: int = 1


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error(tmp_path: Path | None, text: str | None, overrides=None, cls=Recipe) -> str:
    path = write(tmp_path, text) if text is not None else None
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------------------------------------
# Precedence
# ----------------------------------------------------------------------------------------------------------


def test_defaults_only():
    assert load_config(Recipe) == Recipe()


def test_precedence_default_yaml_command_line(tmp_path):
    path = write(tmp_path, "lr: 2e-5\nmax_steps: 100\nmodel: sd15\n")
    c = load_config(Recipe, path, ["max_steps=7"])
    assert c.lr == 2e-5  # YAML over default
    assert c.max_steps == 7  # command line over YAML
    assert c.model == "sd15"
    assert c.lora_rank == 4  # default
    assert load_config(Recipe, path).max_steps == 100


def test_nested_precedence_keeps_default_factory_values(tmp_path):
    path = write(tmp_path, "nested:\n  rank: 8\n")
    c = load_config(Recipe, path, ["nested.targets=to_k,to_out.0"])
    assert c.nested == Lora(rank=8, alpha=2.0, targets=["to_k", "to_out.0"])  # alpha from the field's default
    c = load_config(Recipe, path, {"nested": {"alpha": 3}})
    assert c.nested == Lora(rank=8, alpha=3.0)


def test_dict_field_whole_replaces_dotted_sets_entries(tmp_path):
    path = write(tmp_path, "loss_weights:\n  unet.conv: 1\n  text: 0.5\n")
    assert load_config(Recipe, path).loss_weights == {"unet.conv": 1.0, "text": 0.5}
    c = load_config(Recipe, path, ["loss_weights.unet.conv=0.25", "loss_weights.kl=1e-3"])
    assert c.loss_weights == {"unet.conv": 0.25, "text": 0.5, "kl": 1e-3}
    assert load_config(Recipe, None, ["loss_weights.kl=2"]).loss_weights == {"mse": 1.0, "kl": 2.0}
    assert load_config(Recipe, path, ["loss_weights={kl: 2}"]).loss_weights == {"kl": 2.0}


def test_trainer_key_is_a_field_when_declared_else_ignored(tmp_path):
    path = write(tmp_path, "trainer: kto\nname: a\n")
    assert load_config(Plain, path) == Plain(name="a")
    assert load_config(Recipe, write(tmp_path, "trainer: kto\n", "r.yaml")).trainer == "kto"


# ----------------------------------------------------------------------------------------------------------
# Coercion
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "attr", "expected"),
    [
        ("lr=1e-5", "lr", 1e-5),
        ("lr=3", "lr", 3.0),
        ("max_steps=1_000", "max_steps", 1000),
        ("max_steps=1e3", "max_steps", 1000),
        ("use_ema=true", "use_ema", True),
        ("use_ema=1", "use_ema", True),
        ("use_ema=yes", "use_ema", True),
        ("use_ema=False", "use_ema", False),
        ("use_ema=0", "use_ema", False),
        ("use_ema=no", "use_ema", False),
        ("model=123", "model", "123"),
        ("resume=null", "resume", None),
        ("resume=None", "resume", None),
        ("resume=ckpt/step-10", "resume", "ckpt/step-10"),
        ("seed=none", "seed", None),
        ("seed=3", "seed", 3),
        ("mixed_precision=bf16", "mixed_precision", "bf16"),
        ("validation_prompts=a red cube, a blue ball", "validation_prompts", ["a red cube", "a blue ball"]),
        ('validation_prompts=["a cat, sitting", dog]', "validation_prompts", ["a cat, sitting", "dog"]),
        ("validation_prompts=", "validation_prompts", []),
        ("betas=0.5,1e-3", "betas", [0.5, 1e-3]),
        ("output_dir=runs/a", "output_dir", Path("runs/a")),
        ("loss_weights={a: 1, b: 2.5}", "loss_weights", {"a": 1.0, "b": 2.5}),
        ("--max_steps=5", "max_steps", 5),
    ],
)
def test_command_line_coercion(item, attr, expected):
    value = getattr(load_config(Recipe, None, [item]), attr)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(value, list):
        assert [type(v) for v in value] == [type(v) for v in expected]


def test_nested_coercion():
    c = load_config(Recipe, None, ["nested.rank=16", "nested.alpha=0.5"])
    assert c.nested.rank == 16 and c.nested.alpha == 0.5 and isinstance(c.nested, Lora)


def test_yaml_coercion_uses_yaml_1_2_scalars(tmp_path):
    path = write(
        tmp_path,
        "lr: 1e-5\n"  # YAML 1.1 would read a string
        "mixed_precision: no\n"  # YAML 1.1 would read False
        "model: 1.10\n"  # a number written for a string field keeps its text
        "use_ema: yes\n"  # a string, then coerced to bool
        "resume: null\n"
        "seed: ~\n"
        "validation_prompts: [a, b]\n"
        "betas: 0.9, 0.95\n"
        "output_dir: runs/2024-01-01\n",
    )
    c = load_config(Recipe, path)
    assert c.lr == 1e-5 and type(c.lr) is float
    assert c.mixed_precision == "no"
    assert c.model == "1.10"
    assert c.use_ema is True
    assert c.resume is None and c.seed is None
    assert c.validation_prompts == ["a", "b"]
    assert c.betas == [0.9, 0.95]
    assert c.output_dir == Path("runs/2024-01-01")
    assert load_yaml(write(tmp_path, "a: .inf\nb: 0x10\nc: 2024-01-01\n", "s.yaml")) == {
        "a": math.inf,
        "b": 16,
        "c": "2024-01-01",
    }


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(Recipe, write(tmp_path, "# only a comment\n")) == Recipe()


# ----------------------------------------------------------------------------------------------------------
# Errors: every one names the file (or "command line") and the key
# ----------------------------------------------------------------------------------------------------------


def test_unknown_key_in_yaml_suggests(tmp_path):
    msg = error(tmp_path, "lrr: 1\n")
    assert str(tmp_path / "recipe.yaml") in msg and "unknown key 'lrr'" in msg and "did you mean 'lr'" in msg


def test_unknown_key_on_command_line_suggests():
    msg = error(None, None, ["max_step=3"])
    assert msg.startswith("command line:") and "'max_step'" in msg and "did you mean 'max_steps'" in msg


def test_unknown_nested_key(tmp_path):
    msg = error(tmp_path, "nested:\n  rnk: 3\n")
    assert "recipe.yaml" in msg and "'nested.rnk'" in msg and "did you mean 'nested.rank'" in msg
    msg = error(None, None, ["nested.zzz=1"])
    assert "command line" in msg and "nested.zzz" in msg and "known keys: rank, alpha, targets" in msg


def test_wrong_type_names_file_and_key(tmp_path):
    assert error(tmp_path, "lr: abc\n") == f"{tmp_path / 'recipe.yaml'}: lr: 'abc' is not a float"
    assert error(None, None, ["max_steps=ten"]) == "command line: max_steps: 'ten' is not an int"
    assert error(None, None, ["max_steps=1.5"]) == "command line: max_steps: '1.5' is not an int"
    assert "command line: use_ema: 'maybe' is not a bool" in error(None, None, ["use_ema=maybe"])
    assert "nested.rank: 'x' is not an int" in error(tmp_path, "nested:\n  rank: x\n")
    assert "betas[1]: 'b' is not a float" in error(None, None, ["betas=0.1,b"])
    assert "recipe.yaml: max_steps: null is not allowed" in error(tmp_path, "max_steps: null\n")
    assert "recipe.yaml: model: [1, 2] is not a string" in error(tmp_path, "model: [1, 2]\n")
    assert "recipe.yaml: validation_prompts: expected a list, got mapping" in error(
        tmp_path, "validation_prompts: {a: 1}\n"
    )
    assert "recipe.yaml: nested: expected a mapping of Lora fields" in error(tmp_path, "nested: 3\n")


def test_literal_choices(tmp_path):
    msg = error(None, None, ["mixed_precision=fp61"])
    assert msg.startswith("command line: mixed_precision: 'fp61' is not one of 'no', 'fp16', 'bf16'")
    assert "did you mean 'fp16'" in msg
    assert "recipe.yaml: mixed_precision: False is not one of" in error(tmp_path, "mixed_precision: false\n")


def test_yaml_syntax_error_has_line(tmp_path):
    msg = error(tmp_path, "lr: 1e-5\nmodel: [unclosed\nmax_steps: 3\n")
    assert msg.startswith(f"{tmp_path / 'recipe.yaml'}: line ") and "invalid YAML" in msg
    msg = error(tmp_path, "lr: 1\nmax_steps: 2\nlr: 3\n")
    assert "recipe.yaml: line 3" in msg and "duplicate key 'lr' (first at line 1)" in msg


def test_top_level_must_be_a_mapping(tmp_path):
    assert "recipe.yaml: the top level must be a mapping" in error(tmp_path, "- lr: 1\n")
    assert "not a string" in error(tmp_path, "just text\n")


def test_post_init_errors_name_the_source(tmp_path):
    msg = error(tmp_path, "lr: -1\n")
    assert msg == f"{tmp_path / 'recipe.yaml'}: invalid Recipe: lr must be positive, got -1.0"
    assert error(None, None, ["lr=0"]).startswith("command line: invalid Recipe: lr must be positive")


def test_missing_file_and_required_key(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such recipe file"):
        load_config(Recipe, tmp_path / "nope.yaml")
    assert "recipe.yaml: missing required key 'name'" in error(tmp_path, "steps: 2\n", cls=Plain)


def test_whole_and_dotted_conflict():
    assert "command line: nested is set both as a whole" in error(None, None, ["nested=3", "nested.rank=2"])


@pytest.mark.parametrize("item", ["lr", "=3", " =3", "a..b=1"])
def test_parse_overrides_rejects_malformed_items(item):
    with pytest.raises(ConfigError) as info:
        parse_overrides(["lr=1", item])
    assert repr(item) in str(info.value) and "command line" in str(info.value)


def test_parse_overrides():
    assert parse_overrides(["lr=1e-5", "nested.rank=8", "prompt=a=b", "resume=", "lr=2"]) == {
        "lr": "2",
        "nested.rank": "8",
        "prompt": "a=b",
        "resume": "",
    }
    assert issubclass(ConfigError, ValueError)


# ----------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    c = Recipe(
        lr=3e-6,
        model="1e-5",  # a string a YAML reader would take for a number
        mixed_precision="no",  # a string YAML 1.1 would take for a bool
        validation_prompts=["yes", "a cat, sitting", "null"],
        resume=None,
        seed=None,
        output_dir=Path("runs/x"),
        loss_weights={"unet.conv": 0.5},
        nested=Lora(rank=32, alpha=0.0, targets=[]),
        trainer="kto",
    )
    path = save_config(c, tmp_path / "ckpt" / "config.yaml", command="mmalign train run.yaml max_steps=3")
    assert load_config(Recipe, path) == c
    assert recipe_command(path) == "mmalign train run.yaml max_steps=3"
    data = to_dict(c)
    assert data["output_dir"] == "runs/x" and data["nested"] == {"rank": 32, "alpha": 0.0, "targets": []}
    assert list(data) == [f for f in Recipe.__dataclass_fields__]


def test_to_dict_needs_an_instance():
    with pytest.raises(TypeError):
        to_dict(Recipe)


# ----------------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def recipe_package(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_recipes_pkg"
    (pkg / "configs" / "train").mkdir(parents=True)
    (pkg / "configs" / "eval").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "configs" / "train" / "sd15-dpo.yaml").write_text("# mmalign train train/sd15-dpo\nlr: 1e-5\n")
    (pkg / "configs" / "train" / "sdxl-kto.yml").write_text("# mmalign train train/sdxl-kto\nlr: 1e-6\n")
    (pkg / "configs" / "eval" / "pickscore.yaml").write_text("# mmalign eval eval/pickscore\n")
    (pkg / "configs" / "README.md").write_text("not a recipe")
    monkeypatch.delitem(sys.modules, "fake_recipes_pkg", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cfg, "RECIPE_PACKAGE", "fake_recipes_pkg")
    return pkg


def test_find_recipe_by_name(recipe_package):
    expected = recipe_package / "configs" / "train" / "sd15-dpo.yaml"
    assert find_recipe("train/sd15-dpo") == expected
    assert find_recipe("train/sd15-dpo.yaml") == expected
    assert find_recipe("train/sdxl-kto") == recipe_package / "configs" / "train" / "sdxl-kto.yml"
    assert list_recipes() == ["eval/pickscore", "train/sd15-dpo", "train/sdxl-kto"]
    assert load_config(Recipe, find_recipe("train/sd15-dpo")).lr == 1e-5


def test_find_recipe_by_path(recipe_package, tmp_path):
    path = write(tmp_path, "lr: 1\n", "mine.yaml")
    assert find_recipe(path) == path
    assert find_recipe(str(path)) == path


def test_unknown_recipe_lists_available(recipe_package):
    with pytest.raises(ConfigError) as info:
        find_recipe("train/sd15-dop")
    msg = str(info.value)
    assert msg.startswith("train/sd15-dop: no such file")
    assert "Did you mean train/sd15-dpo" in msg
    for name in ("eval/pickscore", "train/sd15-dpo", "train/sdxl-kto"):
        assert name in msg
    with pytest.raises(ConfigError):
        find_recipe("../fake_recipes_pkg/__init__")


def test_recipe_command(tmp_path, recipe_package):
    assert recipe_command("train/sd15-dpo") == "mmalign train train/sd15-dpo"
    multi = write(tmp_path, "\n#\n# $ mmalign train r.yaml \\\n#     max_steps=3\n# second comment\nlr: 1\n", "m.yaml")
    assert recipe_command(multi) == "mmalign train r.yaml max_steps=3"
    assert recipe_command(write(tmp_path, "lr: 1\n# late comment\n", "n.yaml")) is None


def test_packaged_recipes_follow_the_convention():
    """Every recipe shipped in mmalign/configs starts with its command and reads as a YAML mapping."""
    for name in list_recipes():
        path = find_recipe(name)
        assert recipe_command(path), f"{path}: the first line must be '# <the command that runs it>'"
        assert isinstance(load_yaml(path), dict)
