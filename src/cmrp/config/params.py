"""A resolved config as tracking parameters: secrets hidden, nested keys flattened.

MLflow params are flat strings and are visible to anyone with access to the tracking server, so
a recipe is redacted before it is logged and flattened to `section.key -> value`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["REDACTED", "Redactor", "environ_snapshot", "flatten", "is_secret_key", "redact_secrets",
           "remember_secrets"]

REDACTED = "***"
_SECRET_WORDS = {"token", "password", "passwd", "secret", "apikey", "credential", "credentials"}
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")


def _words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [word.lower() for word in re.split(r"[^A-Za-z0-9]+", spaced) if word]


def is_secret_key(key: str) -> bool:
    """`api_key`, `hf_token`, `clientSecret`, `DB_PASSWORD` are secret; `max_text_tokens` and
    `tokenizer` are not (whole words are compared, not substrings)."""
    words = _words(key)
    joined = "".join(words)
    return bool(_SECRET_WORDS.intersection(words)) or "apikey" in joined or "accesskey" in joined


def environ_snapshot() -> dict[str, str]:
    """A copy of the environment taken in one step. Iterating `os.environ` itself is not safe while another
    thread sets or unsets a variable (MLflow's telemetry thread does, at any time): a key listed at the start
    of the walk may be gone when its value is read (`KeyError`). The copy of the underlying dict is one
    C-level operation under the interpreter's lock."""
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict):
        raw = data.copy()
        return {os.environ.decodekey(k): os.environ.decodevalue(v) for k, v in raw.items()}  # type: ignore[attr-defined]
    for _ in range(100):  # another platform's mapping: retry a walk that raced a change
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return {}


_REMEMBERED: set[str] = set()  # values of secret-named config keys read in this process


def remember_secrets(value: Any, key: str = "") -> None:
    """Note the values of secret-named keys in `value` (a parsed YAML document or override), so that any text
    later passed through redaction — an error message about a rejected override, a logged string — hides
    them even where the key is not named next to them. Values shorter than 4 characters are too common."""
    if isinstance(value, Mapping):
        for item_key, item in value.items():
            remember_secrets(item, str(item_key) if is_secret_key(str(item_key)) else key)
    elif isinstance(value, list | tuple):
        for item in value:
            remember_secrets(item, key)
    elif key and value is not None and not isinstance(value, bool) and len(str(value)) >= 4:
        _REMEMBERED.add(str(value))


def _secret_env_values(environ: dict[str, str]) -> tuple[str, ...]:
    """Values of environment variables named like secrets (`OPENAI_API_KEY`, `CMRP_JUDGE_API_KEY`,
    `MLFLOW_TRACKING_TOKEN`, `HF_TOKEN` ...) and of secret-named config keys read so far, longest first;
    short environment values are left alone (too common)."""
    values = {value for name, value in environ.items() if is_secret_key(name) and len(value) >= 8}
    return tuple(sorted(values | _REMEMBERED, key=len, reverse=True))


def _hide(text: str, secrets: tuple[str, ...]) -> str:
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


@dataclass(frozen=True)
class Redactor:
    """Hides secrets in texts and configs. The secret values of the environment are read once, when it is
    made (`Redactor.from_environ()`, once per run), never again per call."""

    secrets: tuple[str, ...] = ()

    @classmethod
    def from_environ(cls) -> Redactor:
        return cls(_secret_env_values(environ_snapshot()))

    def text(self, text: Any) -> str:
        """`text` with URI passwords and the secret environment values hidden."""
        return _hide(str(text), self.secrets)

    def mapping(self, mapping: Mapping[str, Any]) -> dict[str, Any]:
        redacted = _redact(_to_plain(mapping), self.secrets)
        assert isinstance(redacted, dict)
        return redacted


def _to_plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _redact(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, Mapping):
        return {
            key: REDACTED if is_secret_key(str(key)) and item not in (None, "") else _redact(item, secrets)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(item, secrets) for item in value]
    if isinstance(value, str):
        return _hide(value, secrets)
    return value


def redact_secrets(mapping: Mapping[str, Any], redactor: Redactor | None = None) -> dict[str, Any]:
    """A deep copy with the values of secret-looking keys replaced by `***` (unset values stay
    null/empty so "no token" is still visible), passwords in `scheme://user:pw@host` hidden, and the value
    of any secret-named environment variable hidden wherever it appears in a string. `redactor`: the run's
    (its environment read once); default: a fresh one."""
    return (redactor or Redactor.from_environ()).mapping(mapping)


def _render(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{key}:{_render(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_render(item) for item in value) + "]"
    return str(value)


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{trainer: {max_steps: 50}, stages: [sft, grpo]}` -> `{trainer.max_steps: '50',
    stages: '[sft,grpo]'}`. Empty mappings are kept as `{}` so the key stays visible."""
    out: dict[str, str] = {}
    for key, value in _to_plain(cfg).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = _render(value)
    return out
