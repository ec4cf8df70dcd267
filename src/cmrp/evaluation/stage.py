"""The held-out numbers `cmrp fit` logs before and after each stage: cheap enough to run inside training,
and the same for every character — the oracle's identity check joins in for sandbox characters here, in
evaluation, so the trainer has no special case for them."""

from __future__ import annotations

from typing import Any

from cmrp.backbones.protocol import Backbone
from cmrp.data.character import Character
from cmrp.data.tasks import image_prompts
from cmrp.evaluation.mcq import knowledge_mcq_accuracy, vqa_mcq_accuracy
from cmrp.evaluation.oracle import sandbox_identity
from cmrp.sampling.spec import SamplerSpec
from cmrp.sandbox.probe import identity_fidelity

__all__ = ["stage_numbers"]


def stage_numbers(adapter: Backbone, character: Character, cfg: Any) -> dict[str, float]:
    """Held-out knowledge and VQA multiple-choice accuracy; for a sandbox character also the oracle's
    identity fidelity of images drawn for the first `eval.grid_prompts` held-out image prompts."""
    eval_cfg = cfg.eval
    adapter.model.eval()
    out = {
        "knowledge_mcq_acc": knowledge_mcq_accuracy(adapter, character, "test", eval_cfg.max_items),
        "vqa_mcq_acc": vqa_mcq_accuracy(adapter, character, "test", eval_cfg.max_items),
    }
    identity = sandbox_identity(character)
    if identity is not None:
        prompts = image_prompts(character, split="test", decoding=cfg.decoding)[: eval_cfg.grid_prompts]
        if prompts:
            images = adapter.sample_images([p.context for p in prompts], SamplerSpec(steps=eval_cfg.sample_steps),
                                           n=eval_cfg.images_per_prompt, seed=cfg.seed).images
            out["identity_fidelity"] = identity_fidelity(images, identity)
    return out
