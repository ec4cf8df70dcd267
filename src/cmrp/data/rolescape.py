"""The RoleScape-20 release layout (the UniCharacter paper's data set), read as-is into a `Character`.

Layout (one folder per character and split; file names start with a per-character prefix that is not
always the folder name, e.g. ``train/Friends-Chandler/Chandler_with_image.json``)::

    <root>/train/<Name>/N.png                                reference images (id = file stem)
        *_full_profile.txt, *_personality_simplified_profile.txt
        annotation.json                                      {description, opening, scenes: [[turn, ...], ...]}
        *_with_image.json                                    the same scenes; machine turns add thinking_process,
                                                             generation_instruction, qa_pairs, mcq_items
        *_t2i_instruction.json                               {t2i_instructions: [{image_id, t2i_instruction}]}
        *_dialogue_text_extension_{train,test}.json          more scenes (text; `image` ids may not exist)
        *_knowledge_qa.json                                  {qa_items: [{question, answer, difficulty, ...}]}
        *_knowledge_qa_test.json                             {mcq_items: [{question, options: {A..D}, answer_key}]}
        *_memorization_test.json, *_personality_test.json    {test_questions: [str, ...]} (LLM-judge questions)
    <root>/test/<Name>/N.png, annotation.json, *_with_image.json, *_t2i_instruction.json, *_full_profile.txt

Known quirks of the release are warnings, never errors, and nothing usable is dropped: image ids that
name no image (the turn stays as text), duplicated questions (all kept), numeric MCQ options (read as
text), sentence-long knowledge answers, quoted judge questions (quotes removed), unknown keys.
"""

from __future__ import annotations

import difflib
from collections import Counter
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
from cmrp.data.native import _describe, _Doc, _join, _read_json, _undecodable
from cmrp.data.problems import DataFormat, Problem, errors_of
from cmrp.errors import DataError
from cmrp.registry import FORMATS

__all__ = ["FORMAT", "find_character_dir", "inspect_rolescape", "is_rolescape", "list_characters"]

FORMAT = "rolescape20"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
USER_ROLES = ("user", "human")
CHARACTER_ROLES = ("machine", "assistant", "character")
LONG_ANSWER_WORDS = 20  # knowledge-QA answers are short phrases; longer ones are usually whole sentences

# file kind -> the end of its name (the part after the per-character prefix)
SUFFIXES = {
    "full_profile": "_full_profile.txt",
    "simplified_profile": "_personality_simplified_profile.txt",
    "with_image": "_with_image.json",
    "t2i": "_t2i_instruction.json",
    "extension_train": "_dialogue_text_extension_train.json",
    "extension_test": "_dialogue_text_extension_test.json",
    "knowledge_qa": "_knowledge_qa.json",
    "knowledge_qa_test": "_knowledge_qa_test.json",
    "memorization": "_memorization_test.json",
    "personality": "_personality_test.json",
}
_HEADER = ("description", "opening")
_TURN_KEYS = ("role", "text", "image", "thinking_process", "generation_instruction", "qa_pairs", "mcq_items")
_QA_KEYS = ("id", "question", "answer", "type", "difficulty", "evidence", "reasoning_steps", "confidence")
_MCQ_KEYS = ("id", "question", "options", "answer_key", "difficulty", "rationale", "evidence", "description")


# ----------------------------------------------------------------------------------------------- finding


def _is_character_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    return (path / "annotation.json").is_file() or any(path.glob("*" + SUFFIXES["with_image"]))


def list_characters(root: Path) -> list[str]:
    """The character folders of a release root (those under train/)."""
    train = root / "train"
    if not train.is_dir():
        return []
    return sorted(p.name for p in train.iterdir() if _is_character_dir(p))


def is_rolescape(path: Path) -> bool:
    """A release root (train/<Name>/ folders) or one character folder of it."""
    return bool(list_characters(path)) or _is_character_dir(path)


def _prefix(folder: Path) -> str | None:
    for suffix in (SUFFIXES["with_image"], SUFFIXES["full_profile"], SUFFIXES["t2i"]):
        for file in sorted(folder.glob("*" + suffix)):
            return file.name[: -len(suffix)]
    return None


def find_character_dir(path: Path, character: str | None) -> tuple[Path, Path]:
    """(dataset root, train folder of the character). Raises DataError naming the choices when ambiguous."""
    if _is_character_dir(path) and not list_characters(path):
        if path.parent.name == "test" and _is_character_dir(path.parent.parent / "train" / path.name):
            path = path.parent.parent / "train" / path.name  # the test folder was given: use the pair
        root = path.parent.parent if path.parent.name == "train" else path.parent
        if character and character not in (path.name, _prefix(path)):
            raise DataError(f"{path}: this folder holds {path.name!r}, not {character!r} "
                            "(pass the release root with data.character, or this character's folder alone)")
        return root, path
    names = list_characters(path)
    if not names:
        raise DataError(f"{path}: not a RoleScape-20 release (expected train/<Name>/ folders holding annotation.json "
                        "or <Name>_with_image.json, or one such character folder)")
    if not character:
        if len(names) == 1:
            return path, path / "train" / names[0]
        raise DataError(f"{path}: a RoleScape-20 root with {len(names)} characters ({', '.join(names)}); "
                        "say which one with data.character (or --character NAME)")
    by_key = {}
    for name in names:
        prefix = _prefix(path / "train" / name) or name
        for key in (name, name.lower(), prefix, prefix.lower()):
            by_key.setdefault(key, name)
    found = by_key.get(character) or by_key.get(character.lower())
    if found is None:
        close = difflib.get_close_matches(character, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DataError(f"{path}: no character {character!r} under train/ ({hint}characters: {', '.join(names)}); "
                        "fix data.character")
    return path, path / "train" / found


def _find(folder: Path, kind: str, prefix: str | None, root: Path, problems: list[Problem]) -> Path | None:
    """The file of `kind` in `folder`; the one with the character's prefix when several match."""
    matches = sorted(folder.glob("*" + SUFFIXES[kind]))
    if kind == "knowledge_qa":  # "*_knowledge_qa.json" never matches the _test file, but be explicit
        matches = [m for m in matches if not m.name.endswith(SUFFIXES["knowledge_qa_test"])]
    if len(matches) > 1:
        preferred = [m for m in matches if prefix and m.name == prefix + SUFFIXES[kind]]
        chosen = preferred[0] if preferred else matches[0]
        problems.append(Problem(_rel(chosen.parent, root) + "/", "(file)",
                                f"{len(matches)} files end with {SUFFIXES[kind]!r}; read {chosen.name} "
                                "(remove or rename the others)", "warning"))
        return chosen
    return matches[0] if matches else None


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------- parsing


class _Reader:
    """Reads the files of one character, collecting every problem (see `cmrp.data.native._Doc`)."""

    def __init__(self, root: Path, problems: list[Problem]):
        self.root, self.problems = root, problems

    def doc(self, file: Path) -> _Doc:
        return _Doc(_rel(file, self.root), self.problems)

    def load(self, file: Path | None, what: str, *, expected: bool = True) -> tuple[_Doc, dict] | None:
        if file is None:
            if expected:
                self.problems.append(Problem(what, "(file)", "does not exist, so this part of the character "
                                             "is empty (add the file from the release to use it)", "warning"))
            return None
        name = _rel(file, self.root)
        data = _read_json(self.root, name, self.problems, required=True)
        return None if data is None else (_Doc(name, self.problems), data)

    def text(self, file: Path | None) -> str | None:
        if file is None:
            return None
        try:
            return file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as err:
            self.problems.append(Problem(_rel(file, self.root), "(root)",
                                         f"is not UTF-8 text (byte {err.start}) (save the file as UTF-8)"))
        except OSError as err:
            self.problems.append(Problem(_rel(file, self.root), "(file)",
                                         f"cannot be read: {err.strerror} (check its permissions)"))
        return None


def _images(reader: _Reader, folder: Path) -> dict[str, ImageRef]:
    """Every image file of a folder, id = file stem, in numeric order."""
    images: dict[str, ImageRef] = {}
    if not folder.is_dir():
        return images
    root = reader.root.resolve()
    files = [f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
    for file in sorted(files, key=lambda f: (0, int(f.stem), "") if f.stem.isdigit() else (1, 0, f.stem)):
        name = _rel(file, reader.root)
        target = file.resolve()
        if not target.is_relative_to(root):
            reader.problems.append(Problem(name, "(file)", f"resolves to {target}, outside the data set "
                                           "(copy the image into the folder instead of linking to it)"))
            continue
        if not target.is_file():
            continue
        reason = _undecodable(target)
        if reason:
            reader.problems.append(Problem(name, "(file)", f"is not a readable image ({reason}) "
                                           "(replace it with a valid PNG or JPEG)"))
            continue
        if file.stem in images:
            reader.problems.append(Problem(name, "(file)", f"has the same id {file.stem!r} as "
                                           f"{images[file.stem].path.name}; this one is ignored (keep one file per id)",
                                           "warning"))
            continue
        images[file.stem] = ImageRef(file.stem, target)
    return images


def _image_id(doc: _Doc, value: Any, field: str) -> str | None:
    """An image reference: a string id; a number is accepted as its decimal string."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        doc.error(field, f"should be an image id string like \"0\", got {_describe(value)} (fix the id)")
        return None
    return value.strip()


class _MissingImages:
    """Collects references to images that do not exist, to report them once per file."""

    def __init__(self):
        self.refs: list[tuple[str, str]] = []  # (field, id)

    def add(self, field: str, image_id: str) -> None:
        self.refs.append((field, image_id))

    def report(self, doc: _Doc, folder: str, known: dict[str, ImageRef], kept: str) -> None:
        if not self.refs:
            return
        ids = sorted({i for _, i in self.refs}, key=lambda i: (0, int(i), "") if i.isdigit() else (1, 0, i))
        have = ", ".join(sorted(known, key=lambda i: (0, int(i), "") if i.isdigit() else (1, 0, i))) or "none"
        shown = ", ".join(ids[:12]) + (", ..." if len(ids) > 12 else "")
        doc.warn(self.refs[0][0], f"{len(self.refs)} reference(s) to {len(ids)} image id(s) that {folder} does not have "
                                  f"({shown}; it has {have}); {kept} (add the images as <id>.png to use them)")


class _NumericOptions:
    """Numeric option values of one file, reported once."""

    def __init__(self):
        self.fields: list[str] = []


def _scene_turns(doc: _Doc, scene: Any, path: str, images: dict[str, ImageRef], missing: _MissingImages,
                 vqa: dict[str, VQAItem] | None, numeric: _NumericOptions) -> list[Turn] | None:
    if not isinstance(scene, list):
        doc.error(path, f"should be a list of turns, got {_describe(scene)} "
                        '(use [{"role": "user", "text": ...}, {"role": "machine", "text": ...}])')
        return None
    if not scene:
        doc.warn(path, "is an empty scene, skipped (delete it)")
        return None
    turns = []
    for j, item in enumerate(scene):
        tpath = _join(path, j)
        if not isinstance(item, dict):
            doc.error(tpath, f"should be an object, got {_describe(item)} (use a JSON object {{...}})")
            continue
        doc.known_keys(item, tpath, _TURN_KEYS)
        role = doc.get(item, "role", tpath, str, fix='set it to "user" or "machine"')
        text = doc.get(item, "text", tpath, str)
        if role is not None and role.lower() not in USER_ROLES + CHARACTER_ROLES:
            doc.error(_join(tpath, "role"), f"is {role!r}, not a known role (use \"user\" or \"machine\")")
            continue
        if role is None or text is None:
            continue
        is_character = role.lower() in CHARACTER_ROLES
        image_id = _image_id(doc, item.get("image"), _join(tpath, "image"))
        thinking = doc.get(item, "thinking_process", tpath, str, required=False)
        instruction = doc.get(item, "generation_instruction", tpath, str, required=False)
        if image_id is not None and image_id not in images:
            missing.add(_join(tpath, "image"), image_id)
            image_id = None
        if vqa is not None and ("qa_pairs" in item or "mcq_items" in item):
            _turn_vqa(doc, item, tpath, image_id, vqa, numeric)
        turns.append(Turn("character" if is_character else "user", text, image_id, thinking, instruction))
    return turns


def _turn_vqa(doc: _Doc, item: dict, path: str, image_id: str | None, vqa: dict[str, VQAItem],
              numeric: _NumericOptions) -> None:
    qa_open = _open_items(doc, item, "qa_pairs", path)
    qa_mcq = _mcq_items(doc, item, "mcq_items", path, numeric)
    if image_id is None:
        if qa_open or qa_mcq:
            doc.warn(path, f"{len(qa_open)} open and {len(qa_mcq)} multiple-choice image question(s) belong to no "
                           "existing image, so they cannot be used (fix the turn's \"image\" id)")
        return
    entry = vqa.setdefault(image_id, VQAItem(image_id))
    entry.open += qa_open
    entry.mcq += qa_mcq
    _warn_duplicates(doc, _join(path, "qa_pairs"), [q.question for q in qa_open], "questions")


def _open_items(doc: _Doc, obj: dict, key: str, path: str) -> list[OpenQA]:
    out = []
    for p, item in doc.objects(obj, key, path):
        doc.known_keys(item, p, _QA_KEYS)
        question, answer = doc.get(item, "question", p, str), doc.get(item, "answer", p, str)
        if question is not None and answer is not None:
            out.append(OpenQA(question, answer))
    return out


def _mcq_items(doc: _Doc, obj: dict, key: str, path: str, numeric: _NumericOptions | None = None) -> list[MultipleChoice]:
    own = numeric is None
    numeric = numeric or _NumericOptions()
    out = []
    for p, item in doc.objects(obj, key, path):
        doc.known_keys(item, p, _MCQ_KEYS)
        question = doc.get(item, "question", p, str)
        letter = doc.get(item, "answer_key", p, str, fix='set it to the letter of the correct option, e.g. "B"')
        options = _options(doc, item, p, numeric)
        difficulty = doc.get(item, "difficulty", p, str, required=False)
        if question is None or letter is None or options is None:
            continue
        letters, texts = list(options), list(options.values())
        if len(texts) < 2:
            doc.error(_join(p, "options"), f"has {len(texts)} option(s) (give at least 2)")
            continue
        if letter.strip().upper() not in letters:
            doc.error(_join(p, "answer_key"), f"is {letter!r}, not one of the option letters {', '.join(letters)} "
                                              "(fix the letter)")
            continue
        out.append(MultipleChoice(question, texts, letters.index(letter.strip().upper()), difficulty))
    if own:
        _report_numeric(doc, numeric)
    return out


def _options(doc: _Doc, item: dict, path: str, numeric: _NumericOptions) -> dict[str, str] | None:
    """Options as letter -> text, in file order; numbers are read as text (a quirk of the release)."""
    raw = item.get("options")
    field = _join(path, "options")
    if isinstance(raw, list):
        raw = {chr(ord("A") + i): v for i, v in enumerate(raw[:26])}
    if not isinstance(raw, dict):
        doc.error(field, f"{'is missing' if raw is None else 'should be an object, got ' + _describe(raw)} "
                         '(use {"A": "...", "B": "...", "C": "...", "D": "..."})')
        return None
    out: dict[str, str] = {}
    bad = False
    for letter, value in raw.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            numeric.fields.append(_join(field, letter))
            value = str(value)
        if not isinstance(value, str):
            doc.error(_join(field, letter), f"should be the option's text, got {_describe(value)} (quote it)")
            bad = True
            continue
        out[letter.strip().upper()] = value
    return None if bad else out


def _report_numeric(doc: _Doc, numeric: _NumericOptions) -> None:
    if numeric.fields:
        doc.warn(numeric.fields[0], f"{len(numeric.fields)} option(s) in this file are numbers, not strings; "
                                    "they are read as text (quote them to silence this)")


def _warn_duplicates(doc: _Doc, field: str, questions: list[str], what: str) -> None:
    counts = Counter(q.strip().lower() for q in questions)
    repeated = [q for q in questions if counts[q.strip().lower()] > 1]
    extra = sum(c - 1 for c in counts.values() if c > 1)
    if extra:
        doc.warn(field, f"{extra} of {len(questions)} {what} repeat an earlier one (e.g. {repeated[0][:60]!r}); "
                        "all are kept (remove the repeats if they are unintended)")


def _header(doc: _Doc, data: dict) -> dict[str, str]:
    out = {}
    for key in _HEADER:
        value = doc.get(data, key, "", str, required=False)
        if value:
            out[key] = value
    return out


def _read_scenes(reader: _Reader, file: Path | None, label: str, images: dict[str, ImageRef], folder: str,
                 *, vqa: dict[str, VQAItem] | None = None, expected: bool = True,
                 kept: str = "the turns are kept as text-only dialogue") -> tuple[list[Scene], dict[str, str]]:
    loaded = reader.load(file, label, expected=expected)
    if loaded is None:
        return [], {}
    doc, data = loaded
    known = ("scenes", *_HEADER)
    doc.known_keys(data, "", known)
    scenes_raw = doc.get(data, "scenes", "", list, fix="set it to a list of scenes, each a list of turns")
    missing, numeric = _MissingImages(), _NumericOptions()
    scenes = []
    stem = Path(label).stem
    for i, scene in enumerate(scenes_raw or []):
        turns = _scene_turns(doc, scene, _join("scenes", i), images, missing, vqa, numeric)
        if turns:
            scenes.append(Scene(f"{stem}/{i:04d}", turns))
    missing.report(doc, folder, images, kept)
    _report_numeric(doc, numeric)
    return scenes, _header(doc, data)


def _scene_key(scene: Scene) -> tuple:
    return tuple((t.role, t.text.strip()) for t in scene.turns)


def _merge_annotation(reader: _Reader, annotation: Path | None, scenes: list[Scene], images: dict[str, ImageRef],
                      folder: str, label: str) -> list[Scene]:
    """annotation.json repeats the scenes of *_with_image.json without the reasoning; add any it has beyond them."""
    extra, header = _read_scenes(reader, annotation, label, images, folder, expected=not scenes)
    have = {_scene_key(s) for s in scenes}
    added = [s for s in extra if _scene_key(s) not in have]
    if scenes and added:
        reader.problems.append(Problem(label, "scenes", f"{len(added)} scene(s) are not in the *_with_image.json "
                                       "file; they are added without thinking or generation instruction", "warning"))
    return scenes + added


def _t2i(reader: _Reader, file: Path | None, label: str, images: dict[str, ImageRef], folder: str) -> list[T2IItem]:
    loaded = reader.load(file, label)
    if loaded is None:
        return []
    doc, data = loaded
    doc.known_keys(data, "", ("t2i_instructions", *_HEADER))
    missing = _MissingImages()
    out = []
    for p, item in doc.objects(data, "t2i_instructions", "", required=True):
        doc.known_keys(item, p, ("image_id", "t2i_instruction"))
        instruction = doc.get(item, "t2i_instruction", p, str)
        image_id = _image_id(doc, item.get("image_id"), _join(p, "image_id"))
        if image_id is not None and image_id not in images:
            missing.add(_join(p, "image_id"), image_id)
            image_id = None
        if instruction is not None:
            out.append(T2IItem(instruction, image_id))
    missing.report(doc, folder, images, "the instructions are kept without a target image")
    return out


def _knowledge_open(reader: _Reader, file: Path | None, label: str) -> list[OpenQA]:
    loaded = reader.load(file, label)
    if loaded is None:
        return []
    doc, data = loaded
    doc.known_keys(data, "", ("qa_items", *_HEADER))
    if "qa_items" not in data:
        doc.error("qa_items", "is missing (set it to a list of {\"question\", \"answer\"} objects)")
    items = _open_items(doc, data, "qa_items", "")
    _warn_duplicates(doc, "qa_items", [q.question for q in items], "questions")
    long = [i for i, q in enumerate(items) if len(q.answer.split()) > LONG_ANSWER_WORDS]
    if long:
        doc.warn(_join(_join("qa_items", long[0]), "answer"),
                 f"{len(long)} open answer(s) are longer than {LONG_ANSWER_WORDS} words (whole sentences rather than "
                 "short answers); they are kept as they are (shorten them for exact-match evaluation)")
    return items


def _knowledge_mcq(reader: _Reader, file: Path | None, label: str) -> list[MultipleChoice]:
    loaded = reader.load(file, label)
    if loaded is None:
        return []
    doc, data = loaded
    doc.known_keys(data, "", ("mcq_items", *_HEADER))
    if "mcq_items" not in data:
        doc.error("mcq_items", "is missing (set it to a list of multiple-choice objects)")
    items = _mcq_items(doc, data, "mcq_items", "")
    _warn_duplicates(doc, "mcq_items", [q.question for q in items], "questions")
    return items


def _judge(reader: _Reader, file: Path | None, label: str) -> list[str] | None:
    loaded = reader.load(file, label)
    if loaded is None:
        return None
    doc, data = loaded
    doc.known_keys(data, "", ("test_questions", *_HEADER))
    questions = doc.strings(data, "test_questions", "")
    if questions is None:
        return None
    quoted = [q for q in questions if len(q.strip()) > 1 and q.strip()[0] == q.strip()[-1] == '"']
    if quoted:
        doc.warn("test_questions", f"{len(quoted)} question(s) are wrapped in double quotes; the quotes are removed")
    out = [q.strip()[1:-1].strip() if q in quoted else q.strip() for q in questions]
    empty = [i for i, q in enumerate(out) if not q]
    for i in empty:
        doc.warn(_join("test_questions", i), "is empty, skipped (delete it)")
    out = [q for q in out if q]
    _warn_duplicates(doc, "test_questions", out, "questions")
    return out


def _profile(reader: _Reader, train: Path, test: Path, prefix: str | None, headers: dict[str, str]) -> Profile:
    root = reader.root
    full_file = _find(train, "full_profile", prefix, root, reader.problems)
    full = reader.text(full_file)
    simplified = reader.text(_find(train, "simplified_profile", prefix, root, reader.problems))
    fields: dict[str, Any] = {"source": FORMAT, "folder": train.name, **headers}
    if simplified:
        fields["simplified_profile"] = simplified
    if test.is_dir():
        test_full = reader.text(_find(test, "full_profile", prefix, root, reader.problems))
        if test_full and full and test_full != full:
            fields["test_full_profile"] = test_full
    if not full:
        label = _rel(full_file, root) if full_file else f"{_rel(train, root)}/{prefix or train.name}{SUFFIXES['full_profile']}"
        full = headers.get("description") or simplified or ""
        reader.problems.append(Problem(label, "(file)", "is missing or empty; the profile is taken from the "
                                       "annotation description instead (add the full profile text)", "warning"))
    return Profile(full, fields)


def inspect_rolescape(path: Path | str, character: str | None = None) -> tuple[Character | None, list[Problem]]:
    """Parse one character of a RoleScape-20 release (root + name, or its train folder)."""
    root, train = find_character_dir(Path(path).expanduser().resolve(), character)
    test = root / "test" / train.name
    problems: list[Problem] = []
    reader = _Reader(root, problems)
    prefix = _prefix(train)
    train_label, test_label = _rel(train, root), _rel(test, root)
    placeholder = f"{prefix or train.name}"

    def find(folder: Path, kind: str) -> Path | None:
        return _find(folder, kind, prefix, root, problems)

    def label(folder: Path, kind: str) -> str:
        return f"{_rel(folder, root)}/{placeholder}{SUFFIXES[kind]}"

    # train split
    images = _images(reader, train)
    if not images:
        problems.append(Problem(train_label + "/", "(file)", "has no images (N.png); the character has no reference "
                                "images to train image generation on", "warning"))
    vqa: dict[str, VQAItem] = {}
    annotated, headers = _read_scenes(reader, find(train, "with_image"), label(train, "with_image"), images,
                                      train_label, vqa=vqa)
    annotated = _merge_annotation(reader, _existing(train / "annotation.json"), annotated, images, train_label,
                                  f"{train_label}/annotation.json")
    extended, _ = _read_scenes(reader, find(train, "extension_train"), label(train, "extension_train"), images,
                               train_label)
    train_split = CharacterSplit(
        images=images,
        scenes=annotated + extended,
        knowledge_open=_knowledge_open(reader, find(train, "knowledge_qa"), label(train, "knowledge_qa")),
        vqa=list(vqa.values()),
        t2i=_t2i(reader, find(train, "t2i"), label(train, "t2i"), images, train_label),
    )

    # test split: test/<Name>/ plus the *_test files kept in train/<Name>/
    test_images = _images(reader, test)
    test_scenes: list[Scene] = []
    test_t2i: list[T2IItem] = []
    if test.is_dir():
        test_scenes, _ = _read_scenes(reader, find(test, "with_image"), label(test, "with_image"), test_images,
                                      test_label)
        test_scenes = _merge_annotation(reader, _existing(test / "annotation.json"), test_scenes, test_images,
                                        test_label, f"{test_label}/annotation.json")
        test_t2i = _t2i(reader, find(test, "t2i"), label(test, "t2i"), test_images, test_label)
    else:
        problems.append(Problem(test_label + "/", "(file)", "does not exist, so the test split has no images, "
                                "scenes or T2I prompts (add it from the release to evaluate on them)", "warning"))
    # extension test dialogues number their images like the train extension: resolve them against train/
    ext_test, _ = _read_scenes(reader, find(train, "extension_test"), label(train, "extension_test"), images,
                               train_label)
    for scene in ext_test:
        for turn in scene.turns:
            if turn.image_id is not None:
                key = f"train-{turn.image_id}"
                ref = images[turn.image_id]
                test_images.setdefault(key, ImageRef(key, ref.path, ref.caption, dict(ref.attributes)))
                turn.image_id = key
    judge = {}
    for kind, name in (("memorization", "memorization"), ("personality", "personality")):
        questions = _judge(reader, find(train, kind), label(train, kind))
        if questions is not None:
            judge[name] = questions
    test_split = CharacterSplit(
        images=test_images,
        scenes=test_scenes + ext_test,
        knowledge_mcq=_knowledge_mcq(reader, find(train, "knowledge_qa_test"), label(train, "knowledge_qa_test")),
        t2i=test_t2i,
        judge_questions=judge,
    )
    profile = _profile(reader, train, test, prefix, headers)
    if errors_of(problems):
        return None, problems
    if not (train_split.scenes or train_split.images or train_split.knowledge_open):
        problems.append(Problem(train_label + "/", "(root)", "has no images, scenes or knowledge QA "
                                "(there is nothing to train on)", "warning"))
    name = prefix or train.name
    character = Character(name, profile, train_split, test_split, root=train, source_format=FORMAT,
                          warnings=[str(p) for p in problems])
    return character, problems


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


FORMATS.register("rolescape20")(DataFormat(
    FORMAT, is_rolescape, inspect_rolescape,
    "the RoleScape-20 release: <root>/train/<Name>/ and <root>/test/<Name>/ (pick one with --character)", order=10))
