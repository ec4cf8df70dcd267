"""A small client for OpenAI-compatible chat endpoints, with JSON repair, retries and an on-disk cache.

Only the standard library: `cmrp data build` must work wherever cmrp installs. The API key is read
from an environment variable and only ever placed in the Authorization header — never in an error
message, a log line or a cache file. Each finished item is cached as one file named by the SHA-256 of
its initial request (model + messages), so an interrupted build resumes without paying twice.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmrp.errors import CmrpError, DataError
from cmrp.jsonio import write_json

__all__ = [
    "ChatClient",
    "LLMError",
    "ResponseCache",
    "extract_json",
    "image_data_url",
    "request_key",
]

TRANSIENT_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)
Validator = Callable[[Any], tuple[Any, str | None]]


class LLMError(CmrpError):
    """An item could not be obtained from the endpoint (after every retry)."""


class _Transient(Exception):
    """A failure worth retrying (rate limit, server error, timeout, dropped connection)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def request_key(model: str, messages: list[dict]) -> str:
    """The cache key of an item: SHA-256 of its initial request, canonical JSON."""
    canonical = json.dumps({"model": model, "messages": messages}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def image_data_url(path: Path, max_side: int = 512) -> str:
    """The image as a PNG data URL, shrunk to `max_side` (fewer tokens, same content)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _strip_fences(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        first_newline = text.find("\n")
        text = text[first_newline + 1:] if first_newline >= 0 else ""
        end = text.rfind("```")
        if end >= 0:
            text = text[:end]
    return text.strip()


def extract_json(text: str) -> tuple[Any, str | None]:
    """The first JSON object in a model's answer (code fences and chatter around it ignored)."""
    text = _strip_fences(text)
    try:
        return json.loads(text), None
    except (json.JSONDecodeError, RecursionError):
        pass
    decoder = json.JSONDecoder()
    start = text.find("{")
    last_error = "the answer contains no JSON object"
    while start >= 0:
        try:
            value, _ = decoder.raw_decode(text, start)
            return value, None
        except json.JSONDecodeError as err:
            last_error = f"invalid JSON ({err.msg} at character {err.pos})"
        except RecursionError:
            last_error = "the JSON nests too deeply"
        start = text.find("{", start + 1)
    return None, last_error


class ResponseCache:
    """One JSON file per finished item, written atomically (a killed build leaves no half file)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> Any | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["value"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable: the item is simply asked again

    def put(self, key: str, item: str, value: Any) -> None:
        path = self.path(key)
        write_json(path, {"item": item, "value": value}, indent=1)


@dataclass
class ChatClient:
    """POSTs chat completions to `<base_url>/chat/completions`; retries with exponential backoff."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    max_attempts: int = 5
    retry_wait: float = 1.0
    max_wait: float = 30.0
    temperature: float = 0.7

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise DataError(f"--base-url {self.base_url!r}: give an http(s) URL of an OpenAI-compatible API, "
                            "e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
        self.base_url = self.base_url.rstrip("/")
        self.calls = 0
        self._lock = threading.Lock()

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers,
                                         method="POST")
        with self._lock:
            self.calls += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - user's URL
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = _error_detail(err)
            if err.code in TRANSIENT_STATUS:
                raise _Transient(f"HTTP {err.code}{detail}", _retry_after(err)) from None
            hint = " (check the API key environment variable)" if err.code in (401, 403) else ""
            raise LLMError(f"{self.base_url}: HTTP {err.code}{detail}{hint}") from None
        except (TimeoutError, OSError) as err:  # URLError, connection reset, socket timeout
            reason = getattr(err, "reason", err)
            raise _Transient(f"no answer ({reason})") from None
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Transient("the endpoint's reply is not a chat completion (no choices[0].message.content)") from None
        if not isinstance(content, str):
            raise _Transient("choices[0].message.content is not text")
        return content

    def complete_json(self, messages: list[dict], validate: Validator, *, label: str) -> Any:
        """Ask until an answer parses and validates; a bad answer is sent back with the reason."""
        conversation = list(messages)
        problems: list[str] = []
        for attempt in range(self.max_attempts):
            try:
                text = self._post(conversation)
            except _Transient as err:
                problems.append(str(err))
                self._sleep(attempt, err.retry_after)
                continue
            value, error = extract_json(text)
            if error is None:
                value, error = validate(value)
                if error is None:
                    return value
            problems.append(error)
            conversation = [*messages, {"role": "assistant", "content": text[:4000]},
                            {"role": "user", "content": f"That answer cannot be used: {error}. Reply again with "
                                                        "only the corrected JSON object, no other text."}]
        raise LLMError(f"{label}: no usable answer after {self.max_attempts} attempts ({'; '.join(problems[-3:])}); "
                       "run the same command again to retry (finished items are cached), or raise --max-attempts")

    def _sleep(self, attempt: int, retry_after: float | None) -> None:
        if attempt + 1 >= self.max_attempts:
            return
        wait = self.retry_wait * (2 ** attempt) * (1 + 0.25 * random.random())
        if retry_after is not None:
            wait = max(wait, retry_after)
        time.sleep(min(wait, self.max_wait))


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        text = err.read(300).decode("utf-8", "replace").strip()
    except Exception:  # noqa: BLE001 - the detail is optional
        return ""
    return f": {text[:200]}" if text else ""


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    value = err.headers.get("Retry-After") if err.headers else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
