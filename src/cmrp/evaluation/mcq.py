"""Multiple-choice accuracy by option likelihood (knowledge QA and VQA).

Each option is scored as the log-probability the model gives to the answer text "B. <option>"
after the question; the highest-scoring option is the model's choice.
"""

from __future__ import annotations

from cmrp.backbones.protocol import Backbone
from cmrp.data.character import Character, MultipleChoice
from cmrp.data.tasks import Segment, mcq_option_examples, system_prompt

__all__ = ["knowledge_mcq_accuracy", "knowledge_mcq_items", "mcq_accuracy", "vqa_mcq_accuracy", "vqa_mcq_items"]


def mcq_accuracy(backbone: Backbone, items: list[tuple[list[Segment], MultipleChoice]], task: str) -> float:
    """Fraction of items whose correct option scores highest. NaN when there are no items."""
    if not items:
        return float("nan")
    correct = 0
    for prefix, item in items:
        scores = backbone.score_text(mcq_option_examples(prefix, item, task))
        correct += int(int(scores.argmax()) == item.answer)
    return correct / len(items)


def knowledge_mcq_items(character: Character, split: str = "test",
                        max_items: int = 200) -> list[tuple[list[Segment], MultipleChoice]]:
    """Knowledge questions with their context (the system prompt), as both accuracies need them."""
    data = character.test if split == "test" else character.train
    prefix = [Segment("text", "system", system_prompt(character))]
    return [(prefix, m) for m in data.knowledge_mcq[:max_items]]


def vqa_mcq_items(character: Character, split: str = "test",
                  max_items: int = 200) -> list[tuple[list[Segment], MultipleChoice]]:
    """Questions about the split's images with the image as context; images that are missing are skipped."""
    data = character.test if split == "test" else character.train
    items = []
    for vqa in data.vqa:
        image = data.images.get(vqa.image_id)
        if image is None:
            continue
        items += [([Segment("image", "user", image=image.path)], m) for m in vqa.mcq]
    return items[:max_items]


def knowledge_mcq_accuracy(backbone: Backbone, character: Character, split: str = "test",
                           max_items: int = 200) -> float:
    return mcq_accuracy(backbone, knowledge_mcq_items(character, split, max_items), "knowledge_qa")


def vqa_mcq_accuracy(backbone: Backbone, character: Character, split: str = "test", max_items: int = 200) -> float:
    return mcq_accuracy(backbone, vqa_mcq_items(character, split, max_items), "vqa")
