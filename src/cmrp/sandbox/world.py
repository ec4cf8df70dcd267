"""Assembles a whole sandbox character from a seed: identity, images, dialogues, QA, held-out test.

Each part draws from its own RNG stream (`random.Random("cmrp-sandbox:<seed>:<part>")`), so the
result is the same on every machine and changing one count (say, scenes) leaves the persona and the
images unchanged. Nothing here touches the disk: image paths point where `writer` will render them.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

from cmrp.data.character import Character, CharacterSplit, ImageRef, Profile, T2IItem
from cmrp.sandbox.dialogue import make_scenes
from cmrp.sandbox.persona import make_persona
from cmrp.sandbox.qa import judge_questions, make_knowledge, make_vqa
from cmrp.sandbox.renderer import ATTRIBUTE_VALUES
from cmrp.sandbox.templates import a_or_an, describe

__all__ = ["MAX_REFERENCE_IMAGES", "N_TEST_IMAGES", "build_character"]

N_TEST_IMAGES = 4
MAX_REFERENCE_IMAGES = 60
_N_EXTRA_TEST_T2I = 4


def _rng(seed: int, part: str) -> random.Random:
    return random.Random(f"cmrp-sandbox:{seed}:{part}")


def _make_identity(rng: random.Random) -> dict[str, str]:
    values = ATTRIBUTE_VALUES
    body_color = rng.choice(values["body_color"])
    accessory = rng.choices(values["accessory"], weights=[1.0 if a != "none" else 0.5 for a in values["accessory"]])[0]
    return {
        "body_shape": rng.choice(values["body_shape"]),
        "body_color": body_color,
        "eyes": rng.choice(values["eyes"]),
        "accessory": accessory,
        "accessory_color": rng.choice([c for c in values["accessory_color"] if c != body_color]),
    }


def _pick_combos(rng: random.Random, n: int, seen: set[tuple[str, str]], used: list[dict[str, str]]) -> list[dict[str, str]]:
    """`n` combos of (expression, pose, scene) not in `used`: least-used values first, expression+scene
    pairs not in `seen` preferred. Records the picks in `seen` and `used`."""
    keys = ("expression", "pose", "scene")
    candidates = [
        {"expression": e, "pose": p, "scene": s}
        for e in ATTRIBUTE_VALUES["expression"] for p in ATTRIBUTE_VALUES["pose"] for s in ATTRIBUTE_VALUES["scene"]
    ]
    candidates = [c for c in candidates if c not in used]
    rng.shuffle(candidates)
    counts: Counter[tuple[str, str]] = Counter()
    picks = []
    for _ in range(min(n, len(candidates))):
        def cost(c: dict[str, str]) -> int:
            return sum(counts[(k, c[k])] for k in keys) + 100 * ((c["expression"], c["scene"]) in seen)

        best = min(candidates, key=cost)
        candidates.remove(best)
        picks.append(best)
        used.append(best)
        counts.update((k, best[k]) for k in keys)
        seen.add((best["expression"], best["scene"]))
    return picks


def _images(root: Path, split: str, prefix: str, identity: dict[str, str], combos: list[dict[str, str]]) -> dict[str, ImageRef]:
    images = {}
    for i, combo in enumerate(combos):
        image_id = f"{prefix}_{i:02d}"
        attrs = {**identity, **combo}
        images[image_id] = ImageRef(image_id, root / split / "images" / f"{image_id}.png", describe(attrs), attrs)
    return images


def _profile(persona: dict[str, Any], identity: dict[str, str], seed: int) -> Profile:
    name, facts = persona["name"], persona["facts"]
    a, b, c = persona["traits"]
    first, second = persona["catchphrases"]
    text = "\n\n".join([
        f"{name} is {a_or_an(facts['age'])} {facts['age']}-year-old {persona['kind']} from {facts['hometown']}. "
        f"{name} is {a}, {b} and {c}. "
        f"{name}'s best friend is {facts['best_friend']}, and {name}'s favorite pastime is {facts['hobby']}.",
        f"{name} is {describe(identity, identity_only=True)}. {name} {persona['quirk_description']} "
        f"and often says \"{first}\" and \"{second}\".",
        f"{name} loves {facts['favorite_food']} and the color {facts['favorite_color']}, likes "
        f"{facts['favorite_season']} best and has a birthday in {facts['birthday_month']}. {name} is afraid of "
        f"{facts['fear']}, and {name}'s big dream is {facts['dream']}.",
    ])
    fields = {key: persona[key] for key in ("kind", "traits", "catchphrases", "quirk", "quirk_description", "facts")}
    return Profile(text, {**fields, "identity": dict(identity), "sandbox_seed": seed})


def _t2i(name: str, images: dict[str, ImageRef], identity: dict[str, str], extra: list[dict[str, str]]) -> list[T2IItem]:
    """Instructions name the character (`describe(..., name=)`); the caption describes what to draw."""
    items = [T2IItem(describe(image.attributes, name=name), image.id, image.caption) for image in images.values()]
    return items + [T2IItem(describe(combo, name=name), caption=describe({**identity, **combo})) for combo in extra]


def build_character(seed: int, root: Path, *, n_reference_images: int = 10, n_scenes: int = 160) -> Character:
    """The sandbox character for `seed`; its images are to be rendered at `root/<split>/images/<id>.png`."""
    if not 1 <= n_reference_images <= MAX_REFERENCE_IMAGES:
        raise ValueError(f"n_reference_images must be in 1..{MAX_REFERENCE_IMAGES}, got {n_reference_images}")
    if n_scenes < 1:
        raise ValueError(f"n_scenes must be at least 1, got {n_scenes}")
    root = Path(root)
    persona = make_persona(_rng(seed, "persona"))
    identity = _make_identity(_rng(seed, "identity"))

    combo_rng, seen, used = _rng(seed, "images"), set(), []
    train_combos = _pick_combos(combo_rng, n_reference_images, seen, used)
    test_combos = _pick_combos(combo_rng, N_TEST_IMAGES, seen, used)
    extra = _pick_combos(combo_rng, n_reference_images + _N_EXTRA_TEST_T2I, seen, used)  # T2I without a target
    train_images = _images(root, "train", "ref", identity, train_combos)
    test_images = _images(root, "test", "test", identity, test_combos)

    knowledge = make_knowledge(persona, _rng(seed, "knowledge"))
    vqa_rng = _rng(seed, "vqa")
    train = CharacterSplit(
        images=train_images,
        scenes=make_scenes(persona, identity, train_images, n_scenes, _rng(seed, "scenes")),
        knowledge_open=knowledge.train_open,
        knowledge_mcq=knowledge.train_mcq,
        vqa=make_vqa(train_images, vqa_rng),
        t2i=_t2i(persona["name"], train_images, identity, extra[:n_reference_images]),
    )
    test = CharacterSplit(
        images=test_images,
        scenes=make_scenes(persona, identity, test_images, max(8, n_scenes // 4), _rng(seed, "test-scenes"),
                           held_out=True, id_prefix="test_scene"),
        knowledge_open=knowledge.test_open,
        knowledge_mcq=knowledge.test_mcq,
        vqa=make_vqa(test_images, vqa_rng),
        t2i=_t2i(persona["name"], test_images, identity, extra[n_reference_images:]),
        judge_questions=judge_questions(),
    )
    return Character(persona["name"], _profile(persona, identity, seed), train, test, root=root, source_format="sandbox")
