"""MMRole-Data (Dai et al., ICLR 2025) read into a `Character`: one role of the data set at a time.

Layout of the release (only the parts read here)::

    <root>/profiles/<dist>/profiles.json            {name: profile text} (or {name: {"profile": text, ...}},
                                                    or [{"name"|"role": ..., "profile"|"description": ...}])
    <root>/profiles/<dist>/detailed_profiles/<name>.txt|.json   a longer profile (preferred when present)
    <root>/data/train/*.json                        instruction records (below): the character's dialogues
    <root>/data/test/<in|out-of>-distribution/{comment,human-role,inter-role}_test.json   test records
    <root>/dialogues/**/*.json                      used for training only when data/train/ is absent
    <root>/images/...                               a record's "image" is relative to images/

A record: {"id", "image", "role", "other_role", "script", "system",
"conversations": [{"from": "user", "value": PROMPT}, {"from": "assistant", "value": REPLY}]}. PROMPT holds the
profile, the conversation history ("[Name]: text" lines) and the words the role answers; REPLY is the role's
answer. Each record becomes a scene (history, then the user's words with the image, then the reply) on the
train split, or, for test files, on the test split — the reference answer kept, so any model can be scored.
Comment, human-role and inter-role dialogues read alike; in inter-role ones the other character is the user.
A multi-turn dialogue stored as one record per turn yields only its longest record's scene.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from cmrp.data.character import Character, CharacterSplit, ImageRef, Profile, Scene, Turn
from cmrp.data.native import _describe, _Doc, _join, _undecodable
from cmrp.data.validate import Problem, errors_of

__all__ = ["FORMAT", "inspect_mmrole", "is_mmrole", "list_roles"]

FORMAT = "mmrole"
USER_FROM = ("user", "human")
REPLY_FROM = ("assistant", "gpt", "character")
_RECORD_KEYS = ("id", "image", "role", "other_role", "script", "system", "conversations")
_HISTORY = re.compile(r"The conversation history between .*? is as follows:\n(.*?)(?:\n\n\n|\Z)", re.S)
_FINAL = re.compile(r"Please respond to the following words of .*?:\n(.*)\Z", re.S)
_DESCRIPTION = re.compile(r"The description of (.+?) is as follows:\n(.*?)(?:\n\n\n|\Z)", re.S)
_SPEAKER = re.compile(r"^\[([^\]\n]{1,120})\]:\s?(.*)$")


def is_mmrole(path: Path) -> bool:
    return (path / "profiles").is_dir() and ((path / "data").is_dir() or (path / "dialogues").is_dir())


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name).strip().lower()


def _json_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.json") if p.is_file()) if folder.is_dir() else []


def _record_files(root: Path) -> tuple[list[Path], list[Path]]:
    train = _json_files(root / "data" / "train") or _json_files(root / "dialogues")
    return train, _json_files(root / "data" / "test")


def _parse_json(root: Path, file: Path, doc: _Doc) -> tuple[bool, Any]:
    """(ok, data) of a JSON file; every failure is reported on `doc`."""
    import json

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


def _load_records(root: Path, file: Path, problems: list[Problem]) -> tuple[_Doc, list[tuple[str, dict]]]:
    doc = _Doc(file.relative_to(root).as_posix(), problems)
    ok, data = _parse_json(root, file, doc)
    if not ok:
        return doc, []
    if not isinstance(data, list):
        doc.error("(root)", f"should be a list of dialogue records, got {_describe(data)} (wrap the records in [...])")
        return doc, []
    out = []
    for i, item in enumerate(data):
        if isinstance(item, dict):
            out.append((_join("", i), item))
        else:
            doc.error(_join("", i), f"should be a record object, got {_describe(item)} (use a JSON object {{...}})")
    return doc, out


def list_roles(root: Path, problems: list[Problem] | None = None) -> list[str]:
    """Every role that answers in a record of the data set (reads the record files once)."""
    problems = [] if problems is None else problems
    roles: dict[str, str] = {}
    train, test = _record_files(root)
    for file in train + test:
        for _, record in _load_records(root, file, problems)[1]:
            role = record.get("role")
            if isinstance(role, str) and role.strip():
                roles.setdefault(_key(role), role.strip())
    return sorted(roles.values())


# ----------------------------------------------------------------------------------------------- profiles


def _profile_texts(root: Path, problems: list[Problem]) -> dict[str, tuple[str, str]]:
    """name key -> (profile text, file it came from); detailed profiles override profiles.json."""
    out: dict[str, tuple[str, str]] = {}
    for file in sorted((root / "profiles").rglob("profiles.json")):
        name = file.relative_to(root).as_posix()
        doc = _Doc(name, problems)
        ok, data = _parse_json(root, file, doc)
        if not ok:
            continue
        entries: list[tuple[str, Any, str]] = []
        if isinstance(data, dict):
            entries = [(str(k), v, _join("", str(k))) for k, v in data.items()]
        elif isinstance(data, list):
            for i, item in enumerate(data):
                if isinstance(item, dict) and isinstance(item.get("name") or item.get("role"), str):
                    entries.append((item.get("name") or item.get("role"), item, _join("", i)))
                else:
                    doc.warn(_join("", i), "has no \"name\" (or \"role\") string, skipped (add the character's name)")
        else:
            doc.error("(root)", f"should map names to profiles, got {_describe(data)} (use {{\"Name\": \"profile\"}})")
            continue
        for who, value, field in entries:
            text = _profile_value(value)
            if text is None:
                doc.warn(field, f"holds {_describe(value)}, not a profile text; skipped "
                                "(use a string, or an object with a \"profile\" string)")
                continue
            out[_key(who)] = (text, name)
    for folder in sorted((root / "profiles").rglob("detailed_profiles")):
        for file in sorted(folder.iterdir()):
            text = None
            if file.suffix == ".txt":
                try:
                    text = file.read_text(encoding="utf-8").strip()
                except (UnicodeDecodeError, OSError):
                    problems.append(Problem(file.relative_to(root).as_posix(), "(file)",
                                            "cannot be read as UTF-8 text, skipped (save it as UTF-8)", "warning"))
            elif file.suffix == ".json":
                ok, data = _parse_json(root, file, _Doc(file.relative_to(root).as_posix(), problems))
                text = _profile_value(data) if ok else None
            if text:
                out[_key(file.stem)] = (text, file.relative_to(root).as_posix())
    return out


def _profile_value(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, dict):
        for key in ("profile", "detailed_profile", "description", "text"):
            if isinstance(value.get(key), str) and value[key].strip():
                return value[key].strip()
    return None


# ----------------------------------------------------------------------------------------------- records


def _split_prompt(prompt: str, role: str) -> tuple[list[Turn], str, str | None]:
    """(history turns, the words to answer, the role's description) from a formatted user prompt."""
    history: list[Turn] = []
    match = _HISTORY.search(prompt)
    if match:
        current: Turn | None = None
        for line in match.group(1).splitlines():
            speaker = _SPEAKER.match(line)
            if speaker:
                who = "character" if _key(speaker.group(1)) == _key(role) else "user"
                current = Turn(who, speaker.group(2))
                history.append(current)
            elif current is not None:
                current.text += "\n" + line
    final = _FINAL.search(prompt)
    words = final.group(1).strip() if final else prompt.strip()
    description = None
    for found in _DESCRIPTION.finditer(prompt):
        if _key(found.group(1)) == _key(role):
            description = found.group(2).strip()
    return history, words, description


class _Images:
    """Resolves record images under <root>/images, once each; missing files are reported per file."""

    def __init__(self, root: Path):
        self.root = root
        self.base = (root / "images").resolve()
        self.known: dict[str, ImageRef] = {}
        self.bad: dict[str, str] = {}

    def get(self, doc: _Doc, field: str, value: Any, missing: list[tuple[str, str]]) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            doc.error(field, f"should be an image path relative to images/, got {_describe(value)} (fix the path)")
            return None
        rel = Path(value)
        if rel.is_absolute() or ".." in rel.parts:
            doc.error(field, f"{value!r} leaves images/ (use a path relative to images/, e.g. \"COCO/train2017/x.jpg\")")
            return None
        if value in self.known:
            return value
        if value not in self.bad:
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
                    self.known[value] = ImageRef(value, target)
                    return value
        missing.append((field, f"images/{value} {self.bad[value]}"))
        return None


def _record_scene(doc: _Doc, path: str, record: dict, images: _Images, missing: list[tuple[str, str]],
                  stem: str) -> tuple[Scene | None, str | None]:
    """The record's scene and the role description found in its prompt."""
    doc.known_keys(record, path, _RECORD_KEYS)
    role = doc.get(record, "role", path, str, fix="set it to the name of the character who answers")
    record_id = doc.get(record, "id", path, str, required=False) or str(path)
    convs = doc.objects(record, "conversations", path, required=True,
                        fix='use [{"from": "user", "value": ...}, {"from": "assistant", "value": ...}]')
    if role is None or not convs:
        return None, None
    turns: list[Turn] = []
    description = None
    image_id = images.get(doc, _join(path, "image"), record.get("image"), missing)
    for p, conv in convs:
        doc.known_keys(conv, p, ("from", "value", "answer"))
        who = doc.get(conv, "from", p, str, fix='set it to "user" or "assistant"')
        value = doc.get(conv, "value", p, str)
        if who is None or value is None:
            continue
        kind = who.strip().lower()
        if kind in USER_FROM:
            history, words, found = _split_prompt(value, role)
            description = description or found
            turns += history
            turns.append(Turn("user", words))
        elif kind in REPLY_FROM or _key(who) == _key(role):
            turns.append(Turn("character", value))
        else:  # raw dialogues name the speaker
            turns.append(Turn("user", value))
    if not any(t.role == "character" for t in turns):
        doc.warn(_join(path, "conversations"), "has no reply of the role (no \"assistant\" turn); skipped "
                                               "(add the reply)")
        return None, description
    merged: list[Turn] = []
    for turn in turns:  # the other role may speak twice in a row (history, then the words to answer)
        if merged and merged[-1].role == turn.role == "user":
            merged[-1].text += "\n" + turn.text
        else:
            merged.append(turn)
    turns = merged
    if image_id is not None:
        first_user = next((t for t in turns if t.role == "user"), None)
        if first_user is not None:
            first_user.image_id = image_id  # the user shares the image the dialogue is about
    return Scene(f"{stem}/{record_id}", turns), description


def _fold_prefixes(scenes: list[Scene]) -> list[Scene]:
    """Drop scenes whose turns are a prefix of another scene's (one record per turn of a dialogue)."""
    keys = [tuple((t.role, t.text) for t in s.turns) for s in scenes]
    longer: dict[tuple, int] = {}
    for k in keys:
        for n in range(1, len(k)):
            longer[k[:n]] = 1
    seen: set[tuple] = set()
    out = []
    for scene, k in zip(scenes, keys, strict=True):
        if k in longer or k in seen:
            continue
        seen.add(k)
        out.append(scene)
    return out


def _read_split(root: Path, files: list[Path], role_key: str, images: _Images, problems: list[Problem],
                descriptions: list[str]) -> list[Scene]:
    scenes: list[Scene] = []
    for file in files:
        doc, records = _load_records(root, file, problems)
        missing: list[tuple[str, str]] = []
        stem = file.relative_to(root).with_suffix("").as_posix().split("/", 1)[-1]
        for path, record in records:
            role = record.get("role")
            if not isinstance(role, str) or _key(role) != role_key:
                if "role" not in record or not isinstance(role, str):
                    doc.get(record, "role", path, str, fix="set it to the name of the character who answers")
                continue
            scene, description = _record_scene(doc, path, record, images, missing, stem)
            if scene is not None:
                scenes.append(scene)
            if description:
                descriptions.append(description)
        if missing:
            doc.warn(missing[0][0], f"{len(missing)} record image(s) cannot be used ({missing[0][1]}); their "
                                    "dialogues are kept as text (download the images into images/ as the "
                                    "MMRole README says)")
    return _fold_prefixes(scenes)


def inspect_mmrole(path: Path | str, character: str | None = None) -> tuple[Character | None, list[Problem]]:
    """Parse one role of an MMRole-Data root: its dialogues (train) and test records (test)."""
    from cmrp.errors import DataError

    root = Path(path).expanduser().resolve()
    if not is_mmrole(root):
        raise DataError(f"{root}: not an MMRole-Data root (expected profiles/ beside data/ or dialogues/)")
    problems: list[Problem] = []
    listing: list[Problem] = []
    roles = list_roles(root, listing)
    if not roles and errors_of(listing):
        return None, listing
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
    train_files, test_files = _record_files(root)
    images = _Images(root)
    descriptions: list[str] = []
    train_scenes = _read_split(root, train_files, _key(name), images, problems, descriptions)
    test_scenes = _read_split(root, test_files, _key(name), images, problems, descriptions)
    used_test = {t.image_id for s in test_scenes for t in s.turns if t.image_id}
    used_train = {t.image_id for s in train_scenes for t in s.turns if t.image_id}
    profiles = _profile_texts(root, problems)
    fields: dict[str, Any] = {"source": FORMAT}
    if _key(name) in profiles:
        text, source = profiles[_key(name)]
        fields["profile_file"] = source
    elif descriptions:
        text = descriptions[0]
        problems.append(Problem("profiles/", "(file)", f"has no profile of {name!r}; the description inside its "
                                "records is used (add it to profiles.json)", "warning"))
    else:
        text = ""
        problems.append(Problem("profiles/", "(file)", f"has no profile of {name!r} and no record describes it "
                                "(add it to profiles.json)", "warning"))
    if not train_scenes:
        problems.append(Problem("data/train/", "(root)", f"no training record answers as {name!r}; the character "
                                "has nothing to train on (use it for evaluation only)", "warning"))
    train = CharacterSplit(images={k: v for k, v in images.known.items() if k in used_train}, scenes=train_scenes)
    test = CharacterSplit(images={k: v for k, v in images.known.items() if k in used_test}, scenes=test_scenes)
    if errors_of(problems):
        return None, problems
    return Character(name, Profile(text, fields), train, test, root=root, source_format=FORMAT,
                     warnings=[str(p) for p in problems]), problems
