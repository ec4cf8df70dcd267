"""`as_trl` and `as_flow_grpo`, called exactly as TRL's GRPOTrainer and Flow-GRPO's training loops call a
reward function (their calling code is reproduced in small fake loops here, and checked against TRL's
source where TRL is installed), plus one real `trl.GRPOTrainer` step with a tiny random model."""

from __future__ import annotations

import inspect
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from cmrp.rewards import (
    Brightness,
    ClipSimilarity,
    Composite,
    LpipsDiversity,
    RewardContext,
    RewardInputError,
    TrainsetPenalty,
    VqaConsistency,
    as_flow_grpo,
    as_trl,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "unicharacter" / "Bo_pure_t2i_with_vqa.head2.jsonl"


class AlwaysYes:
    """An answerer that says "yes" to every question (and records what it was asked)."""

    def __init__(self):
        self.questions: list[str] = []

    def answer(self, images, questions, options):
        self.questions += list(questions)
        return ["yes"] * len(questions)


class WordEncoder:
    """CLIP stand-in: an image is its mean RGB; a text the RGB of the colour words it names."""

    COLOURS = {"red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0], "blue": [0.0, 0.0, 1.0]}

    def encode_image(self, images):
        return images.mean(dim=(2, 3))

    def encode_text(self, texts):
        rows = []
        for text in texts:
            found = [self.COLOURS[w] for w in text.lower().split() if w in self.COLOURS]
            rows.append(torch.tensor(found).sum(0) if found else torch.full((3,), 1.0))
        return torch.stack(rows)


def solid(rgb, size=8) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, size, size).clone()


def pattern(seed: int, size=16) -> torch.Tensor:
    """A random image: distinct layouts, so the pixel features (mean-centred) tell them apart."""
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


def release_metadata() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines()]


def reference_folder(root: Path, relative: str) -> Path:
    from PIL import Image

    folder = root / relative
    folder.mkdir(parents=True)
    for i in range(2):
        pixels = (pattern(i, size=12).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


# --- Flow-GRPO ---------------------------------------------------------------------------------------


def per_prompt_advantages(prompts, rewards: np.ndarray) -> np.ndarray:
    """What Flow-GRPO's per-prompt stat tracker computes from `avg`: (r - group mean) / (group std + 1e-4)."""
    out = np.zeros_like(rewards, dtype=np.float64)
    labels = np.array(prompts)
    for prompt in set(prompts):
        members = labels == prompt
        out[members] = (rewards[members] - rewards[members].mean()) / (rewards[members].std() + 1e-4)
    return out


def flow_grpo_step(reward_fn, images, prompts, metadata):
    """One sampling epoch's reward handling as in Flow-GRPO's scripts/train_sd3.py (663-761): the reward fn
    runs in an executor with `only_strict=True`, every returned key becomes a float tensor, `avg` becomes
    per-prompt advantages, every key is logged, and eval logging leaves out -10 entries."""
    with ThreadPoolExecutor(max_workers=1) as executor:
        future = executor.submit(reward_fn, images, prompts, metadata, only_strict=True)
        rewards, reward_metadata = future.result()
    rewards = {key: torch.as_tensor(value).float() for key, value in rewards.items()}
    gathered = {key: value.cpu().numpy() for key, value in rewards.items()}
    advantages = per_prompt_advantages(prompts, gathered["avg"])
    logged = {f"reward_{key}": value.mean() for key, value in gathered.items()}
    eval_logged = {key: np.mean(value[value != -10]) for key, value in gathered.items()}
    return gathered, advantages, logged, eval_logged, reward_metadata


def test_flow_grpo_multi_score_in_its_training_loop_with_unicharacter_metadata(tmp_path):
    metadata = release_metadata()
    reference_folder(tmp_path, metadata[0]["reference_images_path"])
    answerer = AlwaysYes()
    reward = Composite({
        "vqa_consistency": (0.3, VqaConsistency(answerer=answerer)),
        "lpips_diversity": (0.1, LpipsDiversity(net="pixel")),
        "trainset_penalty": (0.15, TrainsetPenalty(model="pixel", tau_low=0.99, tau_high=1.0)),
    })
    fn = as_flow_grpo(reward, multi=True, root=tmp_path)
    prompts = [m["text"] for m in metadata for _ in range(2)]
    rows = [m for m in metadata for _ in range(2)]
    images = torch.stack([solid((0.2, 0.2, 0.2), 12), solid((0.6, 0.6, 0.6), 12), pattern(0, 12), pattern(0, 12)])
    gathered, advantages, logged, _, extra = flow_grpo_step(fn, images, prompts, rows)

    assert extra == {}
    assert set(gathered) == {"avg", "vqa_consistency", "lpips_diversity", "trainset_penalty"}
    # "yes" to every question: the yes-questions count (weights 1 + 1 + 0.8 of 5.9; 1 + 1 of 4.3), the
    # multiple-choice and "no" questions do not
    assert gathered["vqa_consistency"].tolist() == pytest.approx([2.8 / 5.9] * 2 + [2 / 4.3] * 2, abs=1e-6)
    assert len(answerer.questions) == 2 * (7 + 5)
    assert gathered["lpips_diversity"].tolist() == pytest.approx([0.4, 0.4, 0.0, 0.0], abs=1e-6)
    # the references come from `reference_images_path` (relative to root); the last two images copy one
    assert gathered["trainset_penalty"][2:].tolist() == pytest.approx([0.0, 0.0], abs=0.02)
    assert (gathered["trainset_penalty"][:2] < -0.5).all()  # flat grey: nothing like the references
    expected = (0.3 * gathered["vqa_consistency"] + 0.1 * gathered["lpips_diversity"]
                + 0.15 * gathered["trainset_penalty"])
    assert gathered["avg"] == pytest.approx(expected, abs=1e-6)
    assert np.isfinite(advantages).all() and all(np.isfinite(v) for v in logged.values())


def test_flow_grpo_multi_score_marks_abstaining_terms_with_minus_ten_and_refuses_a_nan_avg():
    reward = Composite({"vqa_consistency": (1.0, VqaConsistency(answerer=AlwaysYes())),
                        "brightness": (1.0, Brightness())})
    fn = as_flow_grpo(reward, multi=True)
    yes = [{"question": "Is it grey?", "answer": "yes"}]
    rows = [{"vqa_questions": yes}, {}, {"vqa_questions": yes}, {}]
    images = torch.stack([solid((0.5,) * 3)] * 4)
    gathered, advantages, _, eval_logged, _ = flow_grpo_step(fn, images, ["a", "a", "b", "b"], rows)
    assert gathered["vqa_consistency"].tolist() == [1.0, -10.0, 1.0, -10.0]
    assert eval_logged["vqa_consistency"] == 1.0  # Flow-GRPO's eval leaves the -10 entries out
    assert gathered["avg"].tolist() == pytest.approx([1.5, 0.5, 1.5, 0.5])
    assert np.isfinite(advantages).all()

    only_vqa = as_flow_grpo(Composite({"vqa_consistency": (1.0, VqaConsistency(answerer=AlwaysYes()))}), multi=True)
    with pytest.raises(RewardInputError, match="every reward term abstained for samples \\[1, 3\\].*no VQA questions"):
        only_vqa(images, ["a", "a", "b", "b"], rows)
    scores, _ = as_flow_grpo(Composite({"vqa_consistency": (1.0, VqaConsistency(answerer=AlwaysYes()))}))(
        images, ["a", "a", "b", "b"], rows)
    assert scores[0] == 1.0 and math.isnan(scores[1])  # the single-score shape keeps NaN = abstain


def test_flow_grpo_unicharacter_call_with_reference_images_argument():
    """UniCharacter's multi_score is `_fn(images, prompts, metadata, ref_images=None, only_strict=True)`."""
    fn = as_flow_grpo(TrainsetPenalty(model="pixel", tau_low=0.0, tau_high=0.5))
    refs = torch.stack([pattern(1), pattern(2)])
    images = (torch.stack([pattern(2)]) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    scores, info = fn(images, ["a"], [{}], refs, only_strict=True)
    assert info["max_similarity"].item() == pytest.approx(1.0, abs=1e-3)  # uint8 NHWC copy of the reference
    assert scores[0] == pytest.approx(-0.5, abs=2e-3)
    no_refs, info = fn(images, ["a"], [{}])
    assert math.isnan(no_refs[0]) and "reference images" in info["abstained"]


# --- TRL -----------------------------------------------------------------------------------------------


def trl_calculate_rewards(reward_func, inputs, prompts, completions, completion_ids, state=None):
    """TRL's GRPOTrainer._calculate_rewards for a custom (synchronous) reward function (TRL 1.16): every
    dataset column but prompt/completion/completion_ids goes in as a keyword with one value per completion,
    plus trainer_state, log_extra and log_metric; None becomes NaN; one reward per completion."""
    keys = [key for key in inputs[0] if key not in ["prompt", "completion", "completion_ids"]]
    reward_kwargs = {key: [example[key] for example in inputs] for key in keys}
    reward_kwargs["trainer_state"] = state
    extra, metrics = {}, {}
    reward_kwargs["log_extra"] = lambda column, values: extra.setdefault(column, []).extend(values)
    reward_kwargs["log_metric"] = lambda name, value: metrics.setdefault(name, []).append(value)
    out = reward_func(prompts=prompts, completions=completions, completion_ids=completion_ids, **reward_kwargs)
    out = [reward if reward is not None else torch.nan for reward in out]
    if len(out) != len(prompts):
        raise ValueError("wrong number of rewards")
    return torch.tensor(out, dtype=torch.float32), metrics


def test_trl_calling_convention_matches_the_installed_trl_source():
    trl = pytest.importorskip("trl")
    source = " ".join(inspect.getsource(trl.GRPOTrainer._calculate_rewards).split())
    assert ("reward_func( prompts=prompts, completions=completions, completion_ids=completion_ids_list, "
            "**reward_kwargs )") in source
    assert 'key not in ["prompt", "completion", "completion_ids"]' in source
    for extra in ("trainer_state", "log_extra", "log_metric"):
        assert f'reward_kwargs["{extra}"]' in source
    assert "reward if reward is not None else torch.nan" in source


def test_as_trl_scores_the_dataset_image_against_each_completion():
    reward = Composite({"clip_similarity": (1.0, ClipSimilarity(encoder=WordEncoder())),
                        "lpips_diversity": (0.5, LpipsDiversity(net="pixel"))})
    fn = as_trl(reward, image_key="picture")
    assert fn.__name__ == "cmrp_reward"
    red, green = solid((1.0, 0.0, 0.0)), solid((0.0, 1.0, 0.0))
    rows = [{"prompt": "Describe the picture.", "picture": red}] * 2 + [{"prompt": "And this one?", "picture": green}] * 2
    completions = ["a red square", "a green square", "green", [{"role": "assistant", "content": "a red one"}]]
    prompts = [row["prompt"] for row in rows]
    rewards, metrics = trl_calculate_rewards(fn, rows, prompts, completions, [[1, 2]] * 4)
    # CLIP cos(image, completion) = 1 or 0; pixel diversity within a prompt's group = 0 (same image)
    assert rewards.tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert metrics["cmrp/clip_similarity/mean"] == [pytest.approx(0.5)]
    prompts_fn = as_trl(reward, image_key="picture", text="prompts", name="cmrp_prompts")
    assert prompts_fn.__name__ == "cmrp_prompts"
    by_prompt, _ = trl_calculate_rewards(prompts_fn, rows, prompts, completions, [[1]] * 4)
    # the prompt names no colour (text embedding [1, 1, 1]): cos with a pure red or green image = 1/sqrt(3)
    assert by_prompt.tolist() == pytest.approx([1 / math.sqrt(3)] * 4, abs=1e-6)


def test_as_trl_abstains_with_none_and_reads_columns_as_context(tmp_path):
    fn = as_trl(TrainsetPenalty(model="pixel"))
    rows = [{"prompt": "p", "image": solid((0.3, 0.3, 0.3))}] * 2
    rewards, _ = trl_calculate_rewards(fn, rows, ["p", "p"], ["x", "y"], [[1], [1]])
    assert torch.isnan(rewards).all()  # no references: None from the adapter, NaN in TRL

    reference_folder(tmp_path, "refs")
    fn = as_trl(TrainsetPenalty(model="pixel", tau_low=0.0, tau_high=0.5), root=tmp_path)
    rows = [{"prompt": "p", "image": solid((0.3, 0.3, 0.3)), "reference_images_path": "refs"}] * 2
    rewards, _ = trl_calculate_rewards(fn, rows, ["p", "p"], ["x", "y"], [[1], [1]])
    assert torch.isfinite(rewards).all()


def test_as_trl_errors_name_the_fix():
    fn = as_trl(Brightness())
    with pytest.raises(RewardInputError, match="no 'image' column.*columns: picture"):
        trl_calculate_rewards(fn, [{"prompt": "p", "picture": solid((0, 0, 0))}], ["p"], ["c"], [[1]])
    floats = [{"prompt": "p", "image": solid((0, 0, 0)) * 0 + 200.0}]
    with pytest.raises(RewardInputError, match="0-255"):
        trl_calculate_rewards(fn, floats, ["p"], ["c"], [[1]])


def _tiny_causal_lm():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "describe", "the", "picture", "a", "red", "green", "blue", "square", "."]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", padding_side="left")
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tokenizer


@pytest.mark.filterwarnings("ignore")
def test_as_trl_inside_a_real_grpo_trainer_step(tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install cmrp[test-interop])")
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    model, tokenizer = _tiny_causal_lm()
    pictures = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 255, 0))]
    dataset = datasets.Dataset.from_dict({"prompt": ["describe the picture .", "describe the picture ."],
                                          "picture": pictures})
    reward = Composite({"clip_similarity": (1.0, ClipSimilarity(encoder=WordEncoder()))})
    wrapped = as_trl(reward, image_key="picture", name="cmrp")
    seen: list[list[float | None]] = []

    def reward_func(**kwargs):
        out = wrapped(**kwargs)
        seen.append(out)
        return out

    reward_func.__name__ = "cmrp"
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                          max_completion_length=4, max_steps=1, logging_steps=1, report_to="none", use_cpu=True,
                          bf16=False, save_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_func, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 1
    assert seen and all(len(batch) == 2 for batch in seen)
    logged = next(entry for entry in trainer.state.log_history if "rewards/cmrp/mean" in entry)
    values = [v for batch in seen for v in batch if v is not None]
    assert logged["rewards/cmrp/mean"] == pytest.approx(float(np.mean(values)), abs=1e-5)
    assert logged["cmrp/clip_similarity/mean"] == pytest.approx(float(np.mean(values)), abs=1e-5)


def test_context_argument_is_passed_through():
    context = RewardContext(reference_images=torch.stack([pattern(3)]))
    fn = as_flow_grpo(TrainsetPenalty(model="pixel", tau_low=0.0, tau_high=0.5), context=context)
    scores, info = fn(torch.stack([pattern(3)]), ["a"], None)
    assert info["max_similarity"].item() == pytest.approx(1.0, abs=1e-5) and scores[0] == pytest.approx(-0.5, abs=1e-5)
