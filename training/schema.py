"""Format checks for answers: a JSON schema (``jsonschema`` only: light enough for the
gateway) and a regular expression."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

MAX_REGEX_CHARS = 1024
"""Longest ``answer_regex`` a job may give (its column's width)."""


def is_compliant(text: str, schema: dict[str, Any]) -> bool:
    """True when ``text`` parses as JSON and validates against ``schema``."""
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def check_schema(schema: dict[str, Any]) -> None:
    """Raise ``jsonschema.SchemaError`` if ``schema`` is not a valid JSON schema."""
    jsonschema.validators.validator_for(schema).check_schema(schema)


class RegexError(ValueError):
    """An ``answer_regex`` that is too long or does not compile; the message says which."""


def check_regex(pattern: str) -> re.Pattern[str]:
    """The compiled ``pattern``; ``RegexError`` when it is empty, too long or invalid."""
    if not pattern:
        raise RegexError("answer_regex must not be empty")
    if len(pattern) > MAX_REGEX_CHARS:
        raise RegexError(
            f"answer_regex is {len(pattern)} characters; at most {MAX_REGEX_CHARS} are allowed"
        )
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise RegexError(f"answer_regex is not a valid regular expression: {exc}") from None


def matches_regex(text: str, pattern: re.Pattern[str]) -> bool:
    """True when the whole (whitespace-trimmed) answer matches, as exact match trims it."""
    return pattern.fullmatch(text.strip()) is not None
