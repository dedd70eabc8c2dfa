"""Prompt templates: Jinja files in roles/prompts/ that a user can edit or override one by one.

Roles render their messages from these files, then the model's own chat template turns the messages into
the prompt text (`tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)`), so the
same prompts work for any chat model. A `prompt_dir` in the role's config is searched first: a user copies
the one file they want to change.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jinja2

log = logging.getLogger(__name__)

PACKAGE_PROMPTS = Path(__file__).resolve().parent / "prompts"


class PromptTemplates:
    def __init__(self, prompt_dir: str | Path | None = None):
        dirs = [str(PACKAGE_PROMPTS)]
        if prompt_dir is not None:
            if not Path(prompt_dir).is_dir():
                raise FileNotFoundError(f"prompt_dir {prompt_dir!r} is not a directory")
            dirs.insert(0, str(prompt_dir))
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(dirs), undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True, autoescape=False,
        )

    def render(self, name: str, **variables: Any) -> str:
        try:
            return self.env.get_template(name).render(**variables)
        except jinja2.TemplateNotFound:
            raise FileNotFoundError(f"prompt template {name!r} not found in {self.env.loader.searchpath}") from None
        except jinja2.UndefinedError as e:
            raise ValueError(f"prompt template {name!r}: {e}") from None


def chat_prompt(tokenizer: Any, system: str, user: str) -> str:
    """The generation prompt for a system + user exchange, in the model's chat format.

    Templates that refuse a system role (Gemma, some Mistral versions) get the system text prepended to the
    user message; a tokenizer with no chat template at all gets a plain "System/User/Assistant" layout.
    """
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None) is None:
        log.warning("tokenizer has no chat template; using a plain System/User/Assistant layout")
        return f"System: {system}\n\nUser: {user}\n\nAssistant:"
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except jinja2.TemplateError:
        merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
        return tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text that already carries its special tokens (chat-templated prompts, tool output)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
