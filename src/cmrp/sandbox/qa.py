"""Knowledge QA, VQA and judge questions with exact answers, built from persona facts and render attributes.

Distractors come from the same vocabulary as the answer, and the answer's position is uniform, so
option position or word choice gives nothing away. Held-out knowledge items ask the same facts in
new words with the options in a new order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from cmrp.data.character import ImageRef, MultipleChoice, OpenQA, VQAItem
from cmrp.sandbox.persona import CATCHPHRASES, FACT_VALUES, KINDS, QUIRKS, TRAITS
from cmrp.sandbox.renderer import ATTRIBUTE_VALUES
from cmrp.sandbox.templates import FACT_TEXT, VQA_QUESTIONS, attribute_phrase

__all__ = ["KnowledgeQA", "judge_questions", "make_knowledge", "make_vqa"]

_N_OPTIONS = 4


@dataclass
class KnowledgeQA:
    train_open: list[OpenQA]
    train_mcq: list[MultipleChoice]
    test_open: list[OpenQA]
    test_mcq: list[MultipleChoice]


def _mcq(rng: random.Random, question: str, correct: str, pool: list[str] | tuple[str, ...], difficulty: str) -> MultipleChoice:
    """`correct` and up to three distractors from `pool`, the answer at a uniformly random position."""
    others = [v for v in dict.fromkeys(pool) if v != correct]
    options = rng.sample(others, min(_N_OPTIONS - 1, len(others)))
    answer = rng.randrange(len(options) + 1)
    options.insert(answer, correct)
    return MultipleChoice(question, options, answer, difficulty)


def _reordered(rng: random.Random, item: MultipleChoice, question: str) -> MultipleChoice:
    """The same options under a new question, the answer moved to a different position."""
    correct = item.options[item.answer]
    others = [o for i, o in enumerate(item.options) if i != item.answer]
    rng.shuffle(others)
    answer = rng.choice([i for i in range(len(item.options)) if i != item.answer] or [0])
    others.insert(answer, correct)
    return MultipleChoice(question, others, answer, item.difficulty)


def _false_claim_mcq(rng: random.Random, name: str, facts: dict[str, str], question: str) -> MultipleChoice:
    """Three true statements and one false one (a fact with a wrong value); the false one is the answer."""
    keys = rng.sample(list(FACT_TEXT), _N_OPTIONS)
    wrong_key = keys[0]
    wrong = rng.choice([v for v in FACT_VALUES[wrong_key] if v != facts[wrong_key]])
    false = FACT_TEXT[wrong_key].claim.format(n=name, v=wrong)
    true = [FACT_TEXT[k].claim.format(n=name, v=facts[k]) for k in keys[1:]]
    answer = rng.randrange(_N_OPTIONS)
    true.insert(answer, false)
    return MultipleChoice(question, true, answer, "hard")


def make_knowledge(persona: dict[str, Any], rng: random.Random) -> KnowledgeQA:
    name, facts = persona["name"], persona["facts"]
    qa = KnowledgeQA([], [], [], [])
    for key, text in FACT_TEXT.items():
        value = facts[key]
        for question in text.quiz:
            qa.train_open.append(OpenQA(question.format(n=name), value))
        qa.test_open.append(OpenQA(text.quiz_test[0].format(n=name), value))
        for question, test_question, difficulty in zip(text.quiz, text.quiz_test, ("easy", "medium"), strict=True):
            item = _mcq(rng, question.format(n=name), value, FACT_VALUES[key], difficulty)
            qa.train_mcq.append(item)
            qa.test_mcq.append(_reordered(rng, item, test_question.format(n=name)))

    traits = ", ".join(persona["traits"])
    quirk = QUIRKS[persona["quirk"]].description
    about = [
        # (train question, held-out question, answer, distractor pool, difficulty)
        (f"What kind of creature is {name}?", f"{name} is what sort of creature?", persona["kind"], KINDS, "easy"),
        (f"Which word describes {name}?", f"Which of these words fits {name}'s personality?",
         rng.choice(persona["traits"]), [t for t in TRAITS if t not in persona["traits"]], "medium"),
        (f"Which phrase does {name} often say?", f"{name} is known for saying what?",
         rng.choice(persona["catchphrases"]), [c for c in CATCHPHRASES if c not in persona["catchphrases"]], "medium"),
        (f"How does {name} talk?", f"What is special about the way {name} speaks?",
         quirk, [q.description for q in QUIRKS.values()], "hard"),
    ]
    for question, test_question, answer, pool, difficulty in about:
        item = _mcq(rng, question, answer, list(pool), difficulty)
        qa.train_mcq.append(item)
        qa.test_mcq.append(_reordered(rng, item, test_question))
    qa.train_open += [OpenQA(f"What kind of creature is {name}?", persona["kind"]),
                      OpenQA(f"What is {name} like?", traits),
                      OpenQA(f"What does {name} like to say?", " / ".join(persona["catchphrases"])),
                      OpenQA(f"How does {name} talk?", quirk)]
    qa.test_open += [OpenQA(f"Describe {name}'s personality.", traits),
                     OpenQA(f"What is odd about {name}'s way of speaking?", quirk)]
    for _ in range(2):
        item = _false_claim_mcq(rng, name, facts, f"Which statement about {name} is NOT true?")
        qa.train_mcq.append(item)
        qa.test_mcq.append(_reordered(rng, item, f"Which of these claims about {name} is false?"))
    return qa


def _vqa_pool(key: str) -> list[str]:
    return [attribute_phrase(key, v) for v in ATTRIBUTE_VALUES[key]]


def make_vqa(images: dict[str, ImageRef], rng: random.Random) -> list[VQAItem]:
    """Open and multiple-choice questions about every image, answered from its render attributes."""
    items = []
    for image in images.values():
        attrs = image.attributes
        keys = [k for k in VQA_QUESTIONS if not (k == "accessory_color" and attrs["accessory"] == "none")]
        item = VQAItem(image.id)
        for key in keys:
            answer = attribute_phrase(key, attrs[key])
            open_question, mcq_question = VQA_QUESTIONS[key]
            if key in ("body_color", "accessory", "expression", "scene"):
                item.open.append(OpenQA(open_question, answer))
            item.mcq.append(_mcq(rng, mcq_question, answer, _vqa_pool(key), "easy"))
        items.append(item)
    return items


def judge_questions() -> dict[str, list[str]]:
    """Questions for an LLM judge: does the model remember the facts, and does it stay in character."""
    memorization = [text.ask_test[0] for text in FACT_TEXT.values()]
    personality = [
        "How would you describe yourself to a stranger?",
        "What do you say when you are really excited?",
        "What would you do on a rainy afternoon?",
        "Someone just insulted your best friend. How do you react?",
        "Tell me about a day that made you smile.",
        "What would you never do, no matter what?",
        "Can you show me how you look when you are surprised?",
    ]
    return {"memorization": memorization, "personality": personality}
