"""MMRole-Data (Dai et al., ICLR 2025) as released, read into a `Character`: one role at a time.

The release (YanqiDai/MMRole_dataset; the GitHub repository YanqiDai/MMRole held the same `dialogues/` and
`profiles/` before they moved) — only the parts read here::

    profiles/<dist>/profiles.json                   {name: profile text}: the short profile MMRole's prompts quote
    profiles/<dist>/detailed_profiles/<Name>.json   {introduction, personality, experience, relationship,
                                                    catchphrase}: the detailed profile (preferred; both are kept)
    profiles/<dist>/roles.json                      {script: [names]}
    dialogues/in-distribution/<kind>/<Name>_{COCO,script}.json, dialogues/out-of-distribution/<kind>.json
                                                    the dialogues; <kind>: comment | human-role | inter-role
    data/train/*.json                               formatted records (read when there is no dialogues/)
    data/test/<dist>/<kind>_test.json               formatted test records: one reply each, with its history
    images/                                         a record's "image" is relative to it; images/COCO/train2017
                                                    (MS-COCO) is not part of the release
<dist>: in-distribution | out-of-distribution.

A dialogue turn names its speaker: {"from": "human", "value"} (comment questions), {"role": "human", "value"}
(human-role) or {"role": "<character name>", "value"}. The trained character's turns are its replies; any
other speaker (the curious human, or the other character of an inter-role dialogue) is the user. Every
dialogue the character speaks in is read, wherever it is filed (inter-role dialogues sit in one of the two
characters' files). The user shares the dialogue's image in the first user turn; a dialogue the character
opens starts with an empty user turn that shares it. Dialogues that MMRole's test records come from are
held out of training.

A formatted record: {"id", "system", "image", "role", "script", "other_role", "conversations": [{"from":
"user", "value": PROMPT}, {"from": "assistant", "value": REPLY}]}. PROMPT holds the task, the profiles, the
image's auxiliary information, the conversation history ("[Name]: text" lines) and the words to answer (or
the request to open the conversation). A test record becomes one scene: the history as context
(`Scene.context_turns`), the words with the image, and the reference reply — one item to score.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmrp.data.character import Character, CharacterSplit, ImageRef, Profile, Scene, Turn
from cmrp.data.native import _describe, _Doc, _join, _undecodable
from cmrp.data.problems import DataFormat, Problem, errors_of
from cmrp.errors import DataError
from cmrp.registry import FORMATS

__all__ = ["FORMAT", "HUMAN", "KINDS", "Prompt", "inspect_mmrole", "is_mmrole", "list_roles", "load_test_files",
           "parse_prompt", "test_files"]

FORMAT = "mmrole"
KINDS = ("comment", "human-role", "inter-role")
HUMAN = "a curious human"  # the other role of comment and human-role records ("[human]" in their history)
_HUMAN_SPEAKERS = ("human", HUMAN)
_TEST_NAME = re.compile(r"^(comment|human-role|inter-role)_test\.json$")
_DIALOGUE_KEYS = ("id", "image", "conversations", "role_info", "place_info", "scene_info")
_RECORD_KEYS = ("id", "system", "image", "conversations", "role", "script", "other_role")
_AUX_FIELDS = (("role_info", "Character information"), ("place_info", "Place information"),
               ("scene_info", "Scene information"))
_SECTIONS = (("introduction", "Introduction"), ("personality", "Personality"), ("experience", "Experience"),
             ("relationship", "Relationships"), ("catchphrase", "Catchphrases"))
_NEXT = r"(?=\n\n\n(?:The description of |The auxiliary information |The conversation history |Please respond |Please initiate )|\Z)"
_DESCRIPTION = re.compile(r"(?:\A|\n\n\n)The description of ([^\n]+?) is as follows:\n(.*?)" + _NEXT, re.S)
_AUXILIARY = re.compile(r"\n\n\nThe auxiliary information of the image is as follows:\n(.*?)" + _NEXT, re.S)
_HISTORY = re.compile(r"\n\n\nThe conversation history between [^\n]*? is as follows:\n(.*?)" + _NEXT, re.S)
_RESPOND = re.compile(r"\n\n\nPlease respond to the following words of [^\n]*?:\n(.*)\Z", re.S)
_INITIATE = re.compile(r"\n\n\nPlease initiate the conversation with [^\n]*\Z")
_SPEAKER = re.compile(r"^\[([^\]\n]{1,80})\]: ?(.*)$")


def _key(name: str) -> str:
    """Names compare without case, and with underscores as spaces (file names use underscores)."""
    return re.sub(r"[\s_]+", " ", name).strip().lower()


# ----------------------------------------------------------------------------------------------- layout


def test_files(path: Path) -> list[Path]:
    """MMRole test files (`<kind>_test.json`) under `path`/data/test, or in `path` itself or one level below."""
    base = path / "data" / "test" if (path / "data" / "test").is_dir() else path
    found = [p for pattern in ("*_test.json", "*/*_test.json") for p in base.glob(pattern)]
    return sorted(p for p in found if _TEST_NAME.match(p.name) and p.is_file())


def _dialogue_files(root: Path) -> list[Path]:
    folder = root / "dialogues"
    return sorted(p for p in folder.rglob("*.json") if p.is_file()) if folder.is_dir() else []


def _train_files(root: Path) -> list[Path]:
    folder = root / "data" / "train"
    return sorted(p for p in folder.rglob("*.json") if p.is_file()) if folder.is_dir() else []


def is_mmrole(path: Path) -> bool:
    """An MMRole-Data root (profiles/ beside dialogues/ or data/), or a folder holding MMRole test files."""
    if (path / "profiles").is_dir() and ((path / "data").is_dir() or (path / "dialogues").is_dir()):
        return True
    return bool(test_files(path))


def _kind_of(file: Path) -> str | None:
    for name in (file.parent.name, file.stem, file.stem.removesuffix("_test")):
        if name in KINDS:
            return name
    return None


# ----------------------------------------------------------------------------------------------- reading


def _parse_json(file: Path, doc: _Doc) -> tuple[bool, Any]:
    """(ok, data) of a JSON file; every failure is reported on `doc`."""
    try:
        return True, json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        doc.error("(root)", f"is not UTF-8 text (byte {err.start}) (save the file as UTF-8)")
    except json.JSONDecodeError as err:
        doc.error("(root)", f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg} (fix the JSON syntax there)")
    except (ValueError, RecursionError) as err:
        doc.error("(root)", f"cannot be parsed: {err} (simplify the file)")
    except OSError as err:
        doc.error("(file)", f"cannot be read: {err.strerror} (check its permissions)")
    return False, None


class _Files:
    """Reads each JSON file of the data set once; problems name the file relative to the root."""

    def __init__(self, root: Path, problems: list[Problem]):
        self.root, self.problems = root, problems
        self._records: dict[Path, tuple[_Doc, list[tuple[str, dict]]]] = {}
        self._mappings: dict[str, list[tuple[Path, _Doc, dict]]] = {}
        self.scripts: dict[str, list[str]] | None = None  # roles.json, read once

    def rel(self, file: Path) -> str:
        return file.relative_to(self.root).as_posix() if file.is_relative_to(self.root) else file.as_posix()

    def doc(self, file: Path) -> _Doc:
        return _Doc(self.rel(file), self.problems)

    def mappings(self, pattern: str, expected: str) -> list[tuple[Path, _Doc, dict]]:
        """The JSON objects of the profiles/ files matching `pattern` (cached); other content is an error."""
        if pattern not in self._mappings:
            found = []
            for file in sorted((self.root / "profiles").glob(pattern)):
                doc = self.doc(file)
                ok, data = _parse_json(file, doc)
                if ok and isinstance(data, dict):
                    found.append((file, doc, data))
                elif ok:
                    doc.error("(root)", f"should map {expected}, got {_describe(data)}")
            self._mappings[pattern] = found
        return self._mappings[pattern]

    def records(self, file: Path) -> tuple[_Doc, list[tuple[str, dict]]]:
        """The record objects of a file holding a JSON list of records (cached)."""
        if file not in self._records:
            doc = self.doc(file)
            ok, data = _parse_json(file, doc)
            out: list[tuple[str, dict]] = []
            if ok and not isinstance(data, list):
                doc.error("(root)", f"should be a list of records, got {_describe(data)} (wrap the records in [...])")
            elif ok:
                for i, item in enumerate(data):
                    if isinstance(item, dict):
                        out.append((_join("", i), item))
                    else:
                        doc.error(_join("", i), f"should be a record object, got {_describe(item)} (use {{...}})")
            self._records[file] = (doc, out)
        return self._records[file]


def _speaker(turn: dict) -> Any:
    return turn.get("role") if "role" in turn else turn.get("from")


def _text(turn: dict) -> Any:
    return turn.get("value") if "value" in turn else turn.get("content")


def list_roles(root: Path, problems: list[Problem] | None = None) -> list[str]:
    """Every character of the data set: roles.json, the dialogues' speakers and the formatted records' roles."""
    problems = [] if problems is None else problems
    files = _Files(Path(root), problems)
    return _roles(files, _dialogue_files(files.root), _train_files(files.root) + test_files(files.root))


def _roles(files: _Files, dialogues: list[Path], formatted: list[Path]) -> list[str]:
    roles: dict[str, str] = {}

    def add(name: Any) -> None:
        if isinstance(name, str) and name.strip() and _key(name) not in _HUMAN_SPEAKERS:
            roles.setdefault(_key(name), name.strip())

    for scripts in _roles_json(files).values():
        for name in scripts:
            add(name)
    for file in dialogues:
        for _, record in files.records(file)[1]:
            for turn in record.get("conversations") or []:
                if isinstance(turn, dict):
                    add(_speaker(turn))
    for file in formatted:
        for _, record in files.records(file)[1]:
            add(record.get("role"))
    return sorted(roles.values())


# ----------------------------------------------------------------------------------------------- profiles


def _roles_json(files: _Files) -> dict[str, list[str]]:
    """script -> names, over every profiles/<dist>/roles.json (read once)."""
    if files.scripts is None:
        files.scripts = {}
        for _, doc, data in files.mappings("*/roles.json", "scripts to lists of names (use {\"Script\": [\"Name\"]})"):
            for script, names in data.items():
                if isinstance(names, list) and all(isinstance(n, str) for n in names):
                    files.scripts.setdefault(str(script), []).extend(names)
                else:
                    doc.warn(_join("", str(script)), f"should be a list of names, got {_describe(names)}; ignored")
    return files.scripts


def _detailed_text(doc: _Doc, data: Any) -> tuple[str | None, dict[str, str]]:
    """A detailed profile as one text with a heading per section, and its sections."""
    if isinstance(data, str):
        return (data.strip() or None), {}
    if not isinstance(data, dict):
        doc.error("(root)", f"should be an object of profile sections, got {_describe(data)} "
                            f"(use {{{', '.join(repr(k) for k, _ in _SECTIONS)}: ...}})")
        return None, {}
    sections: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, str) and value.strip():
            sections[str(key)] = value.strip()
        else:
            doc.warn(_join("", str(key)), f"holds {_describe(value)}, not text; left out of the profile")
    titles = dict(_SECTIONS)
    order = [k for k, _ in _SECTIONS if k in sections] + [k for k in sections if k not in titles]
    text = "\n\n".join(f"### {titles.get(k, k.replace('_', ' ').title())}\n{sections[k]}" for k in order)
    return (text or None), sections


def _profile(files: _Files, name: str, descriptions: list[str]) -> tuple[Profile, dict[str, dict[str, Any]]]:
    """The character's profile (detailed preferred, the short one kept beside it) and per-file notes."""
    fields: dict[str, Any] = {"source": FORMAT}
    notes: dict[str, dict[str, Any]] = {}
    short: tuple[str, str] | None = None
    for file, doc, data in files.mappings("*/profiles.json", "names to profile texts (use {\"Name\": \"...\"})"):
        for who, value in data.items():
            if _key(str(who)) != _key(name):
                continue
            if isinstance(value, str) and value.strip():
                short = (value.strip(), files.rel(file))
                fields["distribution"] = file.parent.name
            else:
                doc.warn(_join("", str(who)), f"holds {_describe(value)}, not a profile text; ignored (use a string)")
    detailed: tuple[str, str, dict[str, str]] | None = None
    for file in sorted((files.root / "profiles").glob("*/detailed_profiles/*")):
        if file.suffix not in (".json", ".txt") or _key(file.stem) != _key(name):
            continue
        doc = files.doc(file)
        if file.suffix == ".json":
            ok, data = _parse_json(file, doc)
        else:
            try:
                ok, data = True, file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                ok, data = False, None
                doc.warn("(file)", "cannot be read as UTF-8 text; ignored (save it as UTF-8)")
        text, sections = _detailed_text(doc, data) if ok else (None, {})
        if text:
            detailed = (text, files.rel(file), sections)
            fields["distribution"] = file.parent.parent.name
    for script, names in _roles_json(files).items():
        if any(_key(n) == _key(name) for n in names):
            fields["script"] = script
    if short is not None:
        fields["short_profile"] = short[0]
    if detailed is not None:
        text, source, sections = detailed
        fields.update(profile_used="detailed", profile_file=source, detailed_profile=sections)
    elif short is not None:
        text, source = short
        fields.update(profile_used="short", profile_file=source)
    elif descriptions:
        text, source = descriptions[0], ""
        fields["profile_used"] = "record"
        files.problems.append(Problem("profiles/", "(file)", f"has no profile of {name!r}; the description quoted "
                                      "in its test records is used (add it to profiles/<dist>/profiles.json)",
                                      "warning"))
    else:
        text, source = "", ""
        fields["profile_used"] = "none"
        files.problems.append(Problem("profiles/", "(file)", f"has no profile of {name!r} and no record describes "
                                      "it (add it to profiles/<dist>/profiles.json)", "warning"))
    if detailed is not None:
        notes[detailed[1]] = {"profile": f"used ({len(detailed[0])} characters)"}
    if short is not None:
        notes[short[1]] = {"profile": f"{'used' if detailed is None else 'kept'} ({len(short[0])} characters)"}
    return Profile(text, fields), notes


# ----------------------------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    """A formatted record's prompt, taken apart: who said what before, the words to answer (None when the
    character is asked to open the conversation), the profiles quoted and the image's auxiliary information."""

    history: list[tuple[str, str]]
    words: str | None
    descriptions: dict[str, str]
    auxiliary: str | None
    parsed: bool = True  # False: no final instruction found; the whole prompt is taken as the words


def parse_prompt(prompt: str) -> Prompt:
    descriptions = {m.group(1).strip(): m.group(2).strip() for m in _DESCRIPTION.finditer(prompt)}
    aux = _AUXILIARY.search(prompt)
    history: list[tuple[str, str]] = []
    found = _HISTORY.search(prompt)
    if found:
        for line in found.group(1).split("\n"):
            speaker = _SPEAKER.match(line)
            if speaker:
                history.append((speaker.group(1), speaker.group(2)))
            elif history:  # a reply running over several lines
                history[-1] = (history[-1][0], history[-1][1] + "\n" + line)
    respond = _RESPOND.search(prompt)
    if respond:
        words: str | None = respond.group(1).strip()
    elif _INITIATE.search(prompt):
        words = None
    else:
        return Prompt(history, prompt.strip(), descriptions, aux.group(1).strip() if aux else None, parsed=False)
    return Prompt(history, words, descriptions, aux.group(1).strip() if aux else None)


# ----------------------------------------------------------------------------------------------- images


class _Images:
    """Resolves record images under <root>/images (once each); the missing ones are collected with their file."""

    def __init__(self, root: Path):
        self.base = (root / "images").resolve()
        self.known: dict[str, ImageRef] = {}
        self.bad: dict[str, str] = {}

    def get(self, doc: _Doc, field: str, value: Any, caption: str | None) -> tuple[str | None, str | None]:
        """(image id, None) when usable, (None, why not) when missing; bad values are errors on `doc`."""
        if value is None:
            return None, None
        if not isinstance(value, str) or not value.strip():
            doc.error(field, f"should be an image path relative to images/, got {_describe(value)} (fix the path)")
            return None, None
        rel = Path(value)
        if rel.is_absolute() or ".." in rel.parts:
            doc.error(field, f"{value!r} leaves images/ (use a path relative to images/, e.g. \"COCO/train2017/x.jpg\")")
            return None, None
        if value not in self.known and value not in self.bad:
            target = (self.base / rel).resolve()
            if not target.is_relative_to(self.base):
                self.bad[value] = "resolves outside images/"
            elif not target.is_file():
                self.bad[value] = "does not exist"
            else:
                reason = _undecodable(target)
                if reason:
                    self.bad[value] = f"is not a readable image ({reason})"
                else:
                    self.known[value] = ImageRef(value, target, caption or "")
        if value in self.known:
            if caption and not self.known[value].caption:
                self.known[value].caption = caption
            return value, None
        return None, f"images/{value} {self.bad[value]}"


def _missing_images_problem(split: str, missing: list[str]) -> Problem | None:
    """One warning per split for the images that are not there, COCO (never part of the release) apart."""
    if not missing:
        return None
    coco = [m for m in missing if m.startswith("images/COCO/")]
    other = [m for m in missing if not m.startswith("images/COCO/")]
    parts = []
    if coco:
        parts.append(f"{len(coco)} from MS-COCO train2017, which MMRole does not ship (download train2017 into "
                     "images/COCO/train2017 as MMRole's README says)")
    if other:
        parts.append(f"{len(other)} other(s), e.g. {other[0]} (download MMRole_dataset's images/)")
    return Problem("images/", f"({split})", f"{len(missing)} dialogue image(s) cannot be used: {'; '.join(parts)}. "
                   "Their dialogues are kept, as text only", "warning")


# ----------------------------------------------------------------------------------------------- scenes


def _with_image(turns: list[Turn], image_id: str | None) -> list[Turn]:
    """Merge a speaker's consecutive turns; the user shares the image in the first user turn (an empty one
    before the character's first words when the character opens the dialogue)."""
    merged: list[Turn] = []
    for turn in turns:
        if merged and merged[-1].role == turn.role:
            merged[-1].text += "\n" + turn.text
        else:
            merged.append(turn)
    if image_id is not None:
        if not merged or merged[0].role == "character":
            merged.insert(0, Turn("user", ""))
        merged[0].image_id = image_id
    return merged


def _aux_caption(record: dict) -> str | None:
    parts = [f"{title}: {record[key].strip()}" for key, title in _AUX_FIELDS
             if isinstance(record.get(key), str) and record[key].strip()]
    return "; ".join(parts) or None


def _owner(record_id: Any) -> str | None:
    """The character whose file a dialogue record belongs to, from its id (Iron_Man_comment_COCO_3)."""
    if not isinstance(record_id, str):
        return None
    found = re.match(r"^(.+?)_(?:comment|human-role-dialogue|role-role-dialogue)_", record_id)
    return found.group(1) if found else None


def _dialogue_id(test_id: str) -> str:
    """The dialogue a formatted record comes from: its id without the turn index (X_COCO_30_7 -> X_COCO_30)."""
    head, _, tail = test_id.rpartition("_")
    return head if tail.isdigit() and head else test_id


@dataclass
class _Split:
    scenes: list[Scene]
    counts: dict[str, dict[str, Any]]
    missing: list[str]


def _read_dialogues(files: _Files, dialogues: list[Path], name: str, held_out: set[str], images: _Images) -> _Split:
    """The character's scenes from the dialogues it speaks in, with per-file counts."""
    split = _Split([], {}, [])
    key = _key(name)
    for file in dialogues:
        doc, records = files.records(file)
        counts = {"records": len(records), "scenes": 0, "held_out": 0, "empty": 0, "no_reply": 0, "images_missing": 0}
        empty: list[str] = []
        for path, record in records:
            doc.known_keys(record, path, _DIALOGUE_KEYS)
            convs = doc.objects(record, "conversations", path, required=True,
                                fix='use [{"from": "human", "value": ...}, {"role": "<name>", "value": ...}]')
            turns: list[Turn] = []
            for p, turn in convs:
                doc.known_keys(turn, p, ("role", "from", "value", "content"))
                speaker = _speaker(turn)
                if not isinstance(speaker, str) or not speaker.strip():
                    doc.error(_join(p, "role"), f"should name the speaker, got {_describe(speaker)} "
                                                "(\"human\" or the character's name)")
                    continue
                text = _text(turn)
                if not isinstance(text, str):
                    doc.error(_join(p, "value"), f"should be the words said, got {_describe(text)} (use a string)")
                    continue
                turns.append(Turn("character" if _key(speaker) == key else "user", text))
            mine = any(t.role == "character" for t in turns)
            own = _owner(record.get("id")) is not None and _key(_owner(record.get("id")) or "") == key
            if not mine:
                if own and "conversations" in record and isinstance(record["conversations"], list):
                    counts["empty" if not record["conversations"] else "no_reply"] += 1
                    empty.append(path)
                continue
            record_id = record.get("id") if isinstance(record.get("id"), str) else path
            if record_id in held_out:
                counts["held_out"] += 1
                continue
            image_id, why = images.get(doc, _join(path, "image"), record.get("image"), _aux_caption(record))
            if why:
                counts["images_missing"] += 1
                split.missing.append(why)
            split.scenes.append(Scene(f"{files.rel(file)}/{record_id}", _with_image(turns, image_id)))
            counts["scenes"] += 1
        if empty:
            what = [f"{counts['empty']} without turns"] if counts["empty"] else []
            what += [f"{counts['no_reply']} with the opening words only, no reply"] if counts["no_reply"] else []
            doc.warn(empty[0], f"{name}'s records here: {' and '.join(what)}; skipped (MMRole-Data as released holds "
                               "641 records without turns and 209 without a reply)")
        if counts["scenes"] or counts["held_out"] or empty:
            split.counts[files.rel(file)] = counts
    return split


def _formatted_scene(doc: _Doc, path: str, record: dict, key: str, images: _Images, split: _Split,
                     counts: dict[str, Any], test: bool) -> tuple[Scene | None, Prompt | None]:
    """One formatted record as a scene (history, words with the image, reply); `test`: the history is context."""
    doc.known_keys(record, path, _RECORD_KEYS)
    convs = doc.objects(record, "conversations", path, required=True,
                        fix='use [{"from": "user", "value": PROMPT}, {"from": "assistant", "value": REPLY}]')
    prompt = reply = None
    for p, conv in convs:
        doc.known_keys(conv, p, ("from", "value", "answer"))
        who, value = conv.get("from"), doc.get(conv, "value", p, str)
        if who == "user" and value is not None:
            prompt = value
        elif who in ("assistant", "gpt") and value is not None:
            reply = value
        elif value is not None:
            doc.error(_join(p, "from"), f"is {_describe(who)}; a formatted record has a \"user\" turn (the prompt) "
                                        "and an \"assistant\" turn (the reply)")
    if prompt is None or reply is None:
        if convs:
            doc.error(_join(path, "conversations"), "needs a \"user\" turn and an \"assistant\" turn")
        return None, None
    parsed = parse_prompt(prompt)
    if not parsed.parsed:
        counts["prompts_unparsed"] = counts.get("prompts_unparsed", 0) + 1
    turns = [Turn("character" if _key(who) == key else "user", text) for who, text in parsed.history]
    if parsed.words is not None:
        turns.append(Turn("user", parsed.words))
    turns.append(Turn("character", reply))
    caption = "; ".join(line.strip().removeprefix("- ") for line in (parsed.auxiliary or "").splitlines() if line.strip())
    image_id, why = images.get(doc, _join(path, "image"), record.get("image"), caption or None)
    if why:
        counts["images_missing"] += 1
        split.missing.append(why)
    turns = _with_image(turns, image_id)
    record_id = record.get("id") if isinstance(record.get("id"), str) else path
    return Scene(f"{doc.file}/{record_id}", turns, len(turns) - 1 if test else 0), parsed


def _read_formatted(files: _Files, paths: list[Path], name: str, held_out: set[str], images: _Images, *,
                    test: bool, descriptions: list[str]) -> _Split:
    split = _Split([], {}, [])
    key = _key(name)
    for file in paths:
        doc, records = files.records(file)
        counts: dict[str, Any] = {"records": len(records), "scenes": 0, "held_out": 0, "images_missing": 0}
        for path, record in records:
            role = doc.get(record, "role", path, str, fix="set it to the name of the character who answers")
            if role is None or _key(role) != key:
                continue
            record_id = record.get("id") if isinstance(record.get("id"), str) else ""
            if not test and _dialogue_id(record_id) in held_out:
                counts["held_out"] += 1
                continue
            scene, parsed = _formatted_scene(doc, path, record, key, images, split, counts, test)
            if scene is not None:
                split.scenes.append(scene)
                counts["scenes"] += 1
            if parsed is not None:
                descriptions += [text for who, text in parsed.descriptions.items() if _key(who) == key]
        if counts.get("prompts_unparsed"):
            doc.warn("(root)", f"{counts['prompts_unparsed']} prompt(s) are not in MMRole's format (no \"Please "
                               "respond to the following words of ...\" at the end); each is taken whole as the words")
        if counts["scenes"] or counts["held_out"]:
            split.counts[files.rel(file)] = counts
    if not test:
        split.scenes = _fold_prefixes(split.scenes)
    return split


def _fold_prefixes(scenes: list[Scene]) -> list[Scene]:
    """Drop scenes whose turns are a prefix of another scene's (formatted records: one record per turn)."""
    keys = [tuple((t.role, t.text) for t in s.turns) for s in scenes]
    longer = {k[:n] for k in keys for n in range(1, len(k))}
    seen: set[tuple] = set()
    out = []
    for scene, k in zip(scenes, keys, strict=True):
        if k not in longer and k not in seen:
            seen.add(k)
            out.append(scene)
    return out


def load_test_files(path: Path | str) -> tuple[list[tuple[str, list[dict]]], list[Problem]]:
    """MMRole test files under `path` (an MMRole root, its data/test, or a folder of `<kind>_test.json`):
    [(file relative to the test folder, its records)] and every problem found in them."""
    path = Path(path).expanduser().resolve()
    problems: list[Problem] = []
    found = [path] if path.is_file() else test_files(path)
    base = path.parent if path.is_file() else (path / "data" / "test" if (path / "data" / "test").is_dir() else path)
    files = _Files(base, problems)
    out = []
    for file in found:
        doc, records = files.records(file)
        for p, record in records:
            doc.known_keys(record, p, _RECORD_KEYS)
            for key in ("id", "role", "other_role", "image"):
                doc.get(record, key, p, str)
            image = record.get("image")
            if isinstance(image, str) and (Path(image).is_absolute() or ".." in Path(image).parts):
                doc.error(_join(p, "image"), f"{image!r} leaves images/ (use a path relative to images/)")
            convs = doc.objects(record, "conversations", p, required=True)
            if len(convs) < 2:
                doc.error(_join(p, "conversations"), "needs the prompt (\"user\") and the reference reply "
                                                     "(\"assistant\")")
            for q, conv in convs[:2]:
                doc.get(conv, "value", q, str)
        out.append((files.rel(file), [r for _, r in records]))
    return out, problems


def _test_summary(files: _Files, tests: list[Path]) -> str:
    parts = [f"{files.rel(f)}: {len(files.records(f)[1])} records" for f in tests]
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------- the character


def inspect_mmrole(path: Path | str, character: str | None = None) -> tuple[Character | None, list[Problem]]:
    """Parse one role of MMRole-Data: its dialogues (train, minus those MMRole tests on) and test records (test)."""
    root = Path(path).expanduser().resolve()
    if not is_mmrole(root):
        raise DataError(f"{root}: not MMRole-Data (expected profiles/ beside dialogues/ or data/, or MMRole test "
                        "files <kind>_test.json)")
    problems: list[Problem] = []
    files = _Files(root, problems)
    dialogues, train_files, tests = _dialogue_files(root), _train_files(root), test_files(root)
    if not dialogues and not train_files:
        held = f"only MMRole test files ({_test_summary(files, tests)})" if tests else "no MMRole records"
        problems.append(Problem(f"{root.name}/", "(folder)",
                                f"holds {held} and no dialogues/ or data/train/: there is nothing to train on. Train "
                                "from an MMRole-Data root (profiles/ and dialogues/ or data/train/ of MMRole_dataset); "
                                "score a model's answers on these test files with `cmrp eval --mmrole-tests DIR "
                                "--answers FILE`"))
        return None, problems
    roles = _roles(files, dialogues, train_files + tests)
    if not roles and errors_of(problems):
        return None, problems
    if not character:
        if len(roles) != 1:
            shown = ", ".join(roles[:30]) + (", ..." if len(roles) > 30 else "")
            raise DataError(f"{root}: MMRole-Data with {len(roles)} roles ({shown}); say which one with "
                            "data.character (or --character NAME)")
        character = roles[0]
    by_key = {_key(r): r for r in roles}
    if _key(character) not in by_key:
        close = difflib.get_close_matches(character, roles, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DataError(f"{root}: no record answers as {character!r} ({hint}{len(roles)} roles, e.g. "
                        f"{', '.join(roles[:10])}); fix data.character")
    name = by_key[_key(character)]
    held_out = {_dialogue_id(r["id"]) for f in tests for _, r in files.records(f)[1] if isinstance(r.get("id"), str)}
    images = _Images(root)
    descriptions: list[str] = []
    if dialogues:
        train = _read_dialogues(files, dialogues, name, held_out, images)
        if train_files:
            problems.append(Problem("data/train/", "(folder)", "is not read: the dialogues/ it was formatted from "
                                    "are (whole dialogues, speakers named)", "warning"))
    else:
        train = _read_formatted(files, train_files, name, held_out, images, test=False, descriptions=descriptions)
    test = _read_formatted(files, tests, name, set(), images, test=True, descriptions=descriptions)
    n_held = sum(c.get("held_out", 0) for c in train.counts.values())
    if n_held:
        problems.append(Problem("data/test/", "(folder)", f"{n_held} dialogue(s) of {name} are held out of training: "
                                "MMRole's test records come from them", "warning"))
    if not tests:
        problems.append(Problem("data/test/", "(folder)", "is missing: no dialogue is held out of training, so "
                                "MMRole's test records (if you score on them later) overlap the training data "
                                "(add data/test/ of MMRole_dataset)", "warning"))
    for split_name, split in (("train", train), ("test", test)):
        problem = _missing_images_problem(split_name, split.missing)
        if problem is not None:
            problems.append(problem)
    profile, notes = _profile(files, name, descriptions)
    if not train.scenes:
        why = f"all {n_held} of its dialogue(s) are held out because MMRole's test records come from them" \
            if n_held else "it speaks in no dialogue here"
        if profile.fields.get("distribution") == "out-of-distribution":
            why += " (an out-of-distribution character: MMRole keeps those for testing)"
        problems.append(Problem("dialogues/" if dialogues else "data/train/", "(folder)",
                                f"no training dialogue of {name}: {why}; there is nothing to train on (pick a "
                                "character with dialogues, e.g. an in-distribution one)"))
    sources = {**notes, **train.counts, **test.counts}
    used = {t.image_id for s in train.scenes for t in s.turns if t.image_id}
    used_test = {t.image_id for s in test.scenes for t in s.turns if t.image_id}
    if errors_of(problems):
        return None, problems
    return Character(name, profile,
                     CharacterSplit(images={k: v for k, v in images.known.items() if k in used}, scenes=train.scenes),
                     CharacterSplit(images={k: v for k, v in images.known.items() if k in used_test},
                                    scenes=test.scenes),
                     root=root, source_format=FORMAT, warnings=[str(p) for p in problems], sources=sources), problems


FORMATS.register("mmrole")(DataFormat(
    FORMAT, is_mmrole, inspect_mmrole,
    "MMRole-Data: profiles/, data/train|test/*.json and/or dialogues/, images/ (pick one with --character)", order=20))
