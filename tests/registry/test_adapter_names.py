"""The registry's rule for new adapter names agrees with the names requests can address."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from registry import InvalidRequest
from registry.adapter_names import check_adapter_name
from registry.lora_names import in_namespace
from router import InvalidModelName, RefKind, parse_model_name

NAME_CHARS = "ABCXYZabclxyz0189._-"
candidates = st.text(alphabet=NAME_CHARS + "@:/ \u043e\u00e9\uff11", max_size=70)


def creatable(name: str) -> bool:
    try:
        check_adapter_name(name)
    except InvalidRequest:
        return False
    return True


def addressable(name: str) -> bool:
    """Whether a request for ``name`` reaches the adapter of that name (not a base, not hidden)."""
    try:
        ref = parse_model_name(name, ())
    except InvalidModelName:
        return False
    return ref.kind is RefKind.ADAPTER and ref.name == name and not in_namespace(name)


@given(name=candidates)
@example(name="a" * 64)
@example(name="a" * 65)
@example(name="lx-0123456789abcdef")
@example(name="LX-bot")
def test_an_adapter_may_be_created_exactly_under_the_names_requests_can_address(
    name: str,
) -> None:
    assert creatable(name) == addressable(name)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("lx-0123456789abcdef", "is in the 'lx-' namespace (in any case)"),
        ("LX-bot", "is in the 'lx-' namespace (in any case)"),
        ("lx-", "is in the 'lx-' namespace (in any case)"),
        ("b" * 65, "is not valid: use 1-64 ASCII letters"),
        ("", "is not valid: use 1-64 ASCII letters"),
        ("-bot", "is not valid: use 1-64 ASCII letters"),
        ("bot@2", "is not valid: use 1-64 ASCII letters"),
        ("b\u043et", "is not valid: use 1-64 ASCII letters"),  # Cyrillic o
    ],
)
def test_refusals_say_why_and_what_to_do(name: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(f"adapter name {name!r} {message}")):
        check_adapter_name(name)


@pytest.mark.parametrize("name", ["lx", "lxa", "alx-", "x-lx-", "Bot.v2_final-1"])
def test_names_merely_near_the_namespace_may_be_created(name: str) -> None:
    check_adapter_name(name)
