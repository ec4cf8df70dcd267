"""Show-o's official prompt layout, applied to cmrp's role-play examples.

The official templates (showlab/Show-o, `UniversalPrompting` and the inference scripts):
- text-to-image: `<|t2i|> <|sot|> {text} <|eot|> <|soi|> {image} <|eoi|>`; the unconditional prompt is
  `<|t2i|> <|sot|> <|eot|>`;
- understanding: `<|mmu|> <|soi|> {image} <|eoi|> <|sot|> USER: \\n{question} ASSISTANT:`, the answer then
  `<|eot|>` — LLaVA's "phi1.5" conversation (roles USER / ASSISTANT, a space after a user message and
  `<|endoftext|>` = `<|eot|>` after an answer; the newline before the question is what is left of
  LLaVA's `<image>\\n` marker);
- language modelling: `<|sot|> {text} <|eot|>`, no task token.

A role-play example is said in these words and no others: images the user shares come first (Show-o
reads images before text), a persona/system text is the conversation's system prefix ("{system} USER:
..."), dialogue turns are USER / ASSISTANT messages (a user turn that shared an image keeps the
newline), a generated image follows the text that asks for it, and a t2i prompt that is one lone
user message is that message alone (the caption of the official t2i template).
"""

from __future__ import annotations

from dataclasses import dataclass

from cmrp.data.tasks import Segment

__all__ = ["Piece", "render"]

USER, ASSISTANT = "USER", "ASSISTANT"


@dataclass
class Piece:
    """One part of a Show-o sequence: `text` (a string to tokenise, a target if `trained`), `token` (a
    special token by name: <|t2i|> <|mmu|> <|sot|> <|eot|>) or `image` (an image block; `segment` None: the
    image to be generated after a sampling prompt)."""

    kind: str
    text: str = ""
    trained: bool = False
    segment: Segment | None = None
    generate: bool = False


def render(segments: list[Segment], *, generate_after: bool = False, stop: bool = False) -> tuple[str, list[Piece]]:
    """(task, pieces) of one example: task "t2i" | "mmu" | "lm" (which task token leads, if any).

    `generate_after`: a sampling prompt, ending with the image block to generate. `stop`: a text-generation
    prompt, ending just before the first trained text (after "ASSISTANT:")."""
    gen = generate_after or any(s.kind == "image" and s.generate for s in segments)
    understood = [s for s in segments if s.kind == "image" and not s.generate]
    task = "t2i" if gen else "mmu" if understood else "lm"
    pieces: list[Piece] = [] if task == "lm" else [Piece("token", f"<|{task}|>")]
    pieces += [Piece("image", segment=s) for s in understood]
    block: list[Segment] = []
    for seg in segments:
        if seg.kind == "image" and seg.generate:
            pieces += _text_block(block, task, stop=False, before_image=True)[0]
            pieces.append(Piece("image", segment=seg, trained=seg.train, generate=True))
            block = []
        else:
            block.append(seg)
    tail, stopped = _text_block(block, task, stop=stop, before_image=generate_after)
    pieces += tail
    if stop and not stopped:
        raise ValueError("the context has no trained text to stop at")
    if generate_after:
        pieces.append(Piece("image", generate=True))
    return task, pieces


def _text_block(segments: list[Segment], task: str, *, stop: bool,
                before_image: bool) -> tuple[list[Piece], bool]:
    """`<|sot|> text <|eot|>` for the text segments (images only mark their user turn); (pieces, stopped).
    No text before a generated image: the official empty prompt `<|sot|> <|eot|>`."""
    texts = [s for s in segments if s.kind == "text"]
    if not texts:
        return ([Piece("token", "<|sot|>"), Piece("token", "<|eot|>")] if before_image else []), False
    turns: list[tuple[str, list[Segment]]] = []
    for seg in segments:
        if turns and turns[-1][0] == seg.role:
            turns[-1][1].append(seg)
        else:
            turns.append((seg.role, [seg]))
    out = [Piece("token", "<|sot|>")]
    lone = task == "t2i" and len(turns) == 1 and turns[0][0] == "user" and len(texts) == 1
    if lone:  # the official t2i caption
        out.append(Piece("text", texts[0].text, trained=texts[0].train))
        return [*out, Piece("token", "<|eot|>")], False
    for i, (role, segs) in enumerate(turns):
        sep = "" if i == len(turns) - 1 else " "
        body = "\n".join(s.text for s in segs if s.kind == "text")
        if role == "system":
            out.append(Piece("text", body + sep))
        elif role == "user":
            shared = "\n" if any(s.kind == "image" for s in segs) else ""
            out.append(Piece("text", f"{USER}: {shared}{body}{sep}"))
        else:
            out.append(Piece("text", f"{ASSISTANT}:"))
            lead = " "
            for seg in (s for s in segs if s.kind == "text"):
                if stop and seg.train:
                    return out, True
                out.append(Piece("text", lead + seg.text, trained=seg.train))
                lead = "\n"
            out.append(Piece("token", "<|eot|>", trained=segs[-1].train))
    if out[-1].kind != "token":
        out.append(Piece("token", "<|eot|>"))
    return out, False
