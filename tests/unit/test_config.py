"""Recipe / backbone card / reward preset loading: inheritance, overrides, schema and errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

from cmrp import resources
from cmrp.config import (
    flatten,
    load_backbone_card,
    load_recipe,
    load_reward_preset,
    redact_secrets,
    resolve_recipe_parts,
)
from cmrp.config.schema import BackboneCard, Recipe
from cmrp.errors import ConfigError
from cmrp.registry import REWARDS

CARD = "name: tiny-card\nadapter: bagel\narchitecture: {llm: {hidden_size: 8}}\n"
PRESET = (
    "name: pre\nterms:\n"
    "  clip_similarity: {weight: 0.5}\n"
    "  trainset_penalty: {weight: 0.5, kwargs: {tau_low: 0.5}}\n"
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    """A recipe file beside a backbone card `card.yaml` it may refer to."""
    write(tmp_path / "card.yaml", CARD)
    return write(tmp_path / name, text)


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(*args, **kwargs)
    return str(info.value)


@pytest.fixture
def assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Shipped-asset folders of our own, so name lookups do not depend on the real ones."""
    root = tmp_path / "assets"
    write(root / "backbones" / "tiny-card.yaml", CARD)
    write(root / "rewards" / "pre.yaml", PRESET)
    write(root / "recipes" / "quick.yaml", "name: quick\nbackbone: tiny-card\ntrainer: {max_steps: 7}\n")
    write(root / "recipes" / "fam" / "sft.yaml", "base: quick\nname: fam-sft\n")
    monkeypatch.setattr(resources, "asset_dir", lambda kind: root / kind)
    return root


# --- loading and inheritance ---------------------------------------------------------------------


def test_minimal_recipe_is_typed_with_defaults(tmp_path):
    cfg = load_recipe(recipe(tmp_path, "name: mini\nbackbone: card.yaml\n"))
    assert isinstance(cfg, DictConfig)
    assert OmegaConf.get_type(cfg) is Recipe
    assert cfg.trainer.max_steps == Recipe().trainer.max_steps
    assert cfg.output_dir == "runs/mini"  # the schema default `runs/${name}` is resolved
    assert Path(cfg.backbone) == (tmp_path / "card.yaml").resolve()  # relative path made absolute


def test_recipe_and_backbone_by_shipped_name(assets):
    cfg = load_recipe("quick")
    assert cfg.backbone == "tiny-card"  # names stay as written
    nested = load_recipe("fam/sft")
    assert (nested.name, nested.trainer.max_steps) == ("fam-sft", 7)


def test_two_level_inheritance_deep_merges(tmp_path):
    write(
        tmp_path / "grand.yaml",
        "name: grand\nbackbone: card.yaml\ndata: {tasks: {chat: 1.0, t2i: 2.0}, batch_size: 4}\n",
    )
    write(
        tmp_path / "sub" / "parent.yaml", "base: ../grand.yaml\ntrainer: {accelerator: cpu, max_steps: 10}\n"
    )
    path = recipe(
        tmp_path, "base: sub/parent.yaml\nname: child\ntrainer: {max_steps: 20}\ndata: {tasks: {vqa: 0.5}}\n"
    )
    cfg = load_recipe(path)
    assert cfg.name == "child"
    assert (cfg.trainer.accelerator, cfg.trainer.max_steps) == ("cpu", 20)
    assert dict(cfg.data.tasks) == {"chat": 1.0, "t2i": 2.0, "vqa": 0.5}  # merged, not the defaults
    assert cfg.data.batch_size == 4
    assert "base" not in cfg


def test_list_of_bases_applies_in_order_then_the_file(tmp_path):
    write(tmp_path / "a.yaml", "backbone: card.yaml\nseed: 1\nname: a\ntrainer: {max_steps: 1}\n")
    write(tmp_path / "b.yaml", "seed: 2\ntrainer: {accelerator: cpu}\n")
    cfg = load_recipe(recipe(tmp_path, "base: [a.yaml, b.yaml]\nname: top\n"))
    assert (cfg.seed, cfg.name, cfg.trainer.max_steps, cfg.trainer.accelerator) == (2, "top", 1, "cpu")


def test_base_by_recipe_name(assets, tmp_path):
    cfg = load_recipe(write(tmp_path / "mine.yaml", "base: quick\nseed: 3\n"))
    assert (cfg.name, cfg.seed, cfg.trainer.max_steps) == ("quick", 3, 7)


def test_inheritance_cycle_is_reported(tmp_path):
    write(tmp_path / "one.yaml", "base: two.yaml\n")
    write(tmp_path / "two.yaml", "base: [one.yaml]\n")
    message = error_of(tmp_path / "one.yaml")
    assert "cycle" in message and "one.yaml -> two.yaml -> one.yaml" in message


def test_self_inheritance_is_a_cycle(tmp_path):
    assert "cycle" in error_of(write(tmp_path / "me.yaml", "base: me.yaml\n"))


def test_missing_base_names_the_key(tmp_path):
    message = error_of(recipe(tmp_path, "base: nowhere.yaml\n"))
    assert "recipe.yaml:1" in message and "'base'" in message and "not found" in message


def test_bad_base_value(tmp_path):
    assert "key 'base'" in error_of(recipe(tmp_path, "base: {a: 1}\n"))


def test_typed_dict_given_in_a_file_replaces_the_default(tmp_path):
    cfg = load_recipe(recipe(tmp_path, "backbone: card.yaml\ndata: {tasks: {chat: 1.0}}\n"))
    assert dict(cfg.data.tasks) == {"chat": 1.0}


def test_interpolations_resolve(tmp_path):
    path = recipe(
        tmp_path,
        "name: n1\nbackbone: card.yaml\noutput_dir: out/${name}\ntracking: {run_name: '${name}-run'}\n",
    )
    cfg = load_recipe(path)
    assert (cfg.output_dir, cfg.tracking.run_name) == ("out/n1", "n1-run")


@pytest.mark.parametrize("value", ["runs/${nope}", "'${'", "${oc.env:CMRP_TEST_UNSET_VARIABLE}"])
def test_bad_interpolation_names_the_key(tmp_path, value):
    message = error_of(recipe(tmp_path, f"backbone: card.yaml\noutput_dir: {value}\n"))
    assert "recipe.yaml:2" in message and "'output_dir'" in message and "interpolation" in message


# --- overrides -----------------------------------------------------------------------------------


def test_overrides_of_each_type(tmp_path):
    path = recipe(tmp_path, "backbone: card.yaml\nrewards: null\n")
    write(tmp_path / "preset.yaml", PRESET)
    cfg = load_recipe(
        path,
        [
            "trainer.max_steps=50",  # int
            "sft.optimizer.lr=1e-4",  # float in exponent form
            "finetune.mode=full",  # str
            "tracking.run_name=null",  # null
            "trainer.devices=[0]",  # a list into an Any field
            "stages=[sft,grpo]",  # list
            f"rewards={tmp_path / 'preset.yaml'}",
            "data.tasks.chat=2.0",  # a key inside a free-form dict
            "finetune.targets=[q_proj, v_proj]",
        ],
    )
    assert cfg.trainer.max_steps == 50
    assert cfg.sft.optimizer.lr == pytest.approx(1e-4)
    assert cfg.finetune.mode == "full"
    assert cfg.tracking.run_name is None
    assert list(cfg.trainer.devices) == [0]
    assert list(cfg.stages) == ["sft", "grpo"]
    assert cfg.data.tasks.chat == 2.0 and cfg.data.tasks.vqa == 1.0
    assert list(cfg.finetune.targets) == ["q_proj", "v_proj"]


def test_override_wins_over_file_and_is_type_checked(tmp_path):
    path = recipe(tmp_path, "backbone: card.yaml\ntrainer: {max_steps: 5}\n")
    assert load_recipe(path, ["trainer.max_steps=6"]).trainer.max_steps == 6
    message = error_of(path, ["trainer.max_steps=abc"])
    assert "command-line override" in message and "'trainer.max_steps'" in message and "integer" in message


def test_override_of_unknown_key_fails_like_a_typo(tmp_path):
    message = error_of(recipe(tmp_path, "backbone: card.yaml\n"), ["trainer.max_step=5"])
    assert "command-line override 'trainer.max_step=5'" in message
    assert "did you mean 'trainer.max_steps'?" in message


@pytest.mark.parametrize("text", ["trainer.max_steps", "=5", "trainer..max_steps=5", "x=[1"])
def test_malformed_override(tmp_path, text):
    assert "command-line override" in error_of(recipe(tmp_path, "backbone: card.yaml\n"), [text])


# --- schema errors -------------------------------------------------------------------------------


def test_typo_names_file_line_key_and_suggestion(tmp_path):
    message = error_of(recipe(tmp_path, "backbone: card.yaml\ntrainer:\n  max_step: 5\n"))
    assert "recipe.yaml:3" in message
    assert "'trainer.max_step'" in message
    assert "did you mean 'trainer.max_steps'?" in message


def test_typo_in_a_base_names_the_base_file(tmp_path):
    write(tmp_path / "parent.yaml", "backbone: card.yaml\nsft: {optimizer: {lrr: 0.1}}\n")
    message = error_of(recipe(tmp_path, "base: parent.yaml\n"))
    assert "parent.yaml:2" in message and "'sft.optimizer.lrr'" in message
    assert "did you mean 'sft.optimizer.lr'?" in message


def test_key_in_the_wrong_section_suggests_its_home(tmp_path):
    message = error_of(recipe(tmp_path, "backbone: card.yaml\nmax_steps: 5\n"))
    # max_steps lives in two sections: both are offered
    assert "did you mean 'grpo.max_steps' or 'trainer.max_steps'?" in message


def test_unknown_key_without_a_close_match_lists_valid_keys(tmp_path):
    message = error_of(recipe(tmp_path, "backbone: card.yaml\ntrainer: {zzzzqqq: 1}\n"))
    assert "'trainer.zzzzqqq'" in message and "max_steps" in message


def test_wrong_type_names_file_key_and_expected_type(tmp_path):
    message = error_of(recipe(tmp_path, "backbone: card.yaml\ntrainer:\n  max_steps: abc\n"))
    assert "recipe.yaml" in message and "'trainer.max_steps'" in message and "integer" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("trainer: 5", "trainer"),
        ("stages: sft", "stages"),
        ("data: {tasks: [chat]}", "data.tasks"),
        ("sft: {optimizer: {betas: [a, b]}}", "sft.optimizer.betas[0]"),
        ("name: [a]", "name"),
        ("finetune: null", "finetune"),
    ],
)
def test_wrong_shapes(tmp_path, text, key):
    message = error_of(recipe(tmp_path, f"backbone: card.yaml\n{text}\n"))
    assert f"'{key}'" in message and "recipe.yaml" in message


def test_free_form_keys_pass_the_key_check_and_meet_the_value_check(tmp_path):
    """An `Any` field's keys are not schema keys (no "unknown key"), but its value must still be usable."""
    message = error_of(recipe(tmp_path, "backbone: card.yaml\nfinetune: {targets: {anything: [x]}}\n"))
    assert "unknown key" not in message
    assert "'finetune.targets' must be a target set name" in message and "recipe.yaml:2" in message


def test_bad_mode_value_suggests(tmp_path):
    message = error_of(recipe(tmp_path, "backbone: card.yaml\nfinetune: {mode: lorra}\n"))
    assert "'finetune.mode'" in message and "did you mean 'lora'?" in message and "recipe.yaml:2" in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("decoding=mixed", "decoding"),
        ("stages=[]", "stages"),
        ("stages=[sft,ppo]", "stages[1]"),
        ("stages=[sft,sft]", "stages"),
        ("stages=[grpo]", "rewards"),  # GRPO without a reward preset
        ("data.format=csv", "data.format"),
        ("sft.optimizer.name=adam", "sft.optimizer.name"),
        ("sft.optimizer.scheduler=step", "sft.optimizer.scheduler"),
        ("sft.optimizer.lr=0", "sft.optimizer.lr"),
        ("sft.optimizer.lr=.nan", "sft.optimizer.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.max_steps=-3", "trainer.max_steps"),
        ("data.tasks.chat=-1", "data.tasks.chat"),
        ("data.tasks.dance=1", "data.tasks.dance"),
        ("data.tasks={chat: 0, thinking: 0, t2i: 0, vqa: 0, knowledge_qa: 0}", "data.tasks"),
        ("finetune.r=0", "finetune.r"),
        ("backbone=5", "backbone"),
        ("grpo.heldout_images=1", "grpo.heldout_images"),  # the diversity term needs two samples of a prompt
        ("grpo.heldout_prompts=-1", "grpo.heldout_prompts"),
    ],
)
def test_semantic_errors_name_the_key(tmp_path, override, key):
    message = error_of(recipe(tmp_path, "backbone: card.yaml\n"), [override])
    assert f"key '{key}'" in message


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    message = error_of(recipe(tmp_path, "backbone: card.yaml\ntrainer:\n  max_steps: [1\n"))
    assert "recipe.yaml:" in message and "YAML syntax error" in message


def test_duplicate_key_is_an_error(tmp_path):
    message = error_of(recipe(tmp_path, "seed: 1\nbackbone: card.yaml\nseed: 2\n"))
    assert "recipe.yaml:3" in message and "duplicate key 'seed'" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    assert "top level must be a mapping" in error_of(recipe(tmp_path, text))


def test_missing_recipe_lists_available_names(assets):
    message = error_of("quik")
    assert "did you mean 'quick'?" in message and "fam/sft" in message


def test_missing_recipe_file(assets, tmp_path):
    assert "not found" in error_of(tmp_path / "absent.yaml")


def test_missing_backbone_card_names_key_and_lists_cards(assets, tmp_path):
    message = error_of(write(tmp_path / "r.yaml", "backbone: tiny-crad\n"))
    assert "key 'backbone'" in message and "r.yaml:1" in message
    assert "did you mean 'tiny-card'?" in message and "Available backbone cards: tiny-card" in message


def test_relative_backbone_path_is_relative_to_the_recipe(tmp_path, monkeypatch):
    path = recipe(tmp_path, "backbone: card.yaml\n")
    monkeypatch.chdir(tmp_path.parent)
    cfg = load_recipe(path)
    card, preset = resolve_recipe_parts(cfg)
    assert card.name == "tiny-card" and preset is None


def test_inline_backbone_card(tmp_path):
    cfg = load_recipe(recipe(tmp_path, "backbone: {name: inline, adapter: bagel, architecture: {x: 1}}\n"))
    card, _ = resolve_recipe_parts(cfg)
    assert (card.name, card.architecture.x) == ("inline", 1)
    assert OmegaConf.get_type(card) is BackboneCard


def test_inline_backbone_card_errors_name_the_recipe(tmp_path):
    message = error_of(recipe(tmp_path, "backbone: {name: inline, adaptr: bagel}\n"))
    assert "recipe.yaml:1" in message and "did you mean 'backbone.adapter'?" in message
    message = error_of(recipe(tmp_path, "backbone:\n  name: inline\n"))
    assert "recipe.yaml" in message and "'backbone.adapter'" in message and "required" in message


def test_broken_card_file_is_reported(tmp_path):
    write(tmp_path / "bad_card.yaml", "name: b\nadapter: bagel\nlora_target: {}\n")
    message = error_of(recipe(tmp_path, "backbone: bad_card.yaml\n"))
    assert "bad_card.yaml:3" in message and "did you mean 'lora_targets'?" in message


def test_rewards_by_name_and_inline(assets, tmp_path):
    cfg = load_recipe(write(tmp_path / "r.yaml", "backbone: tiny-card\nstages: [sft, grpo]\nrewards: pre\n"))
    _, preset = resolve_recipe_parts(cfg)
    assert preset["terms"]["trainset_penalty"] == {"weight": 0.5, "kwargs": {"tau_low": 0.5}}
    inline = "backbone: tiny-card\nrewards: {name: i, terms: {clip_similarity: {weight: 1}}}\n"
    _, preset = resolve_recipe_parts(load_recipe(write(tmp_path / "i.yaml", inline)))
    assert preset == {
        "name": "i",
        "description": "",
        "terms": {"clip_similarity": {"weight": 1.0, "kwargs": {}}},
    }
    message = error_of(write(tmp_path / "m.yaml", "backbone: tiny-card\nrewards: pree\n"))
    assert "key 'rewards'" in message and "did you mean 'pre'?" in message


# --- backbone cards and reward presets -----------------------------------------------------------


def test_load_backbone_card_by_path_name_and_mapping(assets, tmp_path):
    by_path = load_backbone_card(write(tmp_path / "c.yaml", CARD))
    by_name = load_backbone_card("tiny-card")
    by_map = load_backbone_card({"name": "m", "adapter": "bagel"})
    by_dictconfig = load_backbone_card(OmegaConf.create({"name": "d", "adapter": "bagel"}))
    assert by_path.architecture.llm.hidden_size == 8 == by_name.architecture.llm.hidden_size
    assert (by_map.name, by_dictconfig.name, by_map.image_head) == ("m", "d", "flow")


def test_card_name_defaults_to_the_file_name(tmp_path):
    assert load_backbone_card(write(tmp_path / "nameless.yaml", "adapter: bagel\n")).name == "nameless"


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("adapter: bagel\nadaptr: x\n", "did you mean 'adapter'?"),
        ("adapter: bagel\ncapabilities: 5\n", "'capabilities' must be a list of strings"),
        ("name: x\n", "'adapter' is required"),
        ("adapter: bagel\nimage_head: pixels\n", "'image_head'"),
        ("adapter: bagel\nlora_targets: {default: q_proj}\n", "'lora_targets.default'"),
    ],
)
def test_card_errors(tmp_path, text, expect):
    with pytest.raises(ConfigError, match="card.yaml") as info:
        load_backbone_card(write(tmp_path / "card.yaml", text))
    assert expect in str(info.value)


def test_missing_card_lists_available(assets):
    with pytest.raises(ConfigError, match="Available backbone cards: tiny-card"):
        load_backbone_card("nope")


def test_load_reward_preset(assets, tmp_path):
    preset = load_reward_preset("pre")
    assert preset["name"] == "pre" and set(preset["terms"]) == {"clip_similarity", "trainset_penalty"}
    assert load_reward_preset(tmp_path / "assets" / "rewards" / "pre.yaml") == preset


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("terms: {clip: {}}", "'terms.clip.weight' is required"),
        ("terms: {clip: {weight: heavy}}", "'terms.clip.weight' must be a number"),
        ("terms: {clip: {wieght: 1}}", "did you mean 'terms.clip.weight'?"),
        ("terms: {clip_similarity: {weight: .inf}}", "finite"),
        ("terms: {}", "at least one"),
        ("terms: {clip: {weight: 1, kwargs: 3}}", "'terms.clip.kwargs'"),
        ("terms: [clip]", "'terms' must be a mapping"),
        ("terms: {clip_similarity: {weight: 1, kwargs: {scal: 2}}}", "unknown kwarg 'scal' (did you mean 'scale'?)"),
        ("terms: {clip_sim: {weight: 1}}", "did you mean 'clip_similarity'?"),
    ],
)
def test_reward_preset_errors(tmp_path, text, expect):
    with pytest.raises(ConfigError, match="preset.yaml") as info:
        load_reward_preset(write(tmp_path / "preset.yaml", text + "\n"))
    assert expect in str(info.value)


def test_reward_terms_are_checked_once_the_registry_has_entries(tmp_path, monkeypatch):
    path = write(
        tmp_path / "preset.yaml", "terms: {clip_similarity: {weight: 1}, lpips_diversty: {weight: 1}}\n"
    )
    monkeypatch.setattr(REWARDS, "_items", {})
    monkeypatch.setattr(REWARDS, "_loaded", True)
    assert set(load_reward_preset(path)["terms"]) == {"clip_similarity", "lpips_diversty"}
    monkeypatch.setattr(REWARDS, "_items", {"clip_similarity": object(), "lpips_diversity": object()})
    with pytest.raises(ConfigError, match="did you mean 'lpips_diversity'"):
        load_reward_preset(path)


# --- params --------------------------------------------------------------------------------------


def test_redact_secrets():
    original = {
        "tracking": {"tracking_uri": "https://bob:hunter2@mlflow.example/x", "API_KEY": "k", "run_name": "r"},
        "hf_token": "hf_abc",
        "judge": {"clientSecret": "s", "db_password": "p", "Token": None, "endpoints": [{"api_key": "k2"}]},
        "data": {"max_text_tokens": 64},
        "card": {"tokenizer": "train-bpe"},
    }
    red = redact_secrets(original)
    assert red["tracking"] == {
        "tracking_uri": "https://bob:***@mlflow.example/x",
        "API_KEY": "***",
        "run_name": "r",
    }
    assert red["hf_token"] == "***"
    assert red["judge"] == {
        "clientSecret": "***",
        "db_password": "***",
        "Token": None,
        "endpoints": [{"api_key": "***"}],
    }
    assert red["data"] == {"max_text_tokens": 64} and red["card"] == {"tokenizer": "train-bpe"}
    assert original["hf_token"] == "hf_abc"  # a copy
    assert redact_secrets(OmegaConf.create({"secret": "x", "n": "${secret}"})) == {"secret": "***", "n": "x"}


def test_flatten():
    flat = flatten(
        {
            "a": {"b": 1, "c": {"d": "x"}},
            "stages": ["sft", "grpo"],
            "none": None,
            "flag": False,
            "empty": {},
            "betas": [0.9, 0.95],
            "nested": [{"k": 1}, [1, 2]],
        }
    )
    assert flat == {
        "a.b": "1",
        "a.c.d": "x",
        "stages": "[sft,grpo]",
        "none": "null",
        "flag": "false",
        "empty": "{}",
        "betas": "[0.9,0.95]",
        "nested": "[{k:1},[1,2]]",
    }


def test_flatten_a_loaded_recipe(tmp_path):
    flat = flatten(load_recipe(recipe(tmp_path, "name: f\nbackbone: card.yaml\n")))
    assert flat["trainer.max_steps"] == str(Recipe().trainer.max_steps)
    assert flat["output_dir"] == "runs/f" and flat["stages"] == "[sft]"
    assert all(isinstance(value, str) for value in flat.values())


# --- shipped files -------------------------------------------------------------------------------


def test_every_shipped_recipe_validates():
    paths = sorted(p for p in resources.asset_dir("recipes").rglob("*.yaml") if "sweeps" not in p.parts)
    assert paths, "no recipe is shipped"
    for path in paths:
        cfg = load_recipe(path)
        card, _ = resolve_recipe_parts(cfg)
        assert card.adapter


def test_every_shipped_card_and_preset_validates():
    cards = sorted(resources.asset_dir("backbones").glob("*.yaml"))
    presets = sorted(resources.asset_dir("rewards").glob("*.yaml"))
    assert cards and presets
    for path in cards:
        assert load_backbone_card(path).name == path.stem
    for path in presets:
        preset = load_reward_preset(path)
        assert preset["name"] == path.stem and all(
            math.isfinite(t["weight"]) for t in preset["terms"].values()
        )


def test_shipped_reward_presets_match_the_paper():
    from cmrp.rewards import build_reward

    terms = load_reward_preset(resources.asset_dir("rewards") / "unicharacter.yaml")["terms"]
    weights = {name: spec["weight"] for name, spec in terms.items()}
    assert weights == {
        "vqa_consistency": 0.3,
        "clip_similarity": 0.45,
        "lpips_diversity": 0.1,
        "trainset_penalty": 0.15,
    }
    kwargs = terms["trainset_penalty"]["kwargs"]
    assert (kwargs["tau_low"], kwargs["tau_high"]) == (0.5, 0.9)
    for ablation, dropped in [
        ("no_vqa", "vqa_consistency"),
        ("no_clip", "clip_similarity"),
        ("no_lpips", "lpips_diversity"),
        ("no_trainset", "trainset_penalty"),
    ]:
        kept = load_reward_preset(resources.asset_dir("rewards") / f"{ablation}.yaml")["terms"]
        assert kept[dropped]["weight"] == 0  # written as `base: unicharacter` + that weight 0: not built
        assert {n: s for n, s in kept.items() if n != dropped} == {n: s for n, s in terms.items() if n != dropped}
        built = build_reward(load_reward_preset(resources.asset_dir("rewards") / f"{ablation}.yaml"), check=False)
        assert sorted(built.terms) == sorted(set(terms) - {dropped})


# --- fuzz ----------------------------------------------------------------------------------------

_SCHEMA_WORDS = [
    "name",
    "seed",
    "output_dir",
    "backbone",
    "finetune",
    "mode",
    "r",
    "alpha",
    "targets",
    "rewards",
    "decoding",
    "stages",
    "data",
    "tasks",
    "chat",
    "format",
    "batch_size",
    "sft",
    "optimizer",
    "lr",
    "betas",
    "trainer",
    "max_steps",
    "devices",
    "tracking",
    "eval",
    "base",
    "adapter",
    "terms",
    "weight",
]
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
_keys = st.sampled_from(_SCHEMA_WORDS) | _text
_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | _text
    | st.sampled_from(
        ["${name}", "${nope}", "${", "lora", "full", "sft", "grpo", "chain", "card.yaml", "quickstart"]
    )
)
_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz")
    write(directory / "card.yaml", CARD)
    return directory


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.dictionaries(_keys, _values, max_size=6), with_card=st.booleans())
def test_fuzz_any_yaml_mapping_loads_or_raises_config_error(fuzz_dir, data, with_card):
    if with_card:
        data = {**data, "backbone": "card.yaml"}
    path = write(fuzz_dir / "fuzz.yaml", yaml.safe_dump(data, allow_unicode=True))
    try:
        cfg = load_recipe(path)
    except ConfigError as err:
        assert str(err)
    else:
        assert OmegaConf.get_type(cfg) is Recipe


_FRAGMENTS = st.sampled_from(
    [
        "base: ",
        "backbone: card.yaml\n",
        "trainer:\n  max_steps: ",
        "data:\n  tasks:\n    chat: ",
        "${name}",
        "[",
        "]",
        "{",
        "}",
        ": ",
        "\n",
        "  ",
        "- ",
        "&a ",
        "*a",
        "<<: *a\n",
        "!!python/object:os.system ",
        "'",
        '"',
        "\t",
        "\x00",
        "#",
        "1e5",
        "null",
        "stages: [grpo]\n",
        "rewards: ",
        "fuzz.yaml",
        "2024-01-01",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.lists(_FRAGMENTS | _text, max_size=12).map("".join))
def test_fuzz_any_text_loads_or_raises_config_error(fuzz_dir, text):
    path = write(fuzz_dir / "fuzz.yaml", text)
    for load in (load_recipe, load_backbone_card, load_reward_preset):
        try:
            load(path)
        except ConfigError as err:
            assert str(err)
