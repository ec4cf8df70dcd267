"""`cmrp data build`: raw material (profile text, images, seed dialogues) -> a complete native character.

The paper's four annotation stages, each item one request to an OpenAI-compatible chat endpoint:

1. dialogues: new dialogues in the character's style, from the seeds (batches of `per_request`);
2. scene (per image): the user's message, the character's reply that shows the image, the thinking
   process and a generation instruction (also the image's T2I instruction);
3. knowledge QA from the profile: open questions, and 4-option MCQ in an easy / medium / hard mix;
4. VQA (per image): open and 4-option multiple-choice questions.

Every answer is parsed (code fences and chatter stripped, the first JSON object taken) and validated
against the item's schema; a bad answer goes back to the model with the reason. Finished items are
cached (`llm.ResponseCache`), so a build that stops half-way resumes where it stopped. Prompts are the
editable templates in `cmrp/data/prompts/` (string.Template `$name` placeholders); `--prompts DIR`
overrides any of them.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import sys
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from cmrp.data.llm import ChatClient, LLMError, ResponseCache, image_data_url, request_key
from cmrp.data.native import _describe, _join, _undecodable, write_character
from cmrp.errors import DataError
from cmrp.progress import Progress, interactive

__all__ = ["BuildOptions", "build_character", "load_prompts", "load_seed_dialogues", "PROMPT_NAMES"]

PROMPT_NAMES = ("system", "dialogues", "scene", "knowledge_open", "knowledge_mcq", "vqa")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DIFFICULTY_MIX = (("easy", 0.4), ("medium", 0.4), ("hard", 0.2))
CACHE_DIR = ".build-cache"


@dataclass
class BuildOptions:
    """What to build and how to talk to the endpoint (the CLI flags of `cmrp data build`)."""

    profile: Path
    images: Path
    dialogues: Path
    out: Path
    base_url: str
    model: str
    name: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    vision: bool = False
    concurrency: int = 4
    prompts: Path | None = None
    cache: Path | None = None
    new_dialogues: int = 24
    per_request: int = 4
    knowledge_open: int = 20
    knowledge_mcq: int = 12
    vqa_open: int = 5
    vqa_mcq: int = 3
    test_fraction: float = 0.2
    max_attempts: int = 5
    retry_wait: float = 1.0
    timeout: float = 120.0


# ----------------------------------------------------------------------------------------------- inputs


def load_prompts(override: Path | None = None) -> dict[str, str]:
    """The prompt templates: the shipped ones, each replaced by `override/<name>.txt` when that exists."""
    from importlib import resources

    shipped = resources.files("cmrp.data") / "prompts"
    out = {name: (shipped / f"{name}.txt").read_text(encoding="utf-8") for name in PROMPT_NAMES}
    if override is not None:
        if not override.is_dir():
            raise DataError(f"--prompts {override}: not a directory (give a folder of <name>.txt templates: "
                            f"{', '.join(PROMPT_NAMES)})")
        unknown = [p.name for p in override.glob("*.txt") if p.stem not in PROMPT_NAMES]
        if unknown:
            raise DataError(f"--prompts {override}: {', '.join(sorted(unknown))} is not a template name "
                            f"(use {', '.join(n + '.txt' for n in PROMPT_NAMES)})")
        for name in PROMPT_NAMES:
            path = override / f"{name}.txt"
            if path.is_file():
                out[name] = path.read_text(encoding="utf-8")
    return out


def _fill(templates: dict[str, str], name: str, values: dict[str, Any], where: Path | None) -> str:
    try:
        return string.Template(templates[name]).substitute({k: str(v) for k, v in values.items()})
    except KeyError as err:
        src = f"{where}/{name}.txt" if where and (where / f"{name}.txt").is_file() else f"prompt {name}.txt"
        raise DataError(f"{src}: unknown placeholder ${err.args[0]} (use only "
                        f"{', '.join('$' + k for k in values)}; write $$ for a literal $)") from None
    except ValueError as err:
        raise DataError(f"prompt {name}.txt: {err} (write $$ for a literal $)") from None


def _turn_role(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    if value in ("user", "human"):
        return "user"
    if value in ("character", "assistant", "machine"):
        return "character"
    return None


def load_seed_dialogues(path: Path) -> list[Scene]:
    """Seed dialogues: a JSON list of dialogues, each a list of {"role", "text"} turns or {"turns": [...]};
    a RoleScape-style {"scenes": [...]} file works too ("machine" is the character)."""
    where = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"--dialogues {path}: no such file (give a JSON file of seed dialogues)") from None
    except (UnicodeDecodeError, ValueError, RecursionError, OSError) as err:
        raise DataError(f"{where}: (root): cannot be read as JSON: {str(err)[:160]} (fix the file)") from None
    prefix = ""
    if isinstance(data, dict) and "scenes" in data:
        data, prefix = data["scenes"], "scenes"
    if not isinstance(data, list):
        raise DataError(f"{where}: (root): should be a list of dialogues, got {_describe(data)} "
                        '(use [[{"role": "user", "text": "..."}, {"role": "character", "text": "..."}], ...])')
    scenes, errors = [], []
    for i, item in enumerate(data):
        path_i = _join(prefix, i)
        turns_raw = item.get("turns") if isinstance(item, dict) else item
        if not isinstance(turns_raw, list) or not turns_raw:
            errors.append(f"{path_i}: should be a non-empty list of turns, got {_describe(turns_raw)}")
            continue
        turns = []
        for j, turn in enumerate(turns_raw):
            p = _join(path_i, j)
            role = _turn_role(turn.get("role")) if isinstance(turn, dict) else None
            text = turn.get("text") if isinstance(turn, dict) else None
            if role is None:
                errors.append(f"{p}.role: should be \"user\" or \"character\"")
            elif not isinstance(text, str) or not text.strip():
                errors.append(f"{p}.text: should be the turn's text")
            else:
                turns.append(Turn(role, text.strip()))
        if turns:
            scenes.append(Scene(f"seed/{i:03d}", turns))
    if errors:
        shown = "\n  ".join(errors[:20]) + ("\n  ..." if len(errors) > 20 else "")
        raise DataError(f"{where}: {len(errors)} problem(s) in the seed dialogues (fix them):\n  {shown}")
    if not scenes:
        raise DataError(f"{where}: has no dialogue (add at least one seed dialogue)")
    return scenes


def _load_images(folder: Path) -> list[ImageRef]:
    if not folder.is_dir():
        raise DataError(f"--images {folder}: not a directory (give the folder of the character's images)")
    files = sorted((f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()),
                   key=lambda f: (0, int(f.stem), "") if f.stem.isdigit() else (1, 0, f.stem))
    if not files:
        raise DataError(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) (add the character's images)")
    images, bad, used = [], [], set()
    for file in files:
        reason = _undecodable(file)
        if reason:
            bad.append(f"{file.name}: {reason}")
            continue
        image_id = re.sub(r"[^A-Za-z0-9._-]", "_", file.stem) or "image"
        while image_id in used:
            image_id += "_"
        used.add(image_id)
        caption_file = file.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        images.append(ImageRef(image_id, file.resolve(), caption))
    if bad:
        raise DataError(f"--images {folder}: {len(bad)} file(s) are not readable images (replace or remove them):\n  "
                        + "\n  ".join(bad))
    return images


# ----------------------------------------------------------------------------------------------- schemas


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_open(items: Any, where: str) -> tuple[list[dict], str | None]:
    if not isinstance(items, list) or not items:
        return [], f'"{where}" should be a non-empty list of {{"question", "answer"}} objects'
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not _text(item.get("question")) or not _text(item.get("answer")):
            return [], f'{where}[{i}] should be {{"question": "...", "answer": "..."}} with non-empty strings'
        out.append({"question": item["question"].strip(), "answer": item["answer"].strip()})
    return out, None


def _check_mcq(items: Any, where: str) -> tuple[list[dict], str | None]:
    if not isinstance(items, list) or not items:
        return [], f'"{where}" should be a non-empty list of {{"question", "options", "answer"}} objects'
    out = []
    for i, item in enumerate(items):
        p = f"{where}[{i}]"
        if not isinstance(item, dict) or not _text(item.get("question")):
            return [], f'{p} should be an object with a non-empty "question"'
        options = item.get("options")
        if isinstance(options, dict):
            options = list(options.values())
        if not isinstance(options, list) or len(options) != 4 or not all(_text(o) for o in options):
            return [], f"{p}.options should be a list of exactly 4 non-empty strings"
        if len({o.strip().lower() for o in options}) != 4:
            return [], f"{p}.options should be 4 different options"
        answer = item.get("answer")
        if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in "ABCD":
            answer = "ABCD".index(answer.strip().upper())
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
            return [], f"{p}.answer should be the 0-based index (0 to 3) of the correct option"
        out.append({"question": item["question"].strip(), "options": [o.strip() for o in options], "answer": answer})
    return out, None


def _schema_dialogues(value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, dict) or not isinstance(value.get("dialogues"), list) or not value["dialogues"]:
        return None, 'expected {"dialogues": [...]} with at least one dialogue'
    out = []
    for i, item in enumerate(value["dialogues"]):
        turns = item.get("turns") if isinstance(item, dict) else item
        if not isinstance(turns, list) or len(turns) < 2:
            return None, f"dialogues[{i}].turns should be a list of at least 2 turns"
        clean = []
        for j, turn in enumerate(turns):
            role = _turn_role(turn.get("role")) if isinstance(turn, dict) else None
            if role is None or not _text(turn.get("text")):
                return None, f'dialogues[{i}].turns[{j}] should be {{"role": "user"|"character", "text": "..."}}'
            clean.append({"role": role, "text": turn["text"].strip()})
        if clean[0]["role"] != "user" or not any(t["role"] == "character" for t in clean):
            return None, f"dialogues[{i}] should start with the user and contain a character turn"
        out.append(clean)
    return out, None


def _schema_scene(value: Any) -> tuple[Any, str | None]:
    keys = ("user", "character", "thinking", "generation_instruction")
    if not isinstance(value, dict):
        return None, "expected a JSON object with " + ", ".join(f'"{k}"' for k in keys)
    missing = [k for k in keys if not _text(value.get(k))]
    if missing:
        return None, "missing or empty: " + ", ".join(f'"{k}"' for k in missing) + " (all four are non-empty strings)"
    return {k: value[k].strip() for k in keys}, None


def _schema_knowledge_open(value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, dict):
        return None, 'expected {"open": [...]}'
    return _check_open(value.get("open"), "open")


def _schema_knowledge_mcq(value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, dict):
        return None, 'expected {"mcq": [...]}'
    return _check_mcq(value.get("mcq"), "mcq")


def _schema_vqa(value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, dict):
        return None, 'expected {"open": [...], "mcq": [...]}'
    open_items, error = _check_open(value.get("open"), "open")
    if error:
        return None, error
    mcq, error = _check_mcq(value.get("mcq"), "mcq")
    if error:
        return None, error
    return {"open": open_items, "mcq": mcq}, None


SCHEMAS: dict[str, Callable[[Any], tuple[Any, str | None]]] = {
    "dialogues": _schema_dialogues,
    "scene": _schema_scene,
    "knowledge_open": _schema_knowledge_open,
    "knowledge_mcq": _schema_knowledge_mcq,
    "vqa": _schema_vqa,
}


# ----------------------------------------------------------------------------------------------- items


@dataclass
class _Item:
    label: str
    kind: str
    messages: list[dict]
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    value: Any = None


def _user_message(text: str, image: ImageRef | None, vision: bool) -> dict:
    if image is None or not vision:
        return {"role": "user", "content": text}

    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": image_data_url(image.path)}}]}


def _image_note(image: ImageRef, vision: bool) -> str:
    parts = []
    if vision:
        parts.append("The image is attached.")
    if image.caption:
        parts.append(f"Description of the image: {image.caption}")
    if not parts:
        parts.append(f"(The image itself is not attached; its file name is {image.path.name}.)")
    return " ".join(parts)


def _format_seeds(seeds: list[Scene]) -> str:
    blocks = []
    for scene in seeds[:8]:
        blocks.append("\n".join(f"{'User' if t.role == 'user' else 'Character'}: {t.text}" for t in scene.turns))
    return "\n\n".join(blocks)


def _difficulty_counts(total: int) -> list[tuple[str, int]]:
    raw = [(name, total * share) for name, share in DIFFICULTY_MIX]
    counts = {name: math.floor(x) for name, x in raw}
    for name, _ in sorted(raw, key=lambda r: r[1] - math.floor(r[1]), reverse=True)[: total - sum(counts.values())]:
        counts[name] += 1
    return [(name, counts[name]) for name, _ in DIFFICULTY_MIX if counts[name] > 0]


def _plan(opts: BuildOptions, name: str, profile: str, images: list[ImageRef], seeds: list[Scene],
          templates: dict[str, str]) -> list[_Item]:
    system = {"role": "system", "content": templates["system"].strip()}
    base = {"name": name, "profile": profile}
    items: list[_Item] = []

    def add(label: str, kind: str, values: dict, image: ImageRef | None = None, **meta: Any) -> None:
        text = _fill(templates, kind, {**base, **values}, opts.prompts)
        items.append(_Item(label, kind, [system, _user_message(text, image, opts.vision)], meta))

    batches = math.ceil(opts.new_dialogues / opts.per_request) if opts.new_dialogues > 0 else 0
    for b in range(batches):
        count = min(opts.per_request, opts.new_dialogues - b * opts.per_request)
        add(f"dialogues batch {b + 1}/{batches}", "dialogues",
            {"seeds": _format_seeds(seeds), "count": count, "batch": b + 1}, batch=b, count=count)
    for image in images:
        note = _image_note(image, opts.vision)
        add(f"scene {image.id}", "scene", {"image_id": image.id, "image_note": note}, image, image_id=image.id)
    if opts.knowledge_open > 0:
        add("knowledge open", "knowledge_open", {"count": opts.knowledge_open}, count=opts.knowledge_open)
    for difficulty, count in _difficulty_counts(opts.knowledge_mcq):
        add(f"knowledge mcq {difficulty}", "knowledge_mcq", {"count": count, "difficulty": difficulty},
            difficulty=difficulty, count=count)
    if opts.vqa_open > 0 and opts.vqa_mcq > 0:
        for image in images:
            note = _image_note(image, opts.vision)
            add(f"vqa {image.id}", "vqa", {"image_id": image.id, "image_note": note, "open_count": opts.vqa_open,
                                           "mcq_count": opts.vqa_mcq}, image, image_id=image.id)
    return items


def _run(items: list[_Item], opts: BuildOptions, log: Callable[[str], None]) -> None:
    """Fill `item.value` for every item, from the cache or the endpoint, N at a time."""
    api_key = os.environ.get(opts.api_key_env) or None
    if api_key is None:
        log(f"note: ${opts.api_key_env} is not set; requests are sent without an API key")
    client = ChatClient(opts.base_url, opts.model, api_key, timeout=opts.timeout, max_attempts=opts.max_attempts,
                        retry_wait=opts.retry_wait)
    cache = ResponseCache(opts.cache or opts.out / CACHE_DIR)
    todo = []
    for item in items:
        item.key = request_key(opts.model, item.messages)
        cached = cache.get(item.key)
        if cached is not None and SCHEMAS[item.kind](_as_answer(item.kind, cached))[1] is None:
            item.value = cached
        else:
            todo.append(item)
    done, total, lock = len(items) - len(todo), len(items), threading.Lock()
    log(f"{total} items: {done} cached, {len(todo)} to request from {opts.base_url} (model {opts.model}, "
        f"{opts.concurrency} at a time)")
    failures: list[str] = []
    bar = Progress(len(todo), "data build", unit="item") if interactive() and todo else None  # lines otherwise

    def work(item: _Item) -> None:
        item.value = client.complete_json(item.messages, SCHEMAS[item.kind], label=item.label)
        cache.put(item.key, item.label, item.value)

    pool = ThreadPoolExecutor(max_workers=max(1, opts.concurrency))
    try:
        pending = {pool.submit(work, item): item for item in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                item = pending.pop(future)
                error = future.exception()
                with lock:
                    done += 1
                    if error is not None:
                        message = str(error) if isinstance(error, LLMError) else f"{type(error).__name__}: {error}"
                        failures.append(message)
                        (bar.write if bar is not None else log)(f"[{done}/{total}] {item.label}: FAILED: {message}")
                    elif bar is None:
                        log(f"[{done}/{total}] {item.label}: done")
                    if bar is not None:
                        bar.update(1, failed=len(failures))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    if failures:
        raise LLMError(f"{len(failures)} of {total} items failed ({failures[0]}); the {total - len(failures)} "
                       "finished items are cached: run the same command again to resume")


def _as_answer(kind: str, value: Any) -> Any:
    """A cached (validated) value in the shape its schema accepts, to re-check it on resume."""
    if kind == "dialogues":
        return {"dialogues": value}
    if kind in ("knowledge_open",):
        return {"open": value}
    if kind == "knowledge_mcq":
        return {"mcq": value}
    return value


# ----------------------------------------------------------------------------------------------- assembly


def _assemble(opts: BuildOptions, name: str, profile: str, images: list[ImageRef], seeds: list[Scene],
              items: list[_Item]) -> Character:
    n_test = round(len(images) * opts.test_fraction) if len(images) >= 2 else 0
    test_ids = {image.id for image in images[len(images) - n_test:]} if n_test else set()
    train = CharacterSplit(images={i.id: i for i in images if i.id not in test_ids}, scenes=list(seeds))
    test = CharacterSplit(images={i.id: i for i in images if i.id in test_ids})
    mcq_every = round(1 / opts.test_fraction) if opts.test_fraction > 0 else 0
    mcq_index = 0
    for item in items:
        value = item.value
        if item.kind == "dialogues":
            for k, turns in enumerate(value):
                scene_turns = [Turn(t["role"], t["text"]) for t in turns]
                train.scenes.append(Scene(f"expanded/{item.meta['batch']:03d}-{k:02d}", scene_turns))
        elif item.kind == "scene":
            image_id = item.meta["image_id"]
            split = test if image_id in test_ids else train
            split.scenes.append(Scene(f"image/{image_id}", [
                Turn("user", value["user"]),
                Turn("character", value["character"], image_id, value["thinking"], value["generation_instruction"]),
            ]))
            split.t2i.append(T2IItem(value["generation_instruction"], image_id))
        elif item.kind == "knowledge_open":
            train.knowledge_open += [OpenQA(q["question"], q["answer"]) for q in value]
        elif item.kind == "knowledge_mcq":
            for q in value:
                mcq_index += 1
                split = test if mcq_every and mcq_index % mcq_every == 0 else train
                split.knowledge_mcq.append(MultipleChoice(q["question"], q["options"], q["answer"],
                                                          item.meta["difficulty"]))
        elif item.kind == "vqa":
            image_id = item.meta["image_id"]
            split = test if image_id in test_ids else train
            split.vqa.append(VQAItem(image_id, [OpenQA(q["question"], q["answer"]) for q in value["open"]],
                                     [MultipleChoice(q["question"], q["options"], q["answer"]) for q in value["mcq"]]))
    fields = {"source": "cmrp data build", "model": opts.model}
    return Character(name, Profile(profile, fields), train, test, source_format="native")


def _check_out(out: Path, cache: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out}: is a file (give a directory for the character)")
    entries = [p for p in out.iterdir() if p.resolve() != cache.resolve()]
    if entries and not (out / "character.json").is_file():
        raise DataError(f"--out {out}: is not empty and holds no character (choose an empty or new directory)")


def build_character(opts: BuildOptions, log: Callable[[str], None] | None = None) -> Path:
    """Run the four stages (resuming from the cache) and write the native character; returns its directory."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if opts.concurrency < 1:
        raise DataError(f"--concurrency {opts.concurrency}: must be at least 1")
    if not 0 <= opts.test_fraction < 1:
        raise DataError(f"--test-fraction {opts.test_fraction}: must be in [0, 1)")
    if opts.per_request < 1 or opts.max_attempts < 1:
        raise DataError("--per-request and --max-attempts must be at least 1")
    out = opts.out.expanduser().resolve()
    opts.out = out
    _check_out(out, opts.cache or out / CACHE_DIR)
    try:
        profile = opts.profile.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"--profile {opts.profile}: cannot be read ({err}) (give a UTF-8 text file)") from None
    if not profile:
        raise DataError(f"--profile {opts.profile}: is empty (describe the character in it)")
    name = (opts.name or opts.profile.stem).strip()
    images = _load_images(opts.images)
    seeds = load_seed_dialogues(opts.dialogues)
    templates = load_prompts(opts.prompts)
    items = _plan(opts, name, profile, images, seeds, templates)
    _run(items, opts, log)
    character = _assemble(opts, name, profile, images, seeds, items)
    path = write_character(character, out)
    log(f"wrote {name} to {path}")
    return path
