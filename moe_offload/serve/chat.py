"""Chat templates from tokenizer_config.json, rendered with jinja2 the way transformers renders them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MoeOffloadError


class ChatTemplateError(MoeOffloadError):
    """A template is missing or raised (via raise_exception) while rendering."""


@dataclass(frozen=True)
class ChatTemplate:
    """`chat_template` with the special tokens it may use; `render(messages)` -> prompt text."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def from_model_dir(cls, path: Path) -> "ChatTemplate | None":
        """The folder's tokenizer_config.json template (None when there is none)."""
        f = Path(path) / "tokenizer_config.json"
        if not f.is_file():
            return None
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MoeOffloadError(f"{f}: not valid JSON: {exc}") from None
        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default")
        if tpl is None:
            return None
        if not isinstance(tpl, str):
            raise MoeOffloadError(f"{f}: chat_template must be a string or a list of named templates")
        return cls(tpl, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """messages [{"role", "content"}] -> the prompt text (transformers' jinja environment settings)."""
        return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=self.bos_token, eos_token=self.eos_token)


def _token_text(tok: Any) -> str:
    if isinstance(tok, dict):  # AddedToken serialised
        return str(tok.get("content", ""))
    return tok if isinstance(tok, str) else ""


def _raise(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _compile(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from None
