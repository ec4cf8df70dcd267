"""Decoding strategies: how a character's text reply and image relate.

- `chain`: text first, then the image conditioned on the query and that reply — p(T|Q)·p(I|Q,T)
  (UniCharacter's choice).
- `joint`: text and image both from the query alone — p(T|Q)·p(I|Q); cheaper, less coupled.

A strategy decides what context the image is generated from; training-data construction
(`cmrp.data.tasks`) and evaluation read `image_sees_reply` from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from cmrp.registry import DECODING

__all__ = ["DecodingStrategy", "get_strategy"]


@dataclass(frozen=True)
class DecodingStrategy:
    name: str
    image_sees_reply: bool
    description: str


CHAIN = DECODING.register("chain")(
    DecodingStrategy("chain", True, "text reply first, image conditioned on query + reply: p(T|Q) p(I|Q,T)")
)
JOINT = DECODING.register("joint")(
    DecodingStrategy("joint", False, "text and image from the query alone: p(T|Q) p(I|Q)")
)


def get_strategy(name: str) -> DecodingStrategy:
    return DECODING.get(name, where="recipe key `decoding`")
