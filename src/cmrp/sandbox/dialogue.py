"""Dialogue scenes for a sandbox persona: questions about facts, traits and moods, answered in style.

Each exchange has a mood; when a reply shows an image, the image is a reference image with that
expression (and a fitting scene when one exists), and the reply says what it shows (scene, pose,
expression; sometimes the accessory), so the text, the thinking and the picture agree and a model can
learn the mapping. In "now" exchanges ("What are you up to right now? Send me a picture!") the query
says nothing about the picture: the character picks it and only the reply tells, so an image drawn
without seeing the reply (joint decoding) can match it only by chance.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from cmrp.data.character import ImageRef, Scene, Turn
from cmrp.sandbox.persona import TRAITS, apply_quirk
from cmrp.sandbox.templates import FACT_TEXT, a_or_an, attribute_phrase, describe, image_sentence

__all__ = ["IMAGE_TURN_RATE", "make_scenes"]

IMAGE_TURN_RATE = 0.3  # chance that a reply not asked for a picture carries one (about 45% overall)
_CATCHPHRASE_RATE = 0.4
_ACCESSORY_RATE = 0.5  # chance that a "now" reply also names the accessory
_EXCHANGES = ((1, 2, 3), (0.4, 0.35, 0.25))
# fact values that suggest a background
_SCENE_HINTS = {
    "collecting shells": "beach", "stargazing": "night", "gardening": "forest", "reading maps": "room",
    "knitting scarves": "room", "deep water": "beach", "the dark": "night", "summer": "beach",
    "winter": "snow", "autumn": "forest", "Frostpeak": "snow", "Pebble Bay": "beach", "Mistwood": "forest",
}
# (train wordings, held-out wordings) per small-talk topic
_ASK = {
    "greeting": (("Hi! Who are you?", "Hello there, introduce yourself?", "Nice to meet you! What's your name?"),
                 ("Hey, who am I talking to?", "Could you tell me about yourself?")),
    "traits": (("How would you describe yourself?", "What's your personality like?"),
               ("How would your friends describe you?", "What are you like as a person?")),
    "catchphrase": (("Do you have a favorite saying?", "What do you always say?"),
                    ("What phrase do you repeat a lot?", "Is there something you say all the time?")),
    "sad": (("What makes you sad?", "When do you feel down?"), ("What makes you feel blue?", "What breaks your heart?")),
    "angry": (("What makes you angry?", "What annoys you?"), ("What gets on your nerves?", "What makes you lose your temper?")),
    "appearance": (("What do you look like?", "Describe your looks!"), ("How would I recognise you?", "What do you look like today?")),
    "now": (("What are you up to right now? Send me a picture!", "Show me what you're doing today!",
             "Where are you right now? Can I see?"),
            ("Got a photo of what you're doing?", "Send me a snapshot of your day!")),
}
_TOPIC_WEIGHTS = {"fact": 0.44, "greeting": 0.06, "traits": 0.06, "trait_check": 0.06, "catchphrase": 0.05,
                  "sad": 0.05, "angry": 0.05, "show": 0.1, "now": 0.1, "appearance": 0.03}


@dataclass
class _Exchange:
    user: str
    core: str  # the reply before catchphrase, image sentence and quirk
    mood: str  # an expression
    topic: str  # what was asked about, for the thinking text
    scene_hint: str | None = None
    image: ImageRef | None = None  # "show" exchanges pick their image up front


class _Writer:
    """Writes exchanges for one persona from one split's images."""

    def __init__(self, persona: dict[str, Any], identity: dict[str, str], images: dict[str, ImageRef],
                 rng: random.Random, held_out: bool):
        self.p, self.identity, self.rng, self.held_out = persona, identity, rng, held_out
        self.images = list(images.values())
        self.facts: dict[str, str] = persona["facts"]

    def _ask(self, options: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
        return self.rng.choice(options[1] if self.held_out else options[0])

    def exchange(self) -> _Exchange:
        topic = self.rng.choices(list(_TOPIC_WEIGHTS), weights=list(_TOPIC_WEIGHTS.values()))[0]
        if topic in ("show", "now") and self.images:
            return self._show() if topic == "show" else self._now()
        if topic in ("fact", "show", "now"):
            return self._fact(self.rng.choice(list(FACT_TEXT)))
        return getattr(self, f"_{topic}")()

    def _fact(self, key: str) -> _Exchange:
        text, value = FACT_TEXT[key], self.facts[key]
        user = self.rng.choice(text.ask_test if self.held_out else text.ask)
        core = self.rng.choice(text.say).format(v=value)
        return _Exchange(user, core[0].upper() + core[1:], text.mood, text.topic, _SCENE_HINTS.get(value))

    def _greeting(self) -> _Exchange:
        kind = self.p["kind"]
        core = f"Hello, {self.p['name']} here, {a_or_an(kind)} {kind} from {self.facts['hometown']}, nice to meet you."
        return _Exchange(self._ask(_ASK["greeting"]), core, "happy", "who I am", _SCENE_HINTS.get(self.facts["hometown"]))

    def _traits(self) -> _Exchange:
        a, b, c = self.p["traits"]
        return _Exchange(self._ask(_ASK["traits"]), f"I'm {a} and {b}, and maybe a little {c} too.", "happy", "my personality")

    def _trait_check(self) -> _Exchange:
        trait = self.rng.choice(TRAITS)
        user = f"Would you call yourself {trait}?" if self.held_out else f"Are you {trait}?"
        if trait in self.p["traits"]:
            return _Exchange(user, f"Yes, I'm really {trait}, everyone who knows me says so.", "happy", "my personality")
        mine = self.rng.choice(self.p["traits"])
        return _Exchange(user, f"How rude! I'm not {trait} at all, I'm {mine}.", "angry", "a wrong guess about me")

    def _catchphrase(self) -> _Exchange:
        phrase = self.rng.choice(self.p["catchphrases"])
        return _Exchange(self._ask(_ASK["catchphrase"]), f"I always say '{phrase}' when I get excited.", "happy", "my catchphrase")

    def _sad(self) -> _Exchange:
        core = self.rng.choice((f"I feel sad when {self.facts['best_friend']} is away for too long.",
                                f"Missing {self.facts['hometown']} makes me a little sad sometimes."))
        return _Exchange(self._ask(_ASK["sad"]), core, "sad", "what makes me sad")

    def _angry(self) -> _Exchange:
        core = self.rng.choice((f"When someone steals my {self.facts['favorite_food']}, I get so angry!",
                                f"People who laugh at {self.facts['hobby']} make me really mad!"))
        return _Exchange(self._ask(_ASK["angry"]), core, "angry", "what makes me angry")

    def _appearance(self) -> _Exchange:
        core = f"I'm {describe(self.identity, identity_only=True)}, easy to spot!"
        return _Exchange(self._ask(_ASK["appearance"]), core, "happy", "how I look")

    def _show(self) -> _Exchange:
        image = self.rng.choice(self.images)
        expression, scene = image.attributes["expression"], attribute_phrase("scene", image.attributes["scene"])
        if self.held_out:
            user = f"Can you show me you, {expression}, {scene}?"
        else:
            user = self.rng.choice((f"Show me your {expression} face!", f"Can I see a picture of you {scene}?"))
        core = f"Sure, here I am {image_sentence(image.attributes)}."
        return _Exchange(user, core, expression, f"seeing me {expression} {scene}", image=image)

    def _now(self) -> _Exchange:
        image = self.rng.choice(self.images)  # the character's choice: only the reply says what it shows
        sentence = image_sentence(image.attributes, accessory=self.rng.random() < _ACCESSORY_RATE)
        return _Exchange(self._ask(_ASK["now"]), f"Right now I'm {sentence}.", image.attributes["expression"],
                         "what I'm up to", image=image)

    def _pick_image(self, mood: str, scene: str | None) -> ImageRef | None:
        same_mood = [im for im in self.images if im.attributes["expression"] == mood]
        fitting = [im for im in same_mood if im.attributes["scene"] == scene]
        pool = fitting or same_mood
        return self.rng.choice(pool) if pool else None

    def reply(self, ex: _Exchange) -> Turn:
        parts = [ex.core]
        if self.rng.random() < _CATCHPHRASE_RATE:
            parts.append(self.rng.choice(self.p["catchphrases"]))
        image = ex.image
        if image is None and self.rng.random() < IMAGE_TURN_RATE:
            image = self._pick_image(ex.mood, ex.scene_hint)
            if image is not None:
                parts.append(f"Look, here I am {image_sentence(image.attributes)}.")
        text = apply_quirk(self.p["quirk"], " ".join(parts), self.p["name"])
        if image is None:
            return Turn("character", text)
        attrs = image.attributes
        expression = attrs["expression"]
        thinking = (
            f"They asked about {ex.topic}, so I feel {expression}. I will show {a_or_an(expression)} {expression} face "
            f"{attribute_phrase('scene', attrs['scene'])}, {attribute_phrase('pose', attrs['pose'])}."
        )
        return Turn("character", text, image_id=image.id, thinking=thinking, generation_instruction=describe(attrs, name=self.p["name"]))


def make_scenes(
    persona: dict[str, Any],
    identity: dict[str, str],
    images: dict[str, ImageRef],
    n: int,
    rng: random.Random,
    *,
    held_out: bool = False,
    id_prefix: str = "scene",
) -> list[Scene]:
    """`n` scenes of 1-3 exchanges; image turns reference `images` (the same split's images)."""
    writer = _Writer(persona, identity, images, rng, held_out)
    scenes = []
    for i in range(n):
        turns: list[Turn] = []
        for _ in range(rng.choices(*_EXCHANGES)[0]):
            ex = writer.exchange()
            turns += [Turn("user", ex.user), writer.reply(ex)]
        scenes.append(Scene(f"{id_prefix}_{i:03d}", turns))
    return scenes
