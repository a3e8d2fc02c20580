"""The chaos soak's checks on hand-made records: each one catches what it is for.

Records here are invented (no fleet runs); ``tests/e2e/test_chaos.py`` runs the
checks on a real soak.
"""

from __future__ import annotations

from typing import Any

from server.dev.chaos_checks import (
    AliasEvent,
    Call,
    Fault,
    JobState,
    Observed,
    StoredVersion,
    check_aliases,
    check_failures,
    check_isolation,
    check_jobs,
    check_versions,
    check_writes,
    outcome,
    unidentified,
)

SUBJECT = "adapter:tenant-a/bot"
ERROR = {"error": {"message": "m", "type": "t", "param": None, "code": "c"}}


def served(sent: float, version: int, route: str = "production", **fields: Any) -> Call:
    call = Call("chat", "tenant-a", "bot", "gateway-0", sent, 60, done=sent + 0.2, status=200)
    call.version, call.adapter, call.route = str(version), "bot", route
    for name, value in fields.items():
        setattr(call, name, value)
    return call


def aliases(production: int, canary: int | None = None) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {"production": {"version": production, "weight": 1.0}}
    if canary is not None:
        found["canary"] = {"version": canary, "weight": 0.3}
    return found


HISTORY = [
    AliasEvent(SUBJECT, "adapter.promote", 0.0, aliases(1)),
    AliasEvent(SUBJECT, "adapter.promote", 10.0, aliases(2)),
    AliasEvent(SUBJECT, "adapter.canary", 20.0, aliases(2, canary=3)),
]


def test_a_version_is_allowed_only_while_its_alias_could_be_read() -> None:
    calls = [
        served(5.0, 1),
        served(10.5, 1),  # sent within ALIAS_PROPAGATION of the promote: a cached view
        served(10.5, 2),
        served(21.0, 3, route="canary"),
        served(15.0, 1),  # 5 s after v2 was promoted
        served(15.0, 3, route="canary"),  # no canary yet
    ]
    verdict = check_aliases(calls, HISTORY)
    assert (verdict.tried, verdict.bad) == (6, 2)
    assert "version 1" in verdict.examples[0] and "version 3" in verdict.examples[1]


def test_a_pinned_request_must_get_its_version_and_its_adapter() -> None:
    pinned = served(15.0, 1, target="bot@1", route="pinned")
    wrong = served(15.0, 2, target="bot@1", route="pinned")
    other = served(15.0, 2, adapter="helper")
    assert check_aliases([pinned, wrong, other], HISTORY).bad == 2


EXPECTED = {
    ("chat", "tenant-a/bot@1"): "own words",
    ("chat", "tenant-b/bot@1"): "foreign words",
    ("chat", "demo-base"): "base words",
}


def test_a_text_only_another_tenant_s_adapter_gives_is_a_leak() -> None:
    own = served(1.0, 1, text="own words")
    leaked = served(1.0, 1, text="foreign words")
    base = Call("chat", "tenant-a", "demo-base", "gateway-0", 1.0, 60, 1.2, 200, text="x")
    base_leak = Call("chat", "tenant-a", "demo-base", "g", 1.0, 60, 1.2, 200, text="foreign words")
    odd = served(1.0, 1, text="one token off")
    calls = [own, leaked, base, base_leak, odd]
    verdict = check_isolation(calls, EXPECTED)
    assert (verdict.tried, verdict.bad) == (5, 2)
    assert unidentified(calls, EXPECTED) == 2  # the base's "x" and the adapter's odd text


def test_texts_the_caller_s_own_models_or_weak_adapters_give_prove_nothing() -> None:
    expected = {
        **EXPECTED,
        ("chat", "tenant-a/bot@2"): "shared words",
        ("chat", "tenant-b/bot@2"): "shared words",
        ("chat", "tenant-b/tuned@1"): "base-like words",
    }
    shared = served(1.0, 1, text="shared words")
    weak = served(1.0, 1, text="base-like words")
    assert check_isolation([shared, weak], expected, weak={"tenant-b/tuned@1"}).bad == 0
    assert check_isolation([shared, weak], expected).bad == 1


def test_a_stream_is_compared_with_the_chat_answer() -> None:
    stream = served(1.0, 1, op="stream", text="foreign words")
    assert check_isolation([stream], EXPECTED).bad == 1


def failed(status: int, error: str, gateway: str = "gateway-0", **fields: Any) -> Call:
    call = Call("chat", "tenant-a", "bot", gateway, 100.0, 60, 101.0, status, error)
    for name, value in fields.items():
        setattr(call, name, value)
    return call


GATEWAY_DOWN = [Fault("gateway-0", "kill", 99.0, started=100.5, ready=102.0)]


def test_each_kind_of_failure_is_classified() -> None:
    assert outcome(failed(0, "ConnectError"), GATEWAY_DOWN) == "retryable"
    assert outcome(failed(0, "ConnectError", gateway="gateway-1"), GATEWAY_DOWN) == "unclean"
    assert outcome(failed(0, "RemoteProtocolError"), []) == "unclean"
    assert outcome(failed(503, "registry_unavailable"), []) == "retryable"
    assert outcome(failed(503, "x", shaped=False), []) == "unclean"
    assert outcome(failed(500, "internal"), []) == "unclean"
    assert outcome(failed(404, "model_not_found"), []) == "unclean"
    assert outcome(failed(0, "timeout"), []) == "hung"
    assert outcome(failed(503, "x", done=170.0), []) == "hung"  # past its 60 s timeout
    assert outcome(failed(200, "stream_error"), []) == "retryable"
    assert outcome(failed(409, "conflict", op="rollback"), []) == "refused"
    assert outcome(failed(409, "conflict"), []) == "unclean"  # inference has no conflicts
    assert outcome(served(1.0, 1), []) == "ok"


def test_whatever_a_gateway_answers_before_it_is_ready_is_excused() -> None:
    # No load balancer routes to a gateway before its /readyz says so.
    assert outcome(failed(404, "model_not_found"), GATEWAY_DOWN) == "retryable"
    later = failed(404, "model_not_found", sent=103.0, done=103.1)
    assert outcome(later, GATEWAY_DOWN) == "unclean"


def test_a_fault_long_over_does_not_excuse_a_cut_connection() -> None:
    later = failed(0, "ReadError", sent=200.0, done=200.5)
    assert outcome(later, GATEWAY_DOWN) == "unclean"
    verdict = check_failures([later, failed(503, "x"), served(1.0, 1)], GATEWAY_DOWN)
    assert (verdict.tried, verdict.bad) == (2, 1)


def observed(**fields: Any) -> Observed:
    found = Observed(
        alias_events=list(HISTORY),
        current_aliases={SUBJECT: aliases(2, canary=3)},
        versions=[StoredVersion("tenant-a", "bot", 1, "f" * 64, True, None, False)],
        jobs={"ftjob-1": JobState("tenant-a", "ftjob-1", "succeeded", "tuned", "", None)},
        files={"file-1"},
        stale_after=15.0,
    )
    for name, value in fields.items():
        setattr(found, name, value)
    return found


def write(op: str, sent: float, **fields: Any) -> Call:
    call = Call(op, "tenant-a", "bot", "gateway-0", sent, 150, sent + 0.5, 200)
    for name, value in fields.items():
        setattr(call, name, value)
    return call


def test_an_acknowledged_write_missing_from_the_registry_is_lost() -> None:
    kept = [
        write("promote", 9.8, asked={"version": 2}),
        write("canary", 19.9, asked={"version": 3, "weight": 0.3}),
        write("upload", 1.0, status=201, answer={"version": 1, "fingerprint": "f" * 64}),
        write("file", 1.0, answer={"id": "file-1"}),
        write("job", 1.0, answer={"id": "ftjob-1"}),
    ]
    lost = [
        write("promote", 30.0, asked={"version": 1}),  # no audit event
        write("upload", 1.0, status=201, answer={"version": 1, "fingerprint": "0" * 64}),
        write("job", 1.0, answer={"id": "ftjob-9"}),
    ]
    refused = write("rollback", 40.0, status=409, error="conflict")
    verdict = check_writes([*kept, *lost, refused], observed())
    assert (verdict.tried, verdict.bad) == (8, 3)


def test_aliases_that_differ_from_the_last_audit_event_are_flagged() -> None:
    drifted = observed(current_aliases={SUBJECT: aliases(1)})
    assert check_writes([], drifted).bad == 1


def test_half_registered_versions_and_unclean_jobs_are_counted() -> None:
    versions = [
        StoredVersion("tenant-a", "bot", 1, "f" * 64, True, None, False),
        StoredVersion("tenant-a", "bot", 2, "f" * 64, False, None, False),  # no blob
        StoredVersion("tenant-a", "tuned", 1, "f" * 64, True, "ftjob-1", False),  # no evals
        StoredVersion("tenant-a", "tuned", 2, "f" * 64, True, "ftjob-2", False),  # to be resumed
    ]
    jobs = {
        "ftjob-1": JobState("tenant-a", "ftjob-1", "succeeded", "tuned", "", None),
        "ftjob-2": JobState("tenant-a", "ftjob-2", "running", None, "", 2.0),
        "ftjob-3": JobState("tenant-a", "ftjob-3", "running", None, "", 60.0),  # nobody holds it
        "ftjob-4": JobState("tenant-a", "ftjob-4", "failed", None, "", None),  # no reason
        "ftjob-5": JobState("tenant-a", "ftjob-5", "failed", None, "bad data", None),
    }
    state = observed(versions=versions, jobs=jobs)
    assert check_versions(state).bad == 2
    created = [write("job", 1.0, answer={"id": job_id}) for job_id in jobs]
    verdict = check_jobs(created, state)
    assert (verdict.tried, verdict.bad) == (5, 2)
