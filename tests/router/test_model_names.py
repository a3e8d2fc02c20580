"""Parsing of a request's ``model`` string."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router import (
    MAX_MODEL_NAME_LENGTH,
    InvalidModelName,
    ModelRef,
    RefKind,
    parse_model_name,
)

BASES = {"demo-base", "org/Base-Model:v1"}
NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(NAME_CHARS[:62]),
    st.text(alphabet=NAME_CHARS, max_size=63),
)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("demo-base", ModelRef(RefKind.BASE, "demo-base")),
        ("org/Base-Model:v1", ModelRef(RefKind.BASE, "org/Base-Model:v1")),
        ("support-bot", ModelRef(RefKind.ADAPTER, "support-bot")),
        ("a", ModelRef(RefKind.ADAPTER, "a")),
        ("A.b_c-9", ModelRef(RefKind.ADAPTER, "A.b_c-9")),
        ("bot@1", ModelRef(RefKind.PINNED, "bot", version=1)),
        ("bot@42", ModelRef(RefKind.PINNED, "bot", version=42)),
        ("bot@999999999", ModelRef(RefKind.PINNED, "bot", version=999999999)),
        ("bot:canary", ModelRef(RefKind.ALIAS, "bot", alias="canary")),
        ("bot:production", ModelRef(RefKind.ALIAS, "bot", alias="production")),
        # LoRA names are the gateway's business: here they parse like any adapter form.
        ("lx-0123456789abcdef", ModelRef(RefKind.ADAPTER, "lx-0123456789abcdef")),
        ("lx-0123456789abcdef@2", ModelRef(RefKind.PINNED, "lx-0123456789abcdef", version=2)),
        ("LX-ABC", ModelRef(RefKind.ADAPTER, "LX-ABC")),
        ("lx-mine:canary", ModelRef(RefKind.ALIAS, "lx-mine", alias="canary")),
        ("demo-base@1", ModelRef(RefKind.PINNED, "demo-base", version=1)),
    ],
)
def test_parses_valid_names(model: str, expected: ModelRef) -> None:
    assert parse_model_name(model, BASES) == expected


MALFORMED = [
    "",
    " ",
    " bot",
    "bot ",
    "b ot",
    "bot\n",
    "bot\t",
    "bot\x00",
    "bot\x7f",
    "bot\u0085",
    "bot\u00a0",
    "bot\u2003",
    "x" * (MAX_MODEL_NAME_LENGTH + 1),
    "x" * 65,
    "bot@0",
    "bot@-1",
    "bot@x",
    "bot@",
    "bot@01",
    "bot@1.0",
    "bot@1234567890",
    "bot@\u0661",  # Arabic-Indic digit one
    "bot@\uff11",  # fullwidth digit one
    "a:b:c",
    "bot:",
    ":alias",
    "@1",
    "bot@1:canary",
    "bot:canary@1",
    "bot:-x",
    "-bot",
    ".bot",
    "_bot",
    "b/ot",
    "b\u043et",  # Cyrillic o
    "\uff42ot",  # fullwidth b
    "bot\u200b",  # zero-width space
    "démo",
    "K\u212a",  # Kelvin sign
    "bot#1",
    "bot@@1",
]


@pytest.mark.parametrize("model", MALFORMED)
def test_rejects_malformed_names(model: str) -> None:
    with pytest.raises(InvalidModelName):
        parse_model_name(model, BASES)


def test_error_messages_say_what_to_do() -> None:
    with pytest.raises(InvalidModelName, match=r"adapter@N"):
        parse_model_name("bot@0", BASES)
    with pytest.raises(InvalidModelName, match=r"limit is 128"):
        parse_model_name("x" * 200, BASES)
    with pytest.raises(InvalidModelName, match=r"empty"):
        parse_model_name("", BASES)


def test_matching_is_case_sensitive_and_exact() -> None:
    assert parse_model_name("Demo-Base", BASES) == ModelRef(RefKind.ADAPTER, "Demo-Base")
    assert parse_model_name("Bot", BASES).name != parse_model_name("bot", BASES).name


@given(name=names)
def test_any_valid_name_round_trips(name: str) -> None:
    assert parse_model_name(name, ()) == ModelRef(RefKind.ADAPTER, name)


@given(name=names, version=st.integers(min_value=1, max_value=999_999_999))
def test_any_pinned_version_round_trips(name: str, version: int) -> None:
    assert parse_model_name(f"{name}@{version}", ()) == ModelRef(
        RefKind.PINNED, name, version=version
    )


@given(name=names, alias=names)
def test_any_alias_round_trips(name: str, alias: str) -> None:
    assert parse_model_name(f"{name}:{alias}", ()) == ModelRef(RefKind.ALIAS, name, alias=alias)


@given(model=st.text(max_size=140))
def test_arbitrary_text_parses_or_raises_invalid(model: str) -> None:
    try:
        ref = parse_model_name(model, BASES)
    except InvalidModelName:
        return
    assert model.isascii() or model in BASES
    assert ref.name and ref.name in model


@given(name=names, version=st.integers(max_value=0))
def test_non_positive_versions_are_rejected(name: str, version: int) -> None:
    with pytest.raises(InvalidModelName):
        parse_model_name(f"{name}@{version}", ())
