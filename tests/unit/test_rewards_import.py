"""`cmrp.rewards` stays importable by other projects: torch only, until a term loads default weights."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cmrp.rewards

HEAVY = (
    "lightning",
    "pytorch_lightning",
    "mlflow",
    "transformers",
    "open_clip",
    "lpips",
    "diffusers",
    "peft",
)
FORBIDDEN_CMRP = ("cmrp.training", "cmrp.tracking", "cmrp.cli")

SCRIPT = f"""
import sys
import torch

import cmrp.rewards as R

heavy = {HEAVY!r}
forbidden = {FORBIDDEN_CMRP!r}
loaded = lambda: [m for m in heavy + forbidden if m in sys.modules]
print("after-import", ",".join(loaded()))


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 8)

    def encode_image(self, images):
        return self.proj(images.mean(dim=(2, 3)))

    def encode_text(self, texts):
        return torch.randn(len(texts), 8)


features = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
answerer = lambda images, questions, options: ["yes"] * len(questions)
preset = {{"name": "all", "terms": {{name: {{"weight": 1.0, "kwargs": {{}}}} for name in
          ("clip_similarity", "vqa_consistency", "lpips_diversity", "trainset_penalty", "brightness")}}}}
reward = R.build_reward(preset, term_kwargs={{
    "clip_similarity": {{"encoder": Encoder(), "reference_weight": 0.5}},
    "vqa_consistency": {{"answerer": answerer}},
    "lpips_diversity": {{"distance": R.pixel_distance}},
    "trainset_penalty": {{"features": features}},
}})
context = R.RewardContext(
    reference_images=torch.rand(2, 3, 16, 16),
    questions=[[R.VQAQuestion("Is it red?", "yes")], []] * 2,
)
out = reward(torch.rand(4, 3, 16, 16), ["a"] * 4, group_ids=torch.tensor([0, 0, 1, 1]), context=context)
assert torch.isfinite(out.scores).all(), out.scores
assert set(out.info) == set(preset["terms"]), out.info.keys()
scores, _ = R.as_flow_grpo(reward, context=context)(torch.rand(4, 3, 16, 16), ["a"] * 4, None)
assert scores.shape == (4,)
print("after-scoring", ",".join(loaded()))
"""


def test_import_and_scoring_with_injected_nets_stay_light():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in out.stdout.splitlines())
    assert lines["after-import"].strip() == "", f"import cmrp.rewards imported {lines['after-import']}"
    assert lines["after-scoring"].strip() == "", f"scoring imported {lines['after-scoring']}"


def test_reward_sources_import_no_heavy_or_forbidden_module_at_top_level():
    """Heavy model libraries only inside functions; training, tracking and the CLI never."""
    root = Path(cmrp.rewards.__file__).parent
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert not name.startswith(FORBIDDEN_CMRP), f"{path.name} imports {name}"
                if id(node) in top_level:
                    assert name.split(".")[0] not in HEAVY, f"{path.name} imports {name} at module level"


def test_public_api():
    assert set(cmrp.rewards.__all__) >= {
        "Composite",
        "Reward",
        "RewardContext",
        "RewardOutput",
        "VQAQuestion",
        "as_flow_grpo",
        "build_reward",
    }
    for name in cmrp.rewards.__all__:
        assert hasattr(cmrp.rewards, name)
