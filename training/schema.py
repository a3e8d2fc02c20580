"""JSON-schema format checks for answers (``jsonschema`` only: light enough for the gateway)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema


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
