"""Decoding strategies: how a character's text reply and image relate.

- `chain`: text first, then the image conditioned on the query and that reply — p(T|Q)·p(I|Q,T)
  (UniCharacter's choice).
- `joint`: text and image both from the query alone — p(T|Q)·p(I|Q); cheaper, less coupled.
- `think`: BAGEL's think mode on top of `chain` — the reply, then the character's thinking (a plan of
  the image: `<think>…</think>` and a generation instruction, what the `thinking` task trains), then the
  image with that text in the same context — p(T|Q)·p(R|Q,T)·p(I|Q,T,R). Its t2i examples (and GRPO
  prompts) hold the reference thinking before the image; at inference the model writes its own.

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
    think: bool = False  # generate the thinking text before the image (adapter's `think_and_sample`)


CHAIN = DECODING.register("chain")(
    DecodingStrategy("chain", True, "text reply first, image conditioned on query + reply: p(T|Q) p(I|Q,T)")
)
JOINT = DECODING.register("joint")(
    DecodingStrategy("joint", False, "text and image from the query alone: p(T|Q) p(I|Q)")
)


THINK = DECODING.register("think")(
    DecodingStrategy("think", True, "reply, then thinking text, then the image in the same context: "
                     "p(T|Q) p(R|Q,T) p(I|Q,T,R)", think=True)
)


def get_strategy(name: str) -> DecodingStrategy:
    return DECODING.get(name, where="recipe key `decoding`")
