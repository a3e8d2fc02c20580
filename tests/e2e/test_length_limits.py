"""Prompt and completion lengths on the real engine (the session one has a 1,024-token context).

The gateway bounds bytes and ``max_tokens`` itself (tests/server/gateway/test_limits.py);
the token length of a prompt is known only to the engine, whose refusal must
reach the client as a precise OpenAI-shaped 400.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests import reliability
from tests.e2e.conftest import TenantKeys
from tests.e2e.probes import Probes
from tests.e2e.serving import ServeProcess

pytestmark = pytest.mark.reliability

CONTEXT = 1024
"""The session engine's --engine-max-model-len (tests/e2e/conftest.py)."""


def test_prompts_and_completions_past_the_context_are_400(
    gateway: ServeProcess, acme: TenantKeys, base_name: str
) -> None:
    long_text = " ".join(f"word{i}" for i in range(2 * CONTEXT))
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("/v1/completions", {"prompt": long_text, "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}]}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2 * CONTEXT}),
    ]
    probes = Probes()
    for path, body in bodies:
        reply = httpx.post(
            gateway.url + path,
            json={"model": base_name, **body},
            headers={"authorization": f"Bearer {acme.key}"},
            timeout=120,
        )
        what = f"{path} {sorted(body)}"
        probes.error(reply, 400, what)
        probes.check(str(CONTEXT) in reply.text, f"{what}: message names no limit: {reply.text}")
    ok = httpx.post(
        gateway.url + "/v1/completions",
        json={"model": base_name, "prompt": "hi", "max_tokens": 4},
        headers={"authorization": f"Bearer {acme.key}"},
        timeout=120,
    )
    probes.check(ok.status_code == 200, f"a short request after them: {ok.text[:200]}")
    reliability.record("limits", "prompt and completion tokens past the engine's context",
                       probes.tried, "requests", len(probes.leaks), "not bounded")  # fmt: skip
    assert probes.leaks == []
