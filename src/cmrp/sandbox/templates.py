"""Wording for the sandbox world: attribute phrases, captions and the questions asked about facts.

Train and test wordings are kept apart on purpose: held-out items reuse the same facts with
questions a model has not seen, so answering them requires the fact, not the sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cmrp.sandbox.renderer import ATTRIBUTE_VALUES

__all__ = [
    "ATTRIBUTE_PHRASES",
    "EXPRESSION_WORDS",
    "FACT_TEXT",
    "VQA_QUESTIONS",
    "FactText",
    "a_or_an",
    "attribute_phrase",
    "describe",
    "image_sentence",
    "read_description",
    "read_reply",
]

# how each attribute value is said in captions, replies and VQA options
ATTRIBUTE_PHRASES: dict[str, dict[str, str]] = {
    "body_shape": {"circle": "circle", "square": "square", "triangle": "triangle", "diamond": "diamond", "pill": "pill"},
    "eyes": {"dot": "dot eyes", "wide": "wide eyes", "sleepy": "sleepy eyes"},
    "accessory": {"hat": "a hat", "bow": "a bow", "scarf": "a scarf", "glasses": "glasses", "none": "no accessory"},
    "expression": {"happy": "happy", "sad": "sad", "surprised": "surprised", "angry": "angry"},
    "pose": {"left": "on the left", "center": "in the center", "right": "on the right",
             "small": "small in the frame", "large": "large in the frame"},
    "scene": {"beach": "on the beach", "forest": "in the forest", "night": "under the night sky",
              "snow": "in the snow", "room": "in a cozy room"},
}
_SHAPE_ADJECTIVES = {"circle": "round", "square": "square", "triangle": "triangular", "diamond": "diamond-shaped",
                     "pill": "pill-shaped"}
# how a reply says the mood it shows
EXPRESSION_WORDS = {"happy": "smiling", "sad": "a bit teary", "surprised": "wide-eyed", "angry": "fuming"}

# attribute -> (open question, multiple-choice question) asked about a picture
VQA_QUESTIONS: dict[str, tuple[str, str]] = {
    "body_color": ("What color is the creature's body?", "Which color is the creature's body?"),
    "body_shape": ("What shape is the creature's body?", "Which shape is the creature's body?"),
    "eyes": ("What kind of eyes does the creature have?", "Which eyes does the creature have?"),
    "accessory": ("What is the creature wearing?", "Which accessory is the creature wearing?"),
    "accessory_color": ("What color is the creature's accessory?", "Which color is the creature's accessory?"),
    "expression": ("How does the creature feel?", "Which expression does the creature show?"),
    "scene": ("Where is the creature?", "Where is the creature in this picture?"),
    "pose": ("How is the creature placed in the picture?", "How is the creature placed in the picture?"),
}


def a_or_an(word: str) -> str:
    """The indefinite article for `word` ("an orange", "a red")."""
    return "an" if word[:1].lower() in "aeiou8" or word in ("11", "18") else "a"


def attribute_phrase(key: str, value: str) -> str:
    """The words for one attribute value (colours are their own names)."""
    return ATTRIBUTE_PHRASES.get(key, {}).get(value, value)


def _accessory(attrs: dict[str, Any]) -> str:
    accessory = attrs["accessory"]
    if accessory == "none":
        return ""
    if accessory == "glasses":
        return f" and {attrs['accessory_color']} glasses"
    return f" and a {attrs['accessory_color']} {accessory}"


def describe(attrs: dict[str, Any], *, identity_only: bool = False, name: str | None = None) -> str:
    """A caption naming identity attributes, then expression, scene and pose. With `name`, the name
    stands for the identity ("Moki, happy, on the beach, in the center"): a character's own image
    prompts say who, not what they look like, so drawing them right needs the customization."""
    if name is not None:
        text = name
    else:
        shape = _SHAPE_ADJECTIVES[attrs["body_shape"]]
        color = attrs["body_color"]
        text = f"{a_or_an(color)} {color} {shape} creature with {attribute_phrase('eyes', attrs['eyes'])}{_accessory(attrs)}"
    if identity_only:
        return text
    parts = [text, attrs["expression"], attribute_phrase("scene", attrs["scene"]), attribute_phrase("pose", attrs["pose"])]
    return ", ".join(parts)


def image_sentence(attrs: dict[str, Any], *, accessory: bool = False) -> str:
    """What a reply says about the picture it shows: scene, pose and expression ("on the beach, on the left,
    smiling"), and with `accessory` the accessory ("..., in my red hat"), in words `read_reply` reads back."""
    text = (f"{attribute_phrase('scene', attrs['scene'])}, {attribute_phrase('pose', attrs['pose'])}, "
            f"{EXPRESSION_WORDS[attrs['expression']]}")
    if accessory and attrs.get("accessory", "none") != "none":
        text += f", in my {attrs['accessory_color']} {attrs['accessory']}"
    return text


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _caption_patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(identity part, scene part) of a `describe` caption."""
    def group(name: str, phrases: dict[str, str]) -> str:
        return f"(?P<{name}>{_alternatives(phrases.values())})"

    colors = {c: c for c in ATTRIBUTE_VALUES["body_color"]}
    accessory_colors = {c: c for c in ATTRIBUTE_VALUES["accessory_color"]}
    worn = {a: a for a in ATTRIBUTE_VALUES["accessory"] if a not in ("none", "glasses")}
    identity = (rf"\b(?:a|an) {group('body_color', colors)} {group('body_shape', _SHAPE_ADJECTIVES)} creature with "
                rf"{group('eyes', ATTRIBUTE_PHRASES['eyes'])}"
                rf"(?: and (?:(?P<glasses_color>{_alternatives(accessory_colors)}) glasses|a "
                rf"(?P<accessory_color>{_alternatives(accessory_colors)}) {group('accessory', worn)}))?")
    rest = (rf", {group('expression', ATTRIBUTE_PHRASES['expression'])}, {group('scene', ATTRIBUTE_PHRASES['scene'])}"
            rf", {group('pose', ATTRIBUTE_PHRASES['pose'])}")
    return re.compile(identity, re.IGNORECASE), re.compile(rest, re.IGNORECASE)


def read_description(text: str) -> dict[str, str]:
    """The attributes a `describe` caption in `text` names (its inverse): the five identity attributes when
    the caption describes the creature, plus expression, scene and pose when the caption has them (also
    after a name, as in `describe(attrs, name=...)`); {} when `text` holds no such caption. A described
    creature without an accessory gives `accessory: none` and no accessory colour."""
    identity_pattern, rest_pattern = _caption_patterns()
    identity, rest = identity_pattern.search(text), None
    rest = rest_pattern.match(text, identity.end()) if identity is not None else rest_pattern.search(text)
    found = {k: v.lower() for m in (identity, rest) if m is not None for k, v in m.groupdict().items() if v is not None}
    reverse = {key: {phrase: value for value, phrase in table.items()} for key, table in ATTRIBUTE_PHRASES.items()}
    reverse["body_shape"] = {adj: shape for shape, adj in _SHAPE_ADJECTIVES.items()}
    out: dict[str, str] = {}
    for key, value in found.items():
        if key == "glasses_color":
            out["accessory"], out["accessory_color"] = "glasses", value
        elif key in reverse and key != "accessory":
            out[key] = reverse[key][value]
        else:
            out[key] = value
    if identity is not None:
        out.setdefault("accessory", "none")
    return out


def _reply_patterns() -> dict[str, tuple[re.Pattern[str], dict[str, str]]]:
    """attribute -> (pattern of the words a reply uses for it, words -> value)."""
    tables = {key: {phrase.lower(): value for value, phrase in ATTRIBUTE_PHRASES[key].items()}
              for key in ("scene", "pose")}
    tables["expression"] = {word.lower(): value for value, word in EXPRESSION_WORDS.items()}
    worn = [a for a in ATTRIBUTE_VALUES["accessory"] if a != "none"]
    tables["accessory"] = {f"{c} {a}": f"{a}|{c}" for a in worn for c in ATTRIBUTE_VALUES["accessory_color"]}
    return {key: (re.compile(rf"\b(?:{_alternatives(table)})\b", re.IGNORECASE), table)
            for key, table in tables.items()}


def read_reply(text: str) -> dict[str, str]:
    """The picture attributes a character's reply states, in the words of `image_sentence`: scene, pose and
    expression ("on the beach", "on the left", "smiling"), and an accessory with its colour ("red hat"). An
    attribute named twice with different values is left out (the reply does not say which); {} when the reply
    states nothing about a picture. The sandbox oracle checks the drawn image against this."""
    out: dict[str, str] = {}
    for key, (pattern, table) in _reply_patterns().items():
        values = {table[m.group(0).lower()] for m in pattern.finditer(text)}
        if len(values) != 1:
            continue
        value = values.pop()
        if key == "accessory":
            out["accessory"], out["accessory_color"] = value.split("|")
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class FactText:
    """Everything said about one fact. `{n}` is the character's name, `{v}` the fact's value."""

    topic: str  # for thinking text: "my hometown"
    ask: tuple[str, ...]  # dialogue questions (train)
    ask_test: tuple[str, ...]  # dialogue questions (held-out)
    say: tuple[str, ...]  # the character's statement of the fact
    quiz: tuple[str, str]  # knowledge questions about {n}: (direct, indirect)
    quiz_test: tuple[str, ...]  # held-out paraphrases of the knowledge question
    claim: str  # a statement about {n} for true/false options
    mood: str  # the expression talking about it brings


FACT_TEXT: dict[str, FactText] = {
    "hometown": FactText(
        "my hometown",
        ("Where are you from?", "Where did you grow up?", "What's your hometown like?"),
        ("Which town do you call home?", "Where were you raised?"),
        ("I grew up in {v}, the best place ever.", "I'm from {v}, and I miss it every day."),
        ("What is {n}'s hometown?", "In which place did {n} grow up?"),
        ("{n} was raised in which place?", "Which town does {n} come from?"),
        "{n} grew up in {v}.",
        "happy",
    ),
    "favorite_food": FactText(
        "my favorite food",
        ("What's your favorite food?", "What do you like to eat?", "If you could eat one thing forever, what?"),
        ("What dish makes you happiest?", "What would you order at a restaurant?"),
        ("Nothing beats {v}, I could eat it all day.", "My favorite food is {v}, yum, just thinking of it!"),
        ("What is {n}'s favorite food?", "Which dish would {n} choose over anything else?"),
        ("{n} loves eating which of these?", "Which food does {n} like best?"),
        "{n}'s favorite food is {v}.",
        "happy",
    ),
    "age": FactText(
        "my age",
        ("How old are you?", "What's your age?", "Are you old or young?"),
        ("How many years old are you now?", "Can I ask your age?"),
        ("I'm {v} years old, if you must know.", "I just turned {v} this year, time flies so fast."),
        ("How old is {n}?", "What age is {n}?"),
        ("{n} is how many years old?", "Which is {n}'s age in years?"),
        "{n} is {v} years old.",
        "surprised",
    ),
    "hobby": FactText(
        "my hobby",
        ("What do you do for fun?", "Do you have a hobby?", "How do you spend your free time?"),
        ("What do you do on a free afternoon?", "What pastime do you love most?"),
        ("I love {v}, I could do it for hours.", "My favorite hobby is {v}, it never gets old."),
        ("What is {n}'s hobby?", "What does {n} love doing in free time?"),
        ("Which pastime does {n} enjoy most?", "{n} spends free afternoons doing what?"),
        "{n}'s hobby is {v}.",
        "happy",
    ),
    "best_friend": FactText(
        "my best friend",
        ("Who is your best friend?", "Do you have a best friend?", "Who do you hang out with most?"),
        ("Who is your closest pal?", "Which friend do you trust the most?"),
        ("My best friend is {v}, we do everything together.", "I spend every day with {v}, my very best friend."),
        ("Who is {n}'s best friend?", "Who does {n} spend the most time with?"),
        ("Which of these is {n}'s closest pal?", "{n}'s best friend is who?"),
        "{n}'s best friend is {v}.",
        "happy",
    ),
    "fear": FactText(
        "what scares me",
        ("What are you afraid of?", "What scares you the most?", "Is there anything you fear?"),
        ("What gives you the shivers?", "What would make you run away?"),
        ("Eek, {v}! Even thinking about that scares me so much.", "I am really afraid of {v}, to be completely honest."),
        ("What is {n} afraid of?", "What would make {n} panic?"),
        ("{n} is scared of which of these?", "Which thing frightens {n} most?"),
        "{n} is afraid of {v}.",
        "surprised",
    ),
    "favorite_color": FactText(
        "my favorite color",
        ("What's your favorite color?", "Which color do you like best?", "Do you have a favorite color?"),
        ("Which color would you paint your house?", "What color makes you happiest?"),
        ("My favorite color is {v}, obviously, it suits me best.", "I adore the color {v}, it makes everything brighter."),
        ("What is {n}'s favorite color?", "Which color does {n} like best?"),
        ("{n} would pick which color first?", "Which color does {n} adore?"),
        "{n}'s favorite color is {v}.",
        "happy",
    ),
    "dream": FactText(
        "my dream",
        ("What's your biggest dream?", "What do you wish for?", "What do you want to do someday?"),
        ("What is your secret wish?", "What goal are you working toward?"),
        ("My big dream is {v} someday.", "Someday I want {v}, just watch."),
        ("What is {n}'s biggest dream?", "What does {n} hope to do someday?"),
        ("Which wish is {n}'s biggest?", "{n} dreams of doing what?"),
        "{n}'s big dream is {v}.",
        "happy",
    ),
    "favorite_season": FactText(
        "my favorite season",
        ("What's your favorite season?", "Do you like summer or winter?", "Which time of year is best?"),
        ("Which season do you wait for all year?", "When is the year at its best for you?"),
        ("I love {v} more than any other season.", "Honestly, {v} is the best season, no contest."),
        ("What is {n}'s favorite season?", "Which time of year does {n} love most?"),
        ("{n} waits all year for which season?", "Which season does {n} like best?"),
        "{n}'s favorite season is {v}.",
        "happy",
    ),
    "birthday_month": FactText(
        "my birthday",
        ("When is your birthday?", "What month were you born?", "When should I bring you a cake?"),
        ("In which month do you celebrate your birthday?", "When do you get birthday presents?"),
        ("My birthday is in {v}, so please don't forget it!", "I was born in {v}, so bring cake that month."),
        ("In which month is {n}'s birthday?", "When does {n} celebrate a birthday?"),
        ("{n} was born in which month?", "Which month is {n}'s birthday in?"),
        "{n}'s birthday is in {v}.",
        "happy",
    ),
}
