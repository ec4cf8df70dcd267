"""The sandbox world: procedurally generated characters whose images and facts have exact ground truth.

Used by the quickstart (`data.path: sandbox://SEED`) and the tests, so the whole pipeline runs
on CPU in minutes and every answer can be checked by code.
"""

from __future__ import annotations

from cmrp.sandbox.persona import make_persona
from cmrp.sandbox.renderer import ATTRIBUTE_VALUES, IDENTITY_ATTRIBUTES, IMAGE_ATTRIBUTES, render
from cmrp.sandbox.templates import describe
from cmrp.sandbox.world import build_character
from cmrp.sandbox.writer import make_character, write_sandbox_character

__all__ = [
    "ATTRIBUTE_VALUES",
    "IDENTITY_ATTRIBUTES",
    "IMAGE_ATTRIBUTES",
    "build_character",
    "describe",
    "make_character",
    "make_persona",
    "render",
    "write_sandbox_character",
]
