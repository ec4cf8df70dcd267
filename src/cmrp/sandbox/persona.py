"""Procedural personas: a name, traits, catchphrases, a speech quirk and backstory facts.

Every fact is drawn from a small vocabulary (`FACT_VALUES`), so multiple-choice distractors can come
from the same vocabulary and a model must actually remember the character's value to answer.
Quirks are plain functions applied to every character reply, so style is checkable by code.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["FACT_VALUES", "KINDS", "QUIRKS", "TRAITS", "Quirk", "apply_quirk", "make_persona"]

_SYLLABLES = ("mo", "ki", "ra", "pu", "ze", "lu", "ta", "no", "fi", "ro", "chi", "mi", "ba", "ko", "ya", "su", "pi", "do")

KINDS = (
    "fox spirit", "cloud sprite", "tiny dragon", "moss golem", "star cat",
    "puddle frog", "paper ghost", "robot bunny", "acorn imp", "lantern moth",
)
TRAITS = (
    "cheerful", "shy", "curious", "grumpy", "brave", "lazy",
    "polite", "mischievous", "dreamy", "bossy", "clumsy", "gentle",
)
CATCHPHRASES = (
    "Let's gooo!", "Snacks first, questions later.", "Oh my whiskers!", "Sparkle power!",
    "No worries, no hurries.", "Hmph, fine.", "Adventure awaits!", "Boop!",
    "That's the spirit!", "Zoom zoom!", "Easy peasy!", "Holy moly!",
)
FACT_VALUES: dict[str, list[str]] = {
    "hometown": ["Pebble Bay", "Mistwood", "Lantern Hill", "Cloudspire", "Mossy Hollow",
                 "Saltmarsh", "Ember Valley", "Frostpeak", "Willow Creek", "Sunnydune"],
    "favorite_food": ["strawberry mochi", "grilled fish", "honey toast", "mushroom soup", "plum dumplings",
                      "sweet potatoes", "melon bread", "seaweed crackers", "cheese pie", "pancakes"],
    "age": ["7", "9", "12", "15", "19", "23", "31", "42", "57", "88", "101", "150"],
    "hobby": ["collecting shells", "stargazing", "knitting scarves", "painting clouds", "racing snails",
              "baking bread", "reading maps", "playing the ocarina", "folding paper cranes", "gardening"],
    "best_friend": ["Pip the owl", "Bramble the hedgehog", "Nori the otter", "Tansy the moth",
                    "Gus the crab", "Juniper the deer", "Fizz the beetle", "Olive the turtle"],
    "fear": ["thunderstorms", "deep water", "the dark", "loud bells", "spiders", "heights",
             "empty teacups", "crowds"],
    "favorite_color": ["red", "orange", "yellow", "green", "teal", "blue", "purple", "pink"],
    "dream": ["to fly over the ocean", "to open a bakery", "to map every star", "to win the snail derby",
              "to find the lost lantern", "to befriend a dragon", "to climb Frostpeak", "to write a storybook"],
    "favorite_season": ["spring", "summer", "autumn", "winter"],
    "birthday_month": ["January", "February", "March", "April", "May", "June", "July", "August",
                       "September", "October", "November", "December"],
}

_SENTENCE_END = re.compile(r"([.!?]+)(?=\s|$)")


@dataclass(frozen=True)
class Quirk:
    """A speech quirk: how it is described in the profile, and the rewrite applied to every reply."""

    description: str
    apply: Callable[[str, str], str]  # (text, speaker name) -> text


def _suffix(word: str) -> Callable[[str, str], str]:
    return lambda text, _name: _SENTENCE_END.sub(lambda m: f" {word}{m.group(1)}", text)


def _third_person(text: str, name: str) -> str:
    for pattern, repl in ((r"\bI'm\b", f"{name} is"), (r"\bI am\b", f"{name} is"), (r"\bI've\b", f"{name} has"),
                          (r"\bI\b", name), (r"\b[Mm]y\b", f"{name}'s"), (r"\bme\b", name)):
        text = re.sub(pattern, repl, text)
    return text


def _double_bang(text: str, _name: str) -> str:
    return _SENTENCE_END.sub("!!", text)


def _stutter(text: str, _name: str) -> str:
    return re.sub(r"^([A-Za-z])", lambda m: f"{m.group(1)}-{m.group(1)}", text, count=1)


QUIRKS: dict[str, Quirk] = {
    "nya": Quirk("ends every sentence with '~nya'", _suffix("~nya")),
    "desu": Quirk("ends every sentence with 'desu'", _suffix("desu")),
    "third_person": Quirk("always speaks about themself in the third person", _third_person),
    "double_bang": Quirk("ends every sentence with '!!'", _double_bang),
    "stutter": Quirk("stutters on the first word of every reply", _stutter),
}


def apply_quirk(quirk: str, text: str, name: str) -> str:
    """Rewrite `text` in the persona's quirk (a key of QUIRKS)."""
    return QUIRKS[quirk].apply(text, name)


def _make_name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3, 3)))).capitalize()


def make_persona(rng: random.Random) -> dict[str, Any]:
    """A JSON-serialisable persona drawn from `rng`: name, kind, traits, catchphrases, quirk, facts."""
    name = _make_name(rng)
    kind = rng.choice(KINDS)
    traits = rng.sample(TRAITS, 3)
    catchphrases = rng.sample(CATCHPHRASES, 2)
    quirk = rng.choice(sorted(QUIRKS))
    facts = {key: rng.choice(values) for key, values in FACT_VALUES.items()}
    return {
        "name": name,
        "kind": kind,
        "traits": traits,
        "catchphrases": catchphrases,
        "quirk": quirk,
        "quirk_description": QUIRKS[quirk].description,
        "facts": facts,
    }
