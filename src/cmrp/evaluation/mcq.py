"""Multiple-choice accuracy by option likelihood (knowledge QA and VQA).

Each option is scored as the log-probability the model gives to the answer text "B. <option>"
after the question; the highest-scoring option is the model's choice.
"""

from __future__ import annotations

from typing import Any

from cmrp.data.character import Character, MultipleChoice
from cmrp.data.tasks import Segment, mcq_option_examples, system_prompt

__all__ = ["knowledge_mcq_accuracy", "mcq_accuracy", "vqa_mcq_accuracy"]


def mcq_accuracy(backbone: Any, items: list[tuple[list[Segment], MultipleChoice]], task: str) -> float:
    """Fraction of items whose correct option scores highest. NaN when there are no items."""
    if not items:
        return float("nan")
    correct = 0
    for prefix, item in items:
        scores = backbone.score_text(mcq_option_examples(prefix, item, task))
        correct += int(int(scores.argmax()) == item.answer)
    return correct / len(items)


def knowledge_mcq_accuracy(backbone: Any, character: Character, split: str = "test", max_items: int = 200) -> float:
    data = character.test if split == "test" else character.train
    prefix = [Segment("text", "system", system_prompt(character))]
    return mcq_accuracy(backbone, [(prefix, m) for m in data.knowledge_mcq[:max_items]], "knowledge_qa")


def vqa_mcq_accuracy(backbone: Any, character: Character, split: str = "test", max_items: int = 200) -> float:
    data = character.test if split == "test" else character.train
    items = []
    for vqa in data.vqa:
        image = data.images.get(vqa.image_id)
        if image is None:
            continue
        items += [([Segment("image", "user", image=image.path)], m) for m in vqa.mcq]
    return mcq_accuracy(backbone, items[:max_items], "vqa")
