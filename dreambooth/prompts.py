"""Prompt templates: the one place ``{token}`` and ``{class}`` are filled in.

Templates and captions are text, not format strings: only the two documented placeholders are
replaced, and any other braces (``{a red ball}``, ``{0}``, ``{``) are kept as written.
"""

from __future__ import annotations

PLACEHOLDERS = ("{token}", "{class}")


def fill_prompt(template: str, token: str, class_noun: str) -> str:
    """``template`` with ``{token}`` and ``{class}`` replaced; everything else unchanged."""
    parts = template.split("{token}")
    return token.join(p.replace("{class}", class_noun) for p in parts)
