"""LLM-as-judge through any OpenAI-compatible `/v1/chat/completions` endpoint (standard library only).

Requests of three kinds:
- the UniCharacter paper's Memorization, Personality and Diversity: one answer (or a set of answers
  for Diversity) scored 1-7 after step-by-step reasoning;
- MMRole-Eval's eight metrics in one JSON request (protocol `json`, `templates/mmrole_pairwise.txt`): the
  judge scores the model's reply and a reference reply side by side (0-10 each) on all eight at once;
- MMRole-Eval's own protocol (`mmrole`, built by `cmrp.evaluation.mmrole_eval`): one request per metric,
  with the image, in the wording MMRole's reward model was trained on, answered "..., [Scores]: (A, B)".
Either way a metric is MMRole's aggregate: the mean over items of the ratio A / B (`ratio_scores`).

Prompts are editable `string.Template` files (`templates/*.txt`, `$name` placeholders; a folder given
as `templates_dir` overrides any of them). Every parsed answer is cached on disk under the SHA-256 of
its request, so a repeated evaluation asks nothing twice. A score that cannot be parsed is asked again
(bounded), then recorded as missing (None) — never guessed. The API key comes from an environment
variable and goes only into the Authorization header: never into a cache file, a log or an error.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from cmrp.errors import CmrpError
from cmrp.jsonio import write_json

__all__ = [
    "MMROLE_METRICS",
    "PAPER_METRICS",
    "JudgeClient",
    "JudgeError",
    "JudgeRequest",
    "JudgeResult",
    "TEMPLATE_NAMES",
    "load_templates",
    "parse_pair_scores",
    "parse_rm_scores",
    "parse_score",
    "ratio_scores",
]

PAPER_METRICS = ("memorization", "personality", "diversity")
MMROLE_METRICS = (
    "instruction_adherence", "fluency", "coherency", "image_text_relevance",
    "response_accuracy", "personality_consistency", "knowledge_consistency", "tone_consistency",
)
TEMPLATE_NAMES = ("system", "memorization", "personality", "diversity", "mmrole_pairwise")
_TRANSIENT = (408, 409, 425, 429, 500, 502, 503, 504)


class JudgeError(CmrpError):
    """The judge endpoint cannot be used at all (bad URL, key, model): every item would fail."""


# -- templates -----------------------------------------------------------------------------------------
def load_templates(templates_dir: Path | None = None) -> dict[str, Template]:
    """The shipped templates, each replaced by `<templates_dir>/<name>.txt` when that file exists."""
    shipped = resources.files("cmrp.evaluation") / "templates"
    out = {}
    for name in TEMPLATE_NAMES:
        text = (shipped / f"{name}.txt").read_text(encoding="utf-8")
        if templates_dir is not None and (Path(templates_dir) / f"{name}.txt").is_file():
            text = (Path(templates_dir) / f"{name}.txt").read_text(encoding="utf-8")
        out[name] = Template(text)
    return out


# -- parsing -------------------------------------------------------------------------------------------
_NUMBER = r"(\d+(?:\.\d+)?)"
_SCORE_PATTERNS = (
    rf"score\W{{0,6}}(?:is|of|=|:)?\W{{0,6}}{_NUMBER}",  # "Score: 6", "**Score:** 6", "score of 6"
    rf"rating\W{{0,6}}(?:is|of|=|:)?\W{{0,6}}{_NUMBER}",
    rf"{_NUMBER}\s*/\s*(?:7|10)\b",  # "**6/7**"
    rf"{_NUMBER}\s+out\s+of\s+(?:7|10)\b",
)


def _json_objects(text: str) -> list[Any]:
    """Every JSON object that can be decoded from the text, last first (the verdict ends the answer)."""
    decoder, found, start = json.JSONDecoder(), [], text.find("{")
    while start >= 0:
        try:
            value, _ = decoder.raw_decode(text, start)
            found.append(value)
        except (json.JSONDecodeError, RecursionError):
            pass
        start = text.find("{", start + 1)
    return found[::-1]


def _in_range(value: Any, lo: float, hi: float) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if lo <= number <= hi else None


def parse_score(text: str, lo: float = 1, hi: float = 7) -> float | None:
    """The score a judge gave: a JSON `{"score": 6}`, "Score: 6", "**6/7**", "6 out of 7" — the last such
    statement wins (the reasoning may quote other numbers first). None when nothing in range is found."""
    for obj in _json_objects(text):
        if isinstance(obj, dict):
            for key, value in obj.items():
                if str(key).lower() in ("score", "rating", "final_score"):
                    score = _in_range(value, lo, hi)
                    if score is not None:
                        return score
    cleaned = text.replace("*", "").replace("#", "")
    best: tuple[int, float] | None = None
    for pattern in _SCORE_PATTERNS:
        for match in re.finditer(pattern, cleaned, flags=re.IGNORECASE):
            score = _in_range(match.group(1), lo, hi)
            if score is not None and (best is None or match.start() > best[0]):
                best = (match.start(), score)
    if best is not None:
        return best[1]
    last_line = cleaned.strip().splitlines()[-1].strip() if cleaned.strip() else ""
    return _in_range(last_line.rstrip("."), lo, hi) if re.fullmatch(r"\d+(\.\d+)?\.?", last_line) else None


def _pair(value: Any, lo: float, hi: float) -> tuple[float, float] | None:
    if isinstance(value, dict):
        value = [value.get("model", value.get("a", value.get("A"))),
                 value.get("reference", value.get("b", value.get("B")))]
    if isinstance(value, str):
        value = re.findall(_NUMBER, value)
    if isinstance(value, list | tuple) and len(value) == 2:
        a, b = _in_range(value[0], lo, hi), _in_range(value[1], lo, hi)
        if a is not None and b is not None:
            return a, b
    return None


def parse_pair_scores(text: str, metrics: tuple[str, ...] = MMROLE_METRICS, lo: float = 0,
                      hi: float = 10) -> dict[str, tuple[float, float] | None]:
    """(model, reference) score pairs per metric from a JSON object (`{"fluency": [7, 8]}`, or
    `{"fluency": {"model": 7, "reference": 8}}`) or lines such as "Fluency: 7, 8" / "fluency: (7, 8)".
    A metric without a readable in-range pair is None."""
    out: dict[str, tuple[float, float] | None] = dict.fromkeys(metrics)
    for obj in _json_objects(text):
        if not isinstance(obj, dict):
            continue
        keyed = {re.sub(r"[\s-]+", "_", str(k).strip().lower()): v for k, v in obj.items()}
        for metric in metrics:
            if out[metric] is None and metric in keyed:
                out[metric] = _pair(keyed[metric], lo, hi)
    for metric in metrics:
        if out[metric] is not None:
            continue
        words = metric.replace("_", r"[\s_-]*")
        pattern = rf"{words}\W{{0,8}}{_NUMBER}\s*(?:,|/|vs\.?|and|;)\s*{_NUMBER}"
        matches = list(re.finditer(pattern, text.replace("*", ""), flags=re.IGNORECASE))
        if matches:
            out[metric] = _pair([matches[-1].group(1), matches[-1].group(2)], lo, hi)
    return out


_RM_SCORES = re.compile(r"\[Scores\]\s*:?\s*\(?\s*(?:[^\d(),:\n]{0,24}:\s*)?(\d+(?:\.\d+)?)\s*,\s*"
                        r"(?:[^\d(),:\n]{0,24}:\s*)?(\d+(?:\.\d+)?)")


def parse_rm_scores(text: str, lo: float = 0, hi: float = 10) -> tuple[float, float] | None:
    """The (model A, model B) pair of a reply in MMRole-Eval's format, "{evaluation}, [Scores]: (A, B)" (also
    "[Scores]: A, B" and labelled numbers, "(Model A: 7, Model B: 8)"); the last such statement wins. A score
    of 0 is valid (MMRole's reward model gives it). None when there is no pair within [lo, hi]."""
    found = None
    for match in _RM_SCORES.finditer(text):
        a, b = _in_range(match.group(1), lo, hi), _in_range(match.group(2), lo, hi)
        found = (a, b) if a is not None and b is not None else None
    return found


def ratio_scores(pairs: Sequence[dict[str, tuple[float, float] | None] | None],
                 metrics: tuple[str, ...] = MMROLE_METRICS) -> dict[str, float | None]:
    """MMRole-Eval's aggregate (its eval/RM_result.py): per metric the mean over items of model / reference,
    over the items that have the pair (a reference score of 0 leaves the item out: its ratio is undefined);
    `overall` the mean of the metric means. None where no item was scored."""
    out: dict[str, float | None] = {}
    for metric in metrics:
        ratios = [pair[0] / pair[1] for p in pairs if p is not None
                  for pair in [p.get(metric)] if pair is not None and pair[1] > 0]
        out[metric] = sum(ratios) / len(ratios) if ratios else None
    known = [v for v in out.values() if v is not None]
    out["overall"] = sum(known) / len(known) if known else None
    return out


# -- requests ------------------------------------------------------------------------------------------
@dataclass
class JudgeRequest:
    """One question for the judge: a template, its fields, and how to read the answer."""

    template: str  # a TEMPLATE_NAMES entry other than "system" (with `messages`: only a label for the cache)
    fields: dict[str, str]
    kind: str = "score"  # "score" (1-7) | "pairs" (MMRole pairs, JSON) | "rm_pair" (one "[Scores]: (A, B)")
    messages: list[dict[str, Any]] | None = None  # the chat messages as a protocol built them (text and images)


@dataclass
class JudgeResult:
    value: Any  # float for "score", dict metric -> (model, reference) for "pairs"; None when missing
    raw: str = ""
    attempts: int = 0
    cached: bool = False
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _Transient(Exception):
    pass


class JudgeClient:
    """Scores JudgeRequests through an OpenAI-compatible endpoint, `concurrency` at a time."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, cache_dir: Path | None = None,
                 templates_dir: Path | None = None, concurrency: int = 4, max_attempts: int = 3,
                 timeout: float = 120.0, retry_wait: float = 0.5, temperature: float = 0.0):
        if not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"--judge-url {base_url!r}: give the http(s) URL of an OpenAI-compatible API, "
                             "e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
        if not model:
            raise JudgeError("--judge-model is required with --judge-url (the model name the endpoint serves)")
        self._api_key: str | None = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise JudgeError(f"--judge-key-env {api_key_env}: that environment variable is not set or empty; "
                                 f"export {api_key_env}=<your key>, or leave out --judge-key-env for a keyless endpoint")
            self._api_key = key
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else f"{base}/chat/completions"
        self.model, self.timeout, self.temperature = model, timeout, temperature
        self.concurrency, self.max_attempts, self.retry_wait = max(1, concurrency), max(1, max_attempts), retry_wait
        self.templates = load_templates(templates_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.calls = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # the key never appears, even in a debugger or a log of objects
        return f"JudgeClient(url={self.url!r}, model={self.model!r})"

    # -- transport --------------------------------------------------------------------------------------
    def _post(self, messages: list[dict[str, Any]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._lock:
            self.calls += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - user's URL
                data = json.loads(response.read())
        except urllib.error.HTTPError as err:
            if err.code in _TRANSIENT:
                raise _Transient(f"HTTP {err.code}") from None
            hint = " (check --judge-key-env)" if err.code in (401, 403) else " (check --judge-url and --judge-model)"
            raise JudgeError(f"judge endpoint {self.url}: HTTP {err.code}{hint}") from None
        except (TimeoutError, OSError, ValueError) as err:
            raise _Transient(f"no usable answer ({type(err).__name__})") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise _Transient("the reply is not a chat completion") from None
        if not isinstance(content, str):
            raise _Transient("choices[0].message.content is not text")
        return content

    # -- one request ------------------------------------------------------------------------------------
    def messages(self, request: JudgeRequest) -> list[dict[str, Any]]:
        if request.messages is not None:
            return request.messages
        template = self.templates.get(request.template)
        if template is None or request.template == "system":
            raise ValueError(f"unknown judge template {request.template!r}; known: {TEMPLATE_NAMES[1:]}")
        return [{"role": "system", "content": self.templates["system"].safe_substitute().strip()},
                {"role": "user", "content": template.safe_substitute(request.fields).strip()}]

    def _key(self, request: JudgeRequest, messages: list[dict[str, Any]]) -> str:
        import hashlib

        canonical = json.dumps({"url": self.url, "model": self.model, "kind": request.kind, "messages": messages,
                                "temperature": self.temperature}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def _parse(self, request: JudgeRequest, text: str) -> tuple[Any, str | None]:
        if request.kind == "pairs":
            pairs = parse_pair_scores(text)
            missing = [m for m, v in pairs.items() if v is None]
            return (pairs, None) if not missing else (None, f"no score pair for {', '.join(missing)}")
        if request.kind == "rm_pair":
            pair = parse_rm_scores(text)
            return (pair, None) if pair is not None else (None, "no \"[Scores]: (A, B)\" with scores from 0 to 10")
        score = parse_score(text)
        return (score, None) if score is not None else (None, "no score from 1 to 7 found")

    def score(self, request: JudgeRequest) -> JudgeResult:
        messages = self.messages(request)
        key = self._key(request, messages)
        cached = self._cache_get(key)
        if cached is not None:
            value = cached["value"]
            if request.kind == "pairs":
                value = {m: tuple(v) if v is not None else None for m, v in value.items()}
            elif request.kind == "rm_pair":
                value = tuple(value)
            return JudgeResult(value, cached.get("raw", ""), 0, cached=True)
        problems: list[str] = []
        conversation = list(messages)
        raw = ""
        for attempt in range(self.max_attempts):
            try:
                raw = self._post(conversation)
            except _Transient as err:
                problems.append(str(err))
                self._sleep(attempt)
                continue
            value, problem = self._parse(request, raw)
            if problem is None:
                self._cache_put(key, request, value, raw)
                return JudgeResult(value, raw, attempt + 1)
            problems.append(problem)
            conversation = [*messages, {"role": "assistant", "content": raw[:4000]},
                            {"role": "user", "content": f"I could not read your verdict: {problem}. Give the verdict "
                                                        "again, ending exactly in the format the task asked for."}]
        return JudgeResult(None, raw, self.max_attempts, error="; ".join(problems[-3:]))

    def score_many(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        """All requests, `concurrency` in flight; results in request order."""
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.score, requests))

    def _sleep(self, attempt: int) -> None:
        if attempt + 1 < self.max_attempts and self.retry_wait > 0:
            time.sleep(min(self.retry_wait * 2**attempt, 30.0))

    # -- cache ------------------------------------------------------------------------------------------
    def _cache_get(self, key: str) -> dict[str, Any] | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, ValueError):
            return None  # an unreadable entry is simply asked again

    def _cache_put(self, key: str, request: JudgeRequest, value: Any, raw: str) -> None:
        if self.cache_dir is None:
            return
        record = {"template": request.template, "model": self.model, "value": value, "raw": raw}
        write_json(self.cache_dir / f"{key}.json", record, indent=1)
