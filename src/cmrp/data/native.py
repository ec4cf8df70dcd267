"""The native character format: a directory of JSON files and PNGs, read and written without loss.

Layout::

    character.json        {"format": "cmrp-character", "version": 1, "name": ..., "profile": {"text", "fields"}}
    train/data.json       images, scenes, knowledge_qa, vqa, t2i, judge_questions
    train/images/*.png    "file" paths in data.json are relative to the split directory
    test/...              the held-out split, same layout

Reading checks everything in one pass and reports every problem with its file and JSON path, so
parsing and validation can never disagree. Image paths may not leave the character directory
(absolute paths, `..`, symlinks pointing outside): a dataset must not make cmrp read arbitrary files.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
from collections.abc import Iterable
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
from cmrp.data.images import ImageTooLarge, open_image
from cmrp.data.problems import DataFormat, Problem, errors_of, problems_error
from cmrp.errors import DataError
from cmrp.jsonio import write_json
from cmrp.registry import FORMATS

__all__ = [
    "CHARACTER_FILE",
    "DATA_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SPLITS",
    "inspect_native",
    "read_character",
    "validate_native",
    "write_character",
]

FORMAT_NAME = "cmrp-character"
FORMAT_VERSION = 1
CHARACTER_FILE = "character.json"
DATA_FILE = "data.json"
SPLITS = ("train", "test")
ROLES = ("user", "character")

_HEADER_KEYS = ("format", "version", "name", "profile")
_SPLIT_KEYS = ("images", "scenes", "knowledge_qa", "vqa", "t2i", "judge_questions")
_KIND_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ----------------------------------------------------------------------------------------------- reading


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not _IDENTIFIER.match(key):
        return f"{path}[{json.dumps(key)}]"
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value!r:.40}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return "a list" if isinstance(value, list) else "an object"


def _is_kind(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


class _Doc:
    """One JSON file being read: typed access to its fields that records a Problem for every mismatch.

    Getters return None for a missing or invalid field, so parsing goes on and finds every problem.
    """

    def __init__(self, file: str, problems: list[Problem]):
        self.file, self.problems = file, problems

    def error(self, field: str, message: str) -> None:
        self.problems.append(Problem(self.file, field or "(root)", message, "error"))

    def warn(self, field: str, message: str) -> None:
        self.problems.append(Problem(self.file, field or "(root)", message, "warning"))

    def get(self, obj: dict, key: str, path: str, kind: type, *, required: bool = True, fix: str = "") -> Any:
        field = _join(path, key)
        fix = fix or f"set it to {_KIND_NAMES[kind]}"
        value = obj.get(key)
        if value is None:
            if required:
                self.error(field, f"{'is null' if key in obj else 'is missing'} ({fix})")
            return None
        if not _is_kind(value, kind):
            self.error(field, f"should be {_KIND_NAMES[kind]}, got {_describe(value)} ({fix})")
            return None
        return value

    def objects(self, obj: dict, key: str, path: str, *, required: bool = False, fix: str = "") -> list[tuple[str, dict]]:
        """The objects of a list field, each with its path; non-object entries are reported."""
        items = self.get(obj, key, path, list, required=required, fix=fix or "set it to a list of objects")
        out = []
        for i, item in enumerate(items or []):
            item_path = _join(_join(path, key), i)
            if isinstance(item, dict):
                out.append((item_path, item))
            else:
                self.error(item_path, f"should be an object, got {_describe(item)} (use a JSON object {{...}})")
        return out

    def strings(self, obj: dict, key: str, path: str, *, required: bool = True) -> list[str] | None:
        values = self.get(obj, key, path, list, required=required, fix="set it to a list of strings")
        if values is None:
            return None
        bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
        for i in bad:
            self.error(_join(_join(path, key), i), f"should be a string, got {_describe(values[i])} (quote it)")
        return None if bad else values

    def known_keys(self, obj: dict, path: str, known: Iterable[str]) -> None:
        """Unknown keys would be silently ignored: say so (usually a misspelling)."""
        known = tuple(known)
        for key in obj:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
                self.warn(_join(path, str(key)), f"unknown key, ignored ({hint})")


def _read_json(root: Path, name: str, problems: list[Problem], *, required: bool) -> dict | None:
    doc = _Doc(name, problems)
    path = root / name
    if not path.is_file():
        if required:
            doc.error("(file)", f"does not exist (create {name}; see the layout in `cmrp.data.native`)")
        else:
            doc.warn("(file)", f"does not exist, so there is no {name.split('/')[0]} split (add it to evaluate on held-out items)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        doc.error("(root)", f"is not UTF-8 text (byte {err.start}) (save the file as UTF-8)")
        return None
    except json.JSONDecodeError as err:
        doc.error("(root)", f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg} (fix the JSON syntax there)")
        return None
    except (ValueError, RecursionError) as err:  # huge integers, absurd nesting
        doc.error("(root)", f"cannot be parsed: {err} (simplify the file)")
        return None
    except OSError as err:
        doc.error("(file)", f"cannot be read: {err.strerror} (check its permissions)")
        return None
    if not isinstance(data, dict):
        doc.error("(root)", f"should be a JSON object {{...}}, got {_describe(data)} (wrap the content in an object)")
        return None
    for field, value in _non_finite(data, ""):
        doc.error(field, f"is {value}, which is not a number (JSON has no NaN or infinity; write a finite number)")
    return data


def _non_finite(value: Any, path: str, limit: int = 20) -> list[tuple[str, str]]:
    """Where Python's JSON reader let NaN, Infinity or an overflowing number (1e400) in: (path, what), at most
    `limit` of them. Iterative, since a file may nest deeply."""
    found: list[tuple[str, str]] = []
    stack = [(value, path)]
    while stack and len(found) < limit:
        item, at = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            found.append((at or "(root)", "NaN" if math.isnan(item) else "infinite"))
        elif isinstance(item, dict):
            stack += [(v, _join(at, str(k))) for k, v in reversed(item.items())]
        elif isinstance(item, list):
            stack += [(v, _join(at, i)) for i, v in reversed(list(enumerate(item)))]
    return found


def _undecodable(path: Path) -> str | None:
    """Why PIL cannot decode the image at `path` (or why cmrp will not: too many pixels), or None when it can."""
    try:
        with open_image(path) as image:
            image.verify()  # checksums and structure
        with open_image(path) as image:
            image.load()  # the pixel data itself
    except ImageTooLarge as err:
        return err.reason
    except Exception as err:  # noqa: BLE001 - PIL raises many unrelated types for corrupt files
        return f"{type(err).__name__}: {err}"
    return None


def _image_path(doc: _Doc, field: str, file: str, root: Path, split: str) -> Path | None:
    """The checked absolute path of an image file, or None after reporting why it is unusable."""
    example = '(use a path relative to the split directory, e.g. "images/0001.png")'
    rel = Path(file)
    if not file.strip():
        doc.error(field, f"is empty {example}")
        return None
    if rel.is_absolute():
        doc.error(field, f"{file!r} is an absolute path, which could point anywhere {example}")
        return None
    if ".." in rel.parts:
        doc.error(field, f"{file!r} uses '..' to leave {split}/ {example}")
        return None
    try:
        target = (root / split / rel).resolve()
        if not target.is_relative_to(root.resolve()):
            doc.error(field, f"{file!r} resolves to {target}, outside the character directory "
                             "(copy the image into the directory instead of linking to it)")
            return None
        if not target.is_file():
            what = "is a directory" if target.is_dir() else "does not exist"
            doc.error(field, f"{split}/{file} {what} (add the image file or fix the path)")
            return None
    except (OSError, ValueError, RuntimeError) as err:
        doc.error(field, f"{file!r} cannot be used as a path: {err} {example}")
        return None
    reason = _undecodable(target)
    if reason:
        doc.error(field, f"{split}/{file} is not a readable image ({reason}) (replace it with a valid PNG or JPEG)")
        return None
    return target


def _parse_images(doc: _Doc, data: dict, root: Path, split: str) -> tuple[dict[str, ImageRef], set[str]]:
    """The valid images, and every declared id (so references to a broken image are not reported twice)."""
    images: dict[str, ImageRef] = {}
    first_seen: dict[str, str] = {}
    for path, item in doc.objects(data, "images", ""):
        doc.known_keys(item, path, ("id", "file", "caption", "attributes"))
        image_id = doc.get(item, "id", path, str, fix='give the image a unique id, e.g. "0001"')
        file = doc.get(item, "file", path, str, fix='set it to the image path, e.g. "images/0001.png"')
        caption = doc.get(item, "caption", path, str, required=False)
        attributes = doc.get(item, "attributes", path, dict, required=False)
        if image_id is not None:
            if image_id in first_seen:
                doc.error(_join(path, "id"), f"{image_id!r} is already the id of {first_seen[image_id]} (make image ids unique)")
                continue
            first_seen[image_id] = path
        target = _image_path(doc, _join(path, "file"), file, root, split) if file is not None else None
        if image_id is not None and target is not None:
            images[image_id] = ImageRef(image_id, target, caption or "", attributes or {})
    return images, set(first_seen)


def _check_image_id(doc: _Doc, obj: dict, path: str, known: set[str], split: str, *, required: bool) -> str | None:
    image_id = doc.get(obj, "image_id", path, str, required=required, fix="set it to the id of an image of this split")
    if image_id is not None and image_id not in known:
        doc.error(_join(path, "image_id"), f"{image_id!r} is not the id of any image in {split}/{DATA_FILE} "
                                           "(add the image to \"images\" or fix the id)")
        return None
    return image_id


def _parse_turn(doc: _Doc, path: str, item: dict, known: set[str], split: str) -> Turn:
    doc.known_keys(item, path, ("role", "text", "image_id", "thinking", "generation_instruction"))
    role = doc.get(item, "role", path, str, fix='set it to "user" or "character"')
    if role is not None and role not in ROLES:
        doc.error(_join(path, "role"), f"is {role!r}, not a known role (use \"user\" or \"character\")")
    text = doc.get(item, "text", path, str)
    image_id = _check_image_id(doc, item, path, known, split, required=False)
    thinking = doc.get(item, "thinking", path, str, required=False)
    instruction = doc.get(item, "generation_instruction", path, str, required=False)
    return Turn("character" if role == "character" else "user", text or "", image_id, thinking, instruction)


def _parse_scenes(doc: _Doc, data: dict, known: set[str], split: str) -> list[Scene]:
    scenes, seen = [], {}
    for path, item in doc.objects(data, "scenes", ""):
        doc.known_keys(item, path, ("id", "turns", "context_turns"))
        scene_id = doc.get(item, "id", path, str, fix='give the scene an id, e.g. "scene_001"')
        if scene_id is not None:
            if scene_id in seen:
                doc.warn(_join(path, "id"), f"{scene_id!r} is also the id of {seen[scene_id]} (make scene ids unique)")
            seen.setdefault(scene_id, path)
        fix = 'set it to a list of turns, e.g. [{"role": "user", "text": "Hi!"}, {"role": "character", "text": "..."}]'
        turns = doc.objects(item, "turns", path, required=True, fix=fix)
        if "turns" in item and isinstance(item["turns"], list) and not item["turns"]:
            doc.error(_join(path, "turns"), f"is empty ({fix})")
        context = doc.get(item, "context_turns", path, int, required=False) or 0
        if context < 0 or context >= max(1, len(turns)):
            doc.error(_join(path, "context_turns"), f"is {context}; the scene has {len(turns)} turn(s) (count the "
                                                    "turns before the held-out reply, or leave it out)")
        scenes.append(Scene(scene_id or "", [_parse_turn(doc, p, t, known, split) for p, t in turns], context))
    return scenes


def _parse_open(doc: _Doc, obj: dict, path: str) -> list[OpenQA]:
    out = []
    for p, item in doc.objects(obj, "open", path):
        doc.known_keys(item, p, ("question", "answer"))
        question, answer = doc.get(item, "question", p, str), doc.get(item, "answer", p, str)
        out.append(OpenQA(question or "", answer or ""))
    return out


def _parse_mcq(doc: _Doc, obj: dict, path: str) -> list[MultipleChoice]:
    out = []
    for p, item in doc.objects(obj, "mcq", path):
        doc.known_keys(item, p, ("question", "options", "answer", "difficulty"))
        question = doc.get(item, "question", p, str)
        options = doc.strings(item, "options", p)
        answer = doc.get(item, "answer", p, int, fix="use the 0-based index of the correct option, e.g. 0 for the first")
        difficulty = doc.get(item, "difficulty", p, str, required=False)
        if options is not None and len(options) < 2:
            doc.error(_join(p, "options"), f"has {len(options)} option(s) (give at least 2)")
        elif options is not None and answer is not None and not 0 <= answer < len(options):
            doc.error(_join(p, "answer"), f"is {answer}, but there are {len(options)} options "
                                          f"(use an index from 0 to {len(options) - 1})")
        out.append(MultipleChoice(question or "", options or [], answer or 0, difficulty))
    return out


def _parse_qa_block(doc: _Doc, obj: dict, path: str, extra_keys: tuple[str, ...] = ()) -> tuple[list[OpenQA], list[MultipleChoice]]:
    doc.known_keys(obj, path, ("open", "mcq", *extra_keys))
    return _parse_open(doc, obj, path), _parse_mcq(doc, obj, path)


def _parse_judge(doc: _Doc, data: dict) -> dict[str, list[str]]:
    block = doc.get(data, "judge_questions", "", dict, required=False, fix='use {"memorization": [...], "personality": [...]}')
    out = {}
    for key in block or {}:
        questions = doc.strings(block, key, "judge_questions")
        if questions is not None:
            out[key] = questions
    return out


def _parse_split(root: Path, split: str, problems: list[Problem]) -> CharacterSplit:
    name = f"{split}/{DATA_FILE}"
    data = _read_json(root, name, problems, required=split == "train")
    if data is None:
        return CharacterSplit()
    doc = _Doc(name, problems)
    doc.known_keys(data, "", _SPLIT_KEYS)
    images, known = _parse_images(doc, data, root, split)
    out = CharacterSplit(images=images, scenes=_parse_scenes(doc, data, known, split))
    knowledge = doc.get(data, "knowledge_qa", "", dict, required=False, fix='use {"open": [...], "mcq": [...]}')
    if knowledge is not None:
        out.knowledge_open, out.knowledge_mcq = _parse_qa_block(doc, knowledge, "knowledge_qa")
    for path, item in doc.objects(data, "vqa", ""):
        image_id = _check_image_id(doc, item, path, known, split, required=True)
        qa_open, qa_mcq = _parse_qa_block(doc, item, path, ("image_id",))
        out.vqa.append(VQAItem(image_id or "", qa_open, qa_mcq))
    for path, item in doc.objects(data, "t2i", ""):
        doc.known_keys(item, path, ("instruction", "image_id", "caption"))
        instruction = doc.get(item, "instruction", path, str)
        caption = doc.get(item, "caption", path, str, required=False)
        image_id = _check_image_id(doc, item, path, known, split, required=False)
        out.t2i.append(T2IItem(instruction or "", image_id, caption))
    out.judge_questions = _parse_judge(doc, data)
    _warn_unlisted_images(root, split, data, problems)
    return out


def _warn_unlisted_images(root: Path, split: str, data: dict, problems: list[Problem]) -> None:
    """Images on disk that data.json does not list would be silently unused: say so."""
    folder = root / split / "images"
    if not folder.is_dir() or folder.is_symlink():
        return
    entries = data.get("images") if isinstance(data.get("images"), list) else []
    listed = {os.path.normpath(e["file"]) for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)}
    for file in sorted(folder.iterdir()):
        if file.is_file() and f"images{os.sep}{file.name}" not in listed:
            problems.append(Problem(f"{split}/images/{file.name}", "(file)",
                                    f"is not listed in {split}/{DATA_FILE} \"images\" (add an entry for it or delete it)",
                                    "warning"))


def _parse_header(root: Path, problems: list[Problem]) -> tuple[str, Profile]:
    data = _read_json(root, CHARACTER_FILE, problems, required=True)
    if data is None:
        return "", Profile("")
    doc = _Doc(CHARACTER_FILE, problems)
    doc.known_keys(data, "", _HEADER_KEYS)
    fmt = doc.get(data, "format", "", str, fix=f'set "format": "{FORMAT_NAME}"')
    if fmt is not None and fmt != FORMAT_NAME:
        doc.error("format", f"is {fmt!r}, not {FORMAT_NAME!r} (this is not a native cmrp character; try --format)")
    version = doc.get(data, "version", "", int, fix=f'set "version": {FORMAT_VERSION}')
    if version is not None and version != FORMAT_VERSION:
        doc.error("version", f"is {version}, but this cmrp reads version {FORMAT_VERSION} (upgrade cmrp or rewrite the file)")
    name = doc.get(data, "name", "", str, fix="set it to the character's name")
    if name is not None and not name.strip():
        doc.error("name", "is empty (set it to the character's name)")
    profile = doc.get(data, "profile", "", dict, fix='set it to {"text": "...", "fields": {}}')
    if profile is None:
        return name or "", Profile("")
    doc.known_keys(profile, "profile", ("text", "fields"))
    text = doc.get(profile, "text", "profile", str, fix="describe the character in prose")
    fields = doc.get(profile, "fields", "profile", dict, required=False)
    return name or "", Profile(text or "", fields or {})


def inspect_native(path: Path | str) -> tuple[Character | None, list[Problem]]:
    """Parse a native character directory: the character (None if there are errors) and every problem."""
    root = Path(path).expanduser().resolve()
    problems: list[Problem] = []
    name, profile = _parse_header(root, problems)
    train = _parse_split(root, "train", problems)
    test = _parse_split(root, "test", problems)
    if errors_of(problems):
        return None, problems
    if not (train.scenes or train.images or train.knowledge_open or train.knowledge_mcq):
        problems.append(Problem(f"train/{DATA_FILE}", "(root)", "has no images, scenes or knowledge QA "
                                "(there is nothing to train on)", "warning"))
    warnings = [str(p) for p in problems]
    return Character(name, profile, train, test, root=root, source_format="native", warnings=warnings), problems


def validate_native(path: Path | str) -> list[Problem]:
    """Every problem in a native character directory; empty when it is clean."""
    return inspect_native(path)[1]


def read_character(path: Path | str) -> Character:
    """Read a native character directory (absolute image paths); raises DataError listing every error."""
    character, problems = inspect_native(path)
    if character is None:
        raise problems_error(Path(path), problems)
    return character


# ----------------------------------------------------------------------------------------------- writing


def _write_json(path: Path, data: Any) -> None:
    """Deterministic JSON (key order as built), written atomically."""
    try:
        write_json(path, data)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path.name}: cannot be written as JSON: {err} (profile fields must be plain JSON data)") from None


def _save_png(image: ImageRef, dst: Path) -> None:
    src = Path(image.path)
    if not src.is_file():
        raise DataError(f"image {image.id!r}: {src} does not exist (cannot write the character without it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and dst.samefile(src):
        return
    if src.suffix.lower() == ".png":
        shutil.copyfile(src, dst)
        return
    from PIL import Image

    with Image.open(src) as img:
        keep = img if img.mode in ("1", "L", "LA", "I", "P", "RGB", "RGBA") else img.convert("RGB")
        keep.save(dst, format="PNG")


def _image_files(images: dict[str, ImageRef]) -> dict[str, str]:
    """A unique, filesystem-safe relative PNG path per image id."""
    files, used = {}, set()
    for image_id in images:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", image_id).lstrip(".") or "image"
        name, k = stem, 2
        while name.lower() in used:
            name, k = f"{stem}-{k}", k + 1
        used.add(name.lower())
        files[image_id] = f"images/{name}.png"
    return files


def _turn_json(turn: Turn) -> dict[str, Any]:
    out: dict[str, Any] = {"role": turn.role, "text": turn.text}
    for key in ("image_id", "thinking", "generation_instruction"):
        if getattr(turn, key) is not None:
            out[key] = getattr(turn, key)
    return out


def _mcq_json(item: MultipleChoice) -> dict[str, Any]:
    out: dict[str, Any] = {"question": item.question, "options": list(item.options), "answer": item.answer}
    if item.difficulty is not None:
        out["difficulty"] = item.difficulty
    return out


def _qa_json(open_items: list[OpenQA], mcq: list[MultipleChoice]) -> dict[str, Any]:
    return {"open": [{"question": q.question, "answer": q.answer} for q in open_items], "mcq": [_mcq_json(m) for m in mcq]}


def _split_json(split: CharacterSplit, files: dict[str, str]) -> dict[str, Any]:
    t2i = [{"instruction": t.instruction, **({"image_id": t.image_id} if t.image_id is not None else {}),
            **({"caption": t.caption} if t.caption is not None else {})} for t in split.t2i]
    return {
        "images": [{"id": i.id, "file": files[i.id], "caption": i.caption, "attributes": i.attributes}
                   for i in split.images.values()],
        "scenes": [{"id": s.id, "turns": [_turn_json(t) for t in s.turns],
                    **({"context_turns": s.context_turns} if s.context_turns else {})} for s in split.scenes],
        "knowledge_qa": _qa_json(split.knowledge_open, split.knowledge_mcq),
        "vqa": [{"image_id": v.image_id, **_qa_json(v.open, v.mcq)} for v in split.vqa],
        "t2i": t2i,
        "judge_questions": {k: list(v) for k, v in split.judge_questions.items()},
    }


def write_character(character: Character, out_dir: Path | str) -> Path:
    """Write `character` in the native format (images copied as PNG); returns the directory."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": character.name,
        "profile": {"text": character.profile.text, "fields": character.profile.fields},
    }
    for split_name in SPLITS:
        split: CharacterSplit = getattr(character, split_name)
        files = _image_files(split.images)
        for image_id, image in split.images.items():
            _save_png(image, out / split_name / files[image_id])
        _write_json(out / split_name / DATA_FILE, _split_json(split, files))
    _write_json(out / CHARACTER_FILE, header)  # last: its presence marks a complete character
    return out


def _native_dir(path: Path, character: str | None) -> Path:
    """A native directory holds one character; `character` may name a sub-directory holding it."""
    if character and (path / character / CHARACTER_FILE).is_file():
        return path / character
    return path


FORMATS.register("native")(DataFormat(
    "native", lambda path: (path / CHARACTER_FILE).is_file(),
    lambda path, character: inspect_native(_native_dir(path, character)),
    "character.json with train/data.json and test/data.json (written by `cmrp sandbox make`)", order=0))
