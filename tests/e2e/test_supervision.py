"""The engine supervisor: a killed engine fails cleanly, comes back, never outlives serve."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from registry import LocalBlobStore, Registry
from tests import reliability
from tests.e2e.conftest import ENGINE_ARGS, make_tenant
from tests.e2e.serving import ServeProcess, free_port, metric_samples, wait_gone


@pytest.fixture
def own_serve(demo_base: Path, tmp_path: Path) -> Iterator[ServeProcess]:
    serve = ServeProcess(
        tmp_path,
        args=["--base-model", str(demo_base), "--engine-port", str(free_port()), *ENGINE_ARGS],
    ).start()
    try:
        serve.wait_ready()
        yield serve
    finally:
        serve.stop()  # a no-op when the test stopped it; else no serve outlives a failure


def _clean_engine_failure(outcome: BaseException | str) -> bool:
    """An API error (a stream's error event included) that says the engine failed.

    A dropped connection or a timeout is not clean: the client must be told, in
    OpenAI's shape, and a stream must end with an error event.
    """
    if not isinstance(outcome, openai.APIError) or isinstance(outcome, openai.APIConnectionError):
        return False
    if isinstance(outcome, openai.APIStatusError):
        code = outcome.response.json()["error"]["code"]
        clean_code = code.startswith("engine_") or code == "no_engine"
        return outcome.status_code in (502, 503, 504) and clean_code
    return True


def _long_request(
    client: OpenAI,
    model: str,
    stream: bool,
    outcomes: list[BaseException | str],
    generating: threading.Event,
) -> None:
    """A 900-token generation, streamed or not; how it ended goes to ``outcomes``.

    A stream sets ``generating`` at its first event: the engine is then mid-generation
    (a fixed sleep instead let both requests finish first on a fast, quiet machine)."""
    try:
        answer = client.completions.create(
            model=model,
            prompt="Once",
            max_tokens=900,
            stream=stream,
            extra_body={"ignore_eos": True},
        )
        if stream:
            for _ in answer:  # type: ignore[union-attr]
                generating.set()
        outcomes.append("stream finished" if stream else "completion finished")
    except BaseException as exc:
        outcomes.append(exc)


@pytest.mark.reliability
def test_killed_engine_fails_cleanly_restarts_and_leaves_no_orphans(
    own_serve: ServeProcess, base_name: str
) -> None:
    registry = Registry(
        f"sqlite:///{own_serve.home / 'registry.db'}", LocalBlobStore(own_serve.home / "blobs")
    )
    key = make_tenant(registry, "solo").key
    registry.close()
    client = OpenAI(base_url=own_serve.url + "/v1", api_key=key, max_retries=0, timeout=120)
    assert client.completions.create(model=base_name, prompt="Hi", max_tokens=2).choices

    # Requests in flight when the engine dies: long generations, streaming and not.
    outcomes: list[BaseException | str] = []
    generating = threading.Event()
    threads = [
        threading.Thread(
            target=_long_request, args=(client, base_name, stream, outcomes, generating)
        )
        for stream in (True, False)
    ]
    for t in threads:
        t.start()
    assert generating.wait(timeout=120), outcomes
    [engine] = own_serve.engine_processes()
    engine.kill()
    for t in threads:
        t.join(timeout=60)
    hung = sum(t.is_alive() for t in threads)

    # While it is down: a clean 503, not a hang.
    try:
        client.completions.create(model=base_name, prompt="Hi", max_tokens=2)
        outcomes.append("served while the engine was down")
    except BaseException as exc:
        outcomes.append(exc)

    own_serve.wait_ready(timeout=600)
    recovered = bool(client.completions.create(model=base_name, prompt="Hi", max_tokens=2).choices)
    unclean = [o for o in outcomes if not _clean_engine_failure(o)]
    reliability.record(
        "faults",
        "engine killed mid-stream and mid-request, then one request while it is down",
        len(outcomes) + hung,
        "requests",
        hung + len(unclean) + (not recovered),
        "hangs, unclean failures or no recovery",
    )
    assert hung == 0, "a request hung after the engine died"
    assert len(outcomes) == 3 and unclean == [], outcomes
    assert recovered
    restarts = metric_samples(own_serve.url, "loraplex_engine_restarts")
    assert [value for _, value in restarts] == [1.0]

    [new_engine] = own_serve.engine_processes()
    assert new_engine.pid != engine.pid
    family = own_serve.all_descendants()
    assert own_serve.stop()
    assert not wait_gone(family), "engine processes outlived loraplex serve"
