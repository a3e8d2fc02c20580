"""LoRA names: their one format, the namespace clients never enter, and hiding them."""

from __future__ import annotations

import json

import pytest

from registry.lora_names import HEX_DIGITS, PREFIX, hide, in_namespace, is_lora_name, lora_name

FINGERPRINT = "0123456789abcdef" + "f" * 48
LORA = "lx-0123456789abcdef"


def test_a_lora_name_is_the_prefix_and_the_fingerprints_first_digits() -> None:
    assert lora_name(FINGERPRINT) == LORA
    assert len(LORA) == len(PREFIX) + HEX_DIGITS
    assert is_lora_name(lora_name(FINGERPRINT))


@pytest.mark.parametrize(
    "name",
    [
        "lx-0123456789abcde",  # a digit short
        "lx-0123456789abcdef0",  # a digit long
        "lx-0123456789ABCDEF",  # upper-case hex
        "LX-0123456789abcdef",  # upper-case prefix
        "lx-0123456789abcdeg",
        "lx-0123456789abcdef@1",
        " lx-0123456789abcdef",
        "lx-0123456789abcdef\n",
        "0123456789abcdef",
        "",
    ],
)
def test_only_the_exact_form_is_a_lora_name(name: str) -> None:
    assert not is_lora_name(name)


@pytest.mark.parametrize(
    "name", [LORA, "lx-", "lx-mine", "LX-abc", "Lx-0", "lX-bot@1", "lx-a:canary"]
)
def test_the_namespace_is_the_prefix_in_any_case(name: str) -> None:
    assert in_namespace(name)


@pytest.mark.parametrize("name", ["lx", "lxa", "alx-", "x-lx-", " lx-a", "l-x", ""])
def test_names_merely_containing_lx_are_outside_the_namespace(name: str) -> None:
    assert not in_namespace(name)


def test_hide_replaces_the_model_in_compact_json() -> None:
    body = json.dumps({"model": LORA, "choices": []}, separators=(",", ":")).encode()
    assert json.loads(hide(body, LORA, "bot@2")) == {"model": "bot@2", "choices": []}


def test_hide_replaces_the_model_in_spaced_json() -> None:
    body = b'{"model": "' + LORA.encode() + b'", "object": "chat.completion"}'
    assert hide(body, LORA, "bot") == b'{"model": "bot", "object": "chat.completion"}'


def test_hide_replaces_the_name_inside_an_error_message() -> None:
    body = json.dumps({"error": {"message": f"The model `{LORA}` does not exist."}}).encode()
    hidden = hide(body, LORA, "bot")
    assert LORA.encode() not in hidden
    assert json.loads(hidden)["error"]["message"] == "The model `bot` does not exist."


def test_hide_escapes_a_shown_name_that_json_must_escape() -> None:
    shown = 'org/"quoted"\\name'
    body = b'data: {"model":"' + LORA.encode() + b'","object":"chat.completion.chunk"}\n\n'
    hidden = hide(body, LORA, shown)
    event = json.loads(hidden.removeprefix(b"data: "))
    assert event == {"model": shown, "object": "chat.completion.chunk"}


def test_hide_leaves_data_alone_when_nothing_is_hidden() -> None:
    body = b'{"model":"bot"}'
    assert hide(body, LORA, "bot") == body
    assert hide(body, "bot", "bot") is body  # shown as itself: not even copied
