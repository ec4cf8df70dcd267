"""Characters: the in-memory model, the native on-disk format, validation and loading."""

from __future__ import annotations

from cmrp.data.character import (
    Character,
    CharacterSplit,
    ImageRef,
    MultipleChoice,
    OpenQA,
    Profile,
    Scene,
    T2IItem,
    Turn,
    VQAItem,
)
from cmrp.data.native import read_character, validate_native, write_character
from cmrp.data.validate import Problem, load_character, validate_character_dir

__all__ = [
    "Character",
    "CharacterSplit",
    "ImageRef",
    "MultipleChoice",
    "OpenQA",
    "Problem",
    "Profile",
    "Scene",
    "T2IItem",
    "Turn",
    "VQAItem",
    "load_character",
    "read_character",
    "validate_character_dir",
    "validate_native",
    "write_character",
]
