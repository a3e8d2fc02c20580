"""What the chaos soak checks once the kills are over, on plain records (no I/O here).

``server.dev.chaos`` records every request it sent (:class:`Call`) and every
fault it caused (:class:`Fault`), then reads back what the registry holds
(:class:`Observed`) and the answer each served version gives when asked alone
(``expected``). Each check here turns those into a :class:`Verdict`: what was
tried, what went wrong (the goal is 0) and a few examples of what went wrong.

Time is wall-clock seconds (``time.time()``) throughout: the registry stamps its
audit events with the same machine's clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

INFERENCE = ("chat", "completion", "stream")
"""Call kinds that ask a model for text."""
LIFECYCLE = ("promote", "canary", "clear_canary", "rollback")
"""Call kinds that move an alias."""
ALIAS_PROPAGATION = 1.0
"""Seconds an alias change may take to reach every gateway: each caches the registry's
answer for at most 0.9 s (``server.gateway.tenancy.REGISTRY_MAX_AGE``), load included."""
RETRYABLE = (429, 502, 503, 504)
"""HTTP statuses that tell a client to try again."""
SLACK = 2.0
"""Seconds past its own timeout after which a call counts as hung (thread scheduling on a
loaded machine)."""
EXAMPLES = 5


@dataclass
class Call:
    """One request the workload sent, and what came back."""

    op: str
    """``chat``, ``completion``, ``stream``, ``upload``, ``promote``, ``canary``,
    ``clear_canary``, ``rollback``, ``file`` or ``job``."""
    tenant: str
    target: str
    """The model asked for (inference), the adapter (registry calls) or the base (jobs)."""
    gateway: str
    sent: float
    timeout: float
    done: float = 0.0
    status: int = 0
    """HTTP status; 0 when no answer came (connection refused or cut, timeout)."""
    error: str = ""
    """Empty on success; the error's code or the exception's class otherwise."""
    shaped: bool = True
    """An error body in OpenAI's shape (``error.message/type/param/code``)."""
    detail: str = ""
    """The start of an error's body, for the report."""
    version: str = ""
    """``x-loraplex-version``."""
    adapter: str = ""
    """``x-loraplex-adapter``."""
    route: str = ""
    """``x-loraplex-route``: production, canary, pinned or an alias name."""
    text: str = ""
    asked: dict[str, Any] = field(default_factory=dict)
    """What a registry call asked for (``version``, ``weight``)."""
    answer: dict[str, Any] = field(default_factory=dict)
    """What an acknowledged registry call answered (``version``, ``fingerprint``, ``id``)."""

    @property
    def acknowledged(self) -> bool:
        return 200 <= self.status < 300 and not self.error


@dataclass
class Fault:
    """One process the driver killed (or restarted), and when it was whole again."""

    target: str
    """The process: ``gateway-0``, ``engine-1``, ``worker``, ``redis``, ``postgresql``, ``s3``."""
    action: str
    """``kill`` (SIGKILL, started again) or ``restart`` (a clean stop, then a start)."""
    at: float
    started: float = 0.0
    """When it was started again (0: not yet)."""
    ready: float = 0.0
    """When it answered its readiness probe again (0: not yet)."""

    def overlaps(self, start: float, end: float) -> bool:
        """Down at some moment of ``[start, end]`` (until ready; for ever if never)."""
        return self.at <= end and (self.ready == 0.0 or self.ready >= start)


@dataclass(frozen=True)
class AliasEvent:
    """An audit event that moved an alias, with the aliases it left behind."""

    subject: str
    """``adapter:TENANT/NAME``."""
    action: str
    at: float
    aliases: dict[str, dict[str, Any]]
    """Alias name -> ``{"version": N, "weight": w}`` after the change."""


@dataclass(frozen=True)
class StoredVersion:
    tenant: str
    adapter: str
    number: int
    fingerprint: str
    blob_present: bool
    training_job: str | None
    has_evals: bool


@dataclass(frozen=True)
class JobState:
    tenant: str
    id: str
    status: str
    fine_tuned_model: str | None
    error_message: str
    heartbeat_age: float | None
    """Seconds since the job's last heartbeat (running jobs)."""


@dataclass
class Observed:
    """The registry after the soak, read back once the fleet is healthy."""

    alias_events: list[AliasEvent]
    current_aliases: dict[str, dict[str, dict[str, Any]]]
    """Subject -> aliases as the registry serves them now."""
    versions: list[StoredVersion]
    jobs: dict[str, JobState]
    files: set[str]
    stale_after: float
    """Seconds without a heartbeat after which the worker re-queues a running job."""


@dataclass
class Verdict:
    check: str
    tried: int
    unit: str
    bad: int
    bad_means: str
    examples: list[str] = field(default_factory=list)

    def add(self, example: str) -> None:
        self.bad += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(example)


def subject(tenant: str, adapter: str) -> str:
    """How the audit log names an adapter (``registry.Registry._subject``)."""
    return f"adapter:{tenant}/{adapter}"


def shaped(body: Any) -> bool:
    """An OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


# -- requests: every failure clean, retryable and in time ------------------------------


def outcome(call: Call, faults: Sequence[Fault]) -> str:
    """``ok``, ``refused`` (a clean 409), ``retryable`` (a clean failure), ``hung`` or
    ``unclean`` (a 500, a misblamed 4xx, an unshaped body, a cut connection nobody caused).

    A fault's window ends when the process is ready again: for a gateway, when its
    ``/readyz`` answers 200, as Kubernetes decides when to route to it.
    """
    if call.done - call.sent > call.timeout + SLACK or call.error == "timeout":
        return "hung"
    if call.acknowledged:
        return "ok"
    if any(f.target == call.gateway and f.overlaps(call.sent, call.done) for f in faults):
        # Sent to (or cut off by) a gateway that was down or not yet ready: a load balancer
        # routes nothing there (Kubernetes waits for /readyz), whatever it answered.
        return "retryable"
    if call.status == 0:
        return "unclean"
    if not call.shaped:
        return "unclean"
    if call.status == 409 and call.op in (*LIFECYCLE, "upload"):
        return "refused"
    if call.status in RETRYABLE or (call.status == 200 and call.error == "stream_error"):
        return "retryable"
    return "unclean"


def check_failures(calls: Sequence[Call], faults: Sequence[Fault]) -> Verdict:
    failed = [c for c in calls if not c.acknowledged]
    verdict = Verdict(
        "failed requests without a clean, retryable error within their timeout",
        len(failed),
        f"failed of {len(calls):,} requests",
        0,
        "hangs or unclean errors",
    )
    for call in failed:
        kind = outcome(call, faults)
        if kind in ("hung", "unclean"):
            verdict.add(
                f"{kind}: {call.op} {call.target} via {call.gateway} at {call.sent:.1f} "
                f"({call.done - call.sent:.1f} s): {call.status} {call.error}"
            )
    return verdict


# -- aliases and isolation ------------------------------------------------------------


def alias_spans(events: Iterable[AliasEvent]) -> dict[str, list[tuple[float, float, AliasEvent]]]:
    """Per subject, each alias state and ``[from, until)`` (until: the next change, or inf)."""
    by_subject: dict[str, list[AliasEvent]] = {}
    for event in sorted(events, key=lambda e: e.at):
        by_subject.setdefault(event.subject, []).append(event)
    spans: dict[str, list[tuple[float, float, AliasEvent]]] = {}
    for name, ordered in by_subject.items():
        ends = [e.at for e in ordered[1:]] + [float("inf")]
        spans[name] = [(e.at, end, e) for e, end in zip(ordered, ends, strict=True)]
    return spans


def allowed_versions(
    spans: Sequence[tuple[float, float, AliasEvent]], alias: str, sent: float, done: float
) -> set[int]:
    """Versions ``alias`` pointed at while a request sent at ``sent`` could have read it.

    A gateway may answer from a view up to ``ALIAS_PROPAGATION`` old when the request
    arrives, and the request was resolved no later than its answer came back.
    """
    return {
        int(event.aliases[alias]["version"])
        for start, end, event in spans
        if start <= done and end + ALIAS_PROPAGATION >= sent and alias in event.aliases
    }


def _adapter_name(model: str) -> tuple[str, int | None]:
    name, _, pinned = model.partition("@")
    return name, int(pinned) if pinned.isdigit() else None


def check_aliases(calls: Sequence[Call], events: Sequence[AliasEvent]) -> Verdict:
    spans = alias_spans(events)
    served = [c for c in calls if c.op in INFERENCE and c.acknowledged and c.version]
    verdict = Verdict(
        "responses from a version no alias pointed at when the request was sent",
        len(served),
        "adapter responses",
        0,
        "wrong versions",
    )
    for call in served:
        name, pinned = _adapter_name(call.target)
        number = int(call.version)
        if call.adapter != name:
            verdict.add(f"{call.tenant} asked {call.target}, got adapter {call.adapter!r}")
        elif pinned is not None:
            if number != pinned:
                verdict.add(f"{call.tenant} pinned {call.target}, got version {number}")
        else:
            history = spans.get(subject(call.tenant, name), [])
            allowed = allowed_versions(history, call.route, call.sent, call.done)
            if number not in allowed:
                verdict.add(
                    f"{call.tenant} {call.target} at {call.sent:.2f}: version {number} by "
                    f"{call.route}, which pointed at {sorted(allowed)} then"
                )
    return verdict


def served_key(call: Call) -> tuple[str, str]:
    """What ``expected`` is keyed by: the request kind (a stream is a chat) and the model
    that served it (``TENANT/ADAPTER@N``, or the base's name)."""
    kind = "chat" if call.op == "stream" else call.op
    if call.version:
        return kind, f"{call.tenant}/{call.adapter}@{call.version}"
    return kind, call.target


def check_isolation(
    calls: Sequence[Call], expected: dict[tuple[str, str], str], weak: Iterable[str] = ()
) -> Verdict:
    """Each answer's text against what every served model says when asked alone.

    A text that only other tenants' adapters give is a leak. A text that matches no
    model is counted apart (greedy decoding in another batch may differ by a token),
    and texts the caller's own models or a base also give prove nothing either way;
    nor do the texts of ``weak`` models (barely trained adapters, which answer as
    their base does).
    """
    ignored = set(weak)
    owners: dict[tuple[str, str], set[str]] = {}
    for (kind, model), text in expected.items():
        owners.setdefault((kind, text), set()).add(model)
    answered = [c for c in calls if c.op in INFERENCE and c.acknowledged]
    verdict = Verdict(
        "responses from another tenant's adapter",
        len(answered),
        "responses",
        0,
        "leaks",
    )
    for call in answered:
        kind, model = served_key(call)
        if expected.get((kind, model)) == call.text:
            continue
        others = owners.get((kind, call.text), set())
        foreign = {m for m in others if "/" in m and not m.startswith(f"{call.tenant}/")}
        if foreign and others == foreign and not foreign & ignored:
            verdict.add(f"{call.tenant} asked {call.target} ({model}); the text is {foreign}'s")
    return verdict


def unidentified(calls: Sequence[Call], expected: dict[tuple[str, str], str]) -> int:
    """Answers whose text no model gave when asked alone (not a failure; printed)."""
    texts = {(kind, text) for (kind, _), text in expected.items()}
    return sum(
        1
        for c in calls
        if c.op in INFERENCE
        and c.acknowledged
        and expected.get(served_key(c)) != c.text
        and (served_key(c)[0], c.text) not in texts
    )


# -- the registry: acknowledged writes kept, nothing half-done ------------------------


def _recorded(call: Call, event: AliasEvent) -> bool:
    """The audit event is the change ``call`` asked for (same adapter, action and result)."""
    if event.subject != subject(call.tenant, call.target):
        return False
    if not call.sent - ALIAS_PROPAGATION <= event.at <= call.done + ALIAS_PROPAGATION:
        return False
    action = "canary_clear" if call.op == "clear_canary" else call.op
    if event.action != f"adapter.{action}":
        return False
    if call.op == "promote":
        return event.aliases.get("production", {}).get("version") == call.asked["version"]
    if call.op == "canary":
        return event.aliases.get("canary", {}).get("version") == call.asked["version"]
    if call.op == "rollback":
        return event.aliases.get("production", {}).get("version") == call.answer.get("version")
    return "canary" not in event.aliases


def _kept(call: Call, observed: Observed, versions: dict[tuple[str, str, int], str]) -> bool:
    if call.op == "upload":
        key = (call.tenant, call.target, int(call.answer["version"]))
        return versions.get(key) == call.answer["fingerprint"]
    if call.op in LIFECYCLE:
        return any(_recorded(call, e) for e in observed.alias_events)
    if call.op == "file":
        return call.answer["id"] in observed.files
    return call.answer["id"] in observed.jobs


def check_writes(calls: Sequence[Call], observed: Observed) -> Verdict:
    writes = [c for c in calls if c.op not in INFERENCE and c.acknowledged]
    versions = {(v.tenant, v.adapter, v.number): v.fingerprint for v in observed.versions}
    verdict = Verdict(
        "acknowledged registry writes lost",
        len(writes),
        "acknowledged writes",
        0,
        "lost",
    )
    for call in writes:
        if not _kept(call, observed, versions):
            verdict.add(f"{call.op} {call.tenant}/{call.target} {call.asked or call.answer}")
    # What the registry serves must be what its own audit trail last recorded.
    last = {e.subject: e.aliases for e in sorted(observed.alias_events, key=lambda e: e.at)}
    for name, aliases in last.items():
        now = observed.current_aliases.get(name, {})
        if {a: v["version"] for a, v in now.items()} != {
            a: v["version"] for a, v in aliases.items()
        }:
            verdict.add(f"{name}: aliases {now} differ from the last audit event's {aliases}")
    return verdict


def check_versions(observed: Observed) -> Verdict:
    """Every version whole: its blob stored, a fingerprint, and for a trained one its job
    done (or still running, to be resumed) with eval results once done."""
    verdict = Verdict("half-registered versions", len(observed.versions), "versions", 0, "half")
    for v in observed.versions:
        label = f"{v.tenant}/{v.adapter}@{v.number}"
        if not v.blob_present:
            verdict.add(f"{label}: blob missing")
        elif len(v.fingerprint) != 64:
            verdict.add(f"{label}: no fingerprint")
        elif v.training_job is not None:
            job = observed.jobs.get(v.training_job)
            if job is None or job.status not in ("succeeded", "running", "queued"):
                verdict.add(f"{label}: its job {v.training_job} is {job and job.status}")
            elif job.status == "succeeded" and not v.has_evals:
                verdict.add(f"{label}: no eval results")
    return verdict


def job_ended_cleanly(job: JobState, stale_after: float) -> bool:
    """Finished with its model or its reason, queued, or running under a live heartbeat."""
    if job.status == "succeeded":
        return bool(job.fine_tuned_model)
    if job.status == "failed":
        return bool(job.error_message)
    if job.status == "running":
        return job.heartbeat_age is not None and job.heartbeat_age < stale_after
    return job.status in ("queued", "cancelled")


def check_jobs(calls: Sequence[Call], observed: Observed) -> Verdict:
    created = [c.answer["id"] for c in calls if c.op == "job" and c.acknowledged]
    verdict = Verdict(
        "fine-tuning jobs not ended or running cleanly", len(created), "jobs", 0, "unclean"
    )
    for job_id in created:
        job = observed.jobs.get(job_id)
        if job is not None and not job_ended_cleanly(job, observed.stale_after):
            verdict.add(f"{job_id}: {job.status} (heartbeat {job.heartbeat_age} s ago)")
    return verdict
