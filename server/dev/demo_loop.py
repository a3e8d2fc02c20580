"""One turn of the continuous fine-tuning loop: the end of ``make demo`` (issue 17).

Tenant ``acme`` trains a deliberately weak v1 of an intent adapter (the 3-intent task of
``training.demo_data.intent_records``, with every ``refund`` message left out of v1's
data), which still beats the base and so becomes production. Then, all through the
HTTP API and the official ``openai`` client:

1. capture is turned on for the tenant (admin route); live support messages are served
   with ``store: true``, and simulated users rate each answer: thumbs up when right, a
   corrected answer when wrong;
2. dataset v2 is made from v1's data plus what the feedback teaches (its diff, audit);
3. a job continues production's weights on dataset v2 and registers v2, which the
   adapter's gates keep out of production until it has the results they ask for;
4. v2 shadows production (a copy of its traffic), and the shadow results become evals;
5. the gates decide the promotion, and v2 then serves live traffic with feedback;
6. v1 and v2 side by side: held-out exact match, live thumbs-up share, shadow agreement
   and JSON validity, and their answers to three held-out messages.

``python -m server.dev.demo_loop`` runs the turn alone (its own server and worker).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from openai import OpenAI, omit

from registry import ADMIN_SCOPE
from server.dev.demo_site import (
    HOME,
    OPERATOR,
    demo_registry,
    run_alone,
    say,
    tenant_key,
)

TENANT = "acme"
ADAPTER = "acme-intent"
INTENTS = ("billing", "shipping", "refund")
MISSING = "refund"
"""The intent v1 never sees: what makes it weak."""
INTENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"intent": {"enum": list(INTENTS)}},
    "required": ["intent"],
    "additionalProperties": False,
}
HELD_OUT = "held-out"
"""Eval suite of the fixed held-out messages, scored through the gateway for each version."""
GATES = [
    {"suite": HELD_OUT, "metric": "exact_match", "min_value": 0.9},
    {"suite": "shadow", "metric": "json_valid", "min_value": 0.95},
]
HYPERPARAMETERS: dict[str, Any] = {}
"""None given: the worker picks epochs, batch size and learning rate ("auto")."""
JOB_EVENTS_SHOWN = ("Hyperparameters:", "Better than", "Promoted", "Not promoted")
"""The job's events the demo prints: what it picked, and whether its version serves."""
JOB_TIMEOUT_S = 1200
CAPTURE_TIMEOUT_S = 60
SHADOW_TIMEOUT_S = 180
SHADOW_STALL_S = 15
ALIAS_FRESH_S = 1.0
"""A gateway answers from its cached routing view for up to 0.9 s after an alias moves
(``server.gateway.tenancy.REGISTRY_MAX_AGE``): traffic sent sooner may miss the change."""


# -- the data: pure, tested ----------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    """Disjoint sets of support messages (``{"prompt", "completion"}`` records)."""

    v1_train: list[dict[str, str]]
    """v1's training data: every intent but ``MISSING``."""
    live: list[dict[str, str]]
    """Served by v1 with feedback: what dataset v2 learns from."""
    shadow: list[dict[str, str]]
    """Production traffic while v2 shadows it."""
    after: list[dict[str, str]]
    """Served with feedback once the turn is over (v2's live thumbs-up share)."""
    held_out: list[dict[str, str]]
    """Scored for every version, trained on by none."""


SIZES = {"held_out": 12, "live": 40, "shadow": 8, "after": 20}
"""Messages per intent in each evaluation set; v1 trains on ``V1_PER_INTENT`` more."""
V1_PER_INTENT = 76


def intent_of(answer: str | None) -> str | None:
    """The intent an answer names, or None when it is not ``{"intent": ...}``."""
    try:
        parsed = json.loads(answer or "")
    except json.JSONDecodeError:
        return None
    intent = parsed.get("intent") if isinstance(parsed, dict) else None
    return intent if isinstance(intent, str) else None


def split_records(
    records: Iterable[dict[str, str]],
    sizes: dict[str, int] = SIZES,
    v1_per_intent: int = V1_PER_INTENT,
) -> Splits:
    """Deal each intent's messages (in order) into the evaluation sets, then v1's data;
    v1 gets none of ``MISSING``'s. Raises ValueError when an intent has too few."""
    by_intent: dict[str, list[dict[str, str]]] = {}
    for record in records:
        by_intent.setdefault(intent_of(record["completion"]) or "", []).append(record)
    dealt: dict[str, list[dict[str, str]]] = {name: [] for name in [*sizes, "v1_train"]}
    for intent in INTENTS:
        pool = by_intent.get(intent, [])
        needed = sum(sizes.values()) + (0 if intent == MISSING else v1_per_intent)
        if len(pool) < needed:
            raise ValueError(f"intent {intent!r} has {len(pool)} messages, {needed} needed")
        start = 0
        for name, size in sizes.items():
            dealt[name] += pool[start : start + size]
            start += size
        if intent != MISSING:
            dealt["v1_train"] += pool[start : start + v1_per_intent]
    mixed = {name: _shuffled(rows, seed) for seed, (name, rows) in enumerate(dealt.items())}
    return Splits(**mixed)


def _shuffled(rows: list[dict[str, str]], seed: int) -> list[dict[str, str]]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def chat_jsonl(records: Iterable[dict[str, str]]) -> bytes:
    """Records as chat examples: the shape captured completions make, so one dataset
    holds both."""
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["completion"]},
                ]
            }
        )
        for r in records
    ]
    return ("\n".join(lines) + "\n").encode()


def counter_values(scraped: str, metric: str, tenant: str) -> dict[str, float]:
    """A Prometheus counter's values for one tenant from a ``/metrics`` page, by its
    other label (``outcome``)."""
    found: dict[str, float] = {}
    for line in scraped.splitlines():
        if not line.startswith(metric + "{"):
            continue
        labels, _, value = line[len(metric) + 1 :].rpartition("} ")
        pairs = dict(p.split("=", 1) for p in labels.split(","))
        values = {k: v.strip('"') for k, v in pairs.items()}
        if values.pop("tenant", None) == tenant:
            found[",".join(values.values())] = float(value)
    return found


# -- the table: pure, tested ---------------------------------------------------------


def percent(value: float | None, samples: int | None = None) -> str:
    if value is None:
        return "-"
    shown = f"{100 * value:.0f} %"
    return shown if samples is None else f"{shown} of {samples}"


def side_by_side(rows: Sequence[tuple[str, str, str]], head: tuple[str, str, str]) -> str:
    """A plain-text table: a label column and two value columns, aligned."""
    table = [head, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("    " + line.rstrip() for line in lines)


def markdown_table(rows: Sequence[tuple[str, str, str]], head: tuple[str, str, str]) -> str:
    """The same rows as a Markdown table (for the README)."""
    lines = [head, ("---", "---", "---"), *rows]
    return "\n".join(
        "| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in lines
    )


# -- talking to the server -------------------------------------------------------------


@dataclass
class Turn:
    """What the turn's steps share: the server, the tenant's clients, the data, the results."""

    base: str
    name: str
    """The adapter's name, also its dataset's (``acme-intent``; numbered on a rerun)."""
    client: OpenAI
    http: httpx.Client
    """With the tenant's key."""
    admin: httpx.Client
    """With an admin key (capture settings)."""
    splits: Splits
    job_events: dict[int, str]
    """Version -> what its job said about promoting it."""


def api(
    http: httpx.Client, method: str, path: str, body: Any = None, allow: Sequence[int] = ()
) -> httpx.Response:
    """One REST call; an unexpected error ends the demo with the server's answer."""
    reply = http.request(method, path, json=body, timeout=300)
    if reply.status_code >= 400 and reply.status_code not in allow:
        raise SystemExit(
            f"{method} {path} answered {reply.status_code}: {reply.text[:800]}\n"
            f"    the server's log: {HOME / 'logs' / 'demo-serve.log'}"
        )
    return reply


def open_turn(url: str, base: str) -> Turn:
    """The tenant's and an admin's clients, and a name no earlier run of the demo used."""
    from training.demo_data import intent_records

    registry = demo_registry()
    key = tenant_key(registry, TENANT)
    _, admin_key = registry.create_api_key(None, ADMIN_SCOPE, OPERATOR, name="demo-loop")
    registry.close()
    http = httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"})
    admin = httpx.Client(base_url=url, headers={"authorization": f"Bearer {admin_key}"})
    taken = {a["id"] for a in api(http, "GET", "/v1/adapters").json()["data"]}
    taken |= {d["name"] for d in api(http, "GET", "/v1/datasets").json()["data"]}
    name = next(n for n in (ADAPTER, *(f"{ADAPTER}-{i}" for i in range(2, 1000))) if n not in taken)
    client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    splits = split_records(intent_records(10_000))
    return Turn(base, name, client, http, admin, splits, {})


def enable_capture(turn: Turn) -> None:
    settings = {"enabled": True, "store_by_default": False, "retention_days": 30}
    api(turn.admin, "PUT", f"/admin/tenants/{TENANT}/capture", settings)
    say(f"admin: capture on for tenant {TENANT} (PUT /admin/tenants/{TENANT}/capture {settings})")


def start_job(turn: Turn, model: str, training_file: str) -> str:
    suffix = turn.name if model == turn.base else None  # a continued adapter keeps its name
    method: Any = {"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}}
    job = turn.client.fine_tuning.jobs.create(
        model=model,
        training_file=training_file,
        suffix=suffix,
        seed=0,
        method=method,
        extra_body={"json_schema": INTENT_SCHEMA},
    )
    return job.id


def wait_job(turn: Turn, job_id: str, what: str) -> int:
    """Poll the job until it ends; -> the version it registered (and its promotion event)."""
    started = time.monotonic()
    while True:
        job = turn.client.fine_tuning.jobs.retrieve(job_id)
        if job.status == "succeeded":
            break
        if job.status in ("failed", "cancelled"):
            raise SystemExit(
                f"{what}: job {job_id} {job.status}: {job.error}\n"
                f"    the worker's log: {HOME / 'logs' / 'demo-worker.log'}"
            )
        if time.monotonic() - started > JOB_TIMEOUT_S:
            raise SystemExit(f"{what}: job {job_id} still {job.status} after {JOB_TIMEOUT_S} s")
        print(
            f"\r    {what}: {job.status}... {time.monotonic() - started:.0f} s", end="", flush=True
        )
        time.sleep(2)
    print(f"\r    {what}: succeeded after {time.monotonic() - started:.0f} s")
    versions = api(turn.http, "GET", f"/v1/adapters/{turn.name}/versions").json()["data"]
    number = max(int(v["version"]) for v in versions)
    events = reversed(turn.client.fine_tuning.jobs.list_events(job_id, limit=100).data)
    said = [e.message for e in events if e.message.startswith(JOB_EVENTS_SHOWN)]
    turn.job_events[number] = "\n    ".join(said) or "(no promotion event)"
    return number


def production(turn: Turn) -> int | None:
    aliases = api(turn.http, "GET", f"/v1/adapters/{turn.name}").json()["aliases"]
    target = aliases.get("production")
    return None if target is None else int(target["version"])


# -- traffic, feedback and evals -------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    record: dict[str, str]
    text: str
    completion_id: str

    @property
    def right(self) -> bool:
        return self.text.strip() == self.record["completion"]


def ask(turn: Turn, model: str, records: Sequence[dict[str, str]], tag: str | None) -> list[Answer]:
    """Each message as a chat request; stored with ``metadata: {"loop": tag}`` when tagged."""
    answers = []
    for record in records:
        reply = turn.client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": record["prompt"]}],
            max_tokens=24,
            temperature=0,
            store=True if tag else omit,
            metadata={"loop": tag} if tag else omit,
        )
        answers.append(Answer(record, reply.choices[0].message.content or "", reply.id))
    return answers


def wait_stored(turn: Turn, tag: str, count: int) -> None:
    """Capture writes after the answer, in the background: wait until all are listed."""
    deadline = time.monotonic() + CAPTURE_TIMEOUT_S
    while True:
        page = turn.client.chat.completions.list(metadata={"loop": tag}, limit=100)
        stored = sum(1 for _ in page)
        if stored >= count:
            return
        if time.monotonic() > deadline:
            raise SystemExit(
                f"only {stored} of {count} completions tagged {tag!r} were stored after "
                f"{CAPTURE_TIMEOUT_S} s; check loraplex_capture_dropped_total on /metrics"
            )
        time.sleep(0.5)


def give_feedback(turn: Turn, answers: Sequence[Answer]) -> int:
    """Simulated users: thumbs up when right, the corrected answer when wrong; -> ups."""
    for answer in answers:
        body: dict[str, str] = {"thumbs": "up"}
        if not answer.right:
            body = {"thumbs": "down", "correction": answer.record["completion"]}
        api(turn.http, "POST", f"/v1/chat/completions/{answer.completion_id}/feedback", body)
    return sum(a.right for a in answers)


def serve_with_feedback(turn: Turn, records: Sequence[dict[str, str]], tag: str) -> float | None:
    """Live traffic to production, stored, rated; -> the thumbs-up share the server records
    for the version that served it (online metrics)."""
    answers = ask(turn, turn.name, records, tag)
    wait_stored(turn, tag, len(answers))
    ups = give_feedback(turn, answers)
    served = production(turn)
    say(
        f"{len(answers)} live requests to {turn.name!r} (production v{served}) with store: true; "
        f"users gave {ups} thumbs up and corrected {len(answers) - ups} answers"
    )
    path = f"/v1/adapters/{turn.name}/versions/{served}/evals/online"
    metrics = api(turn.http, "POST", path).json()["metrics"]
    share = metrics.get("thumbs_up_share", {})
    shown = percent(share.get("value"), share.get("sample_count"))
    print(f"    POST {path} -> thumbs_up_share {shown}")
    return share.get("value")


def score_held_out(turn: Turn, number: int) -> list[Answer]:
    """The held-out messages through the gateway, pinned to the version; the exact match is
    stored as the version's eval result in suite ``held-out``."""
    answers = ask(turn, f"{turn.name}@{number}", turn.splits.held_out, None)
    value = sum(a.right for a in answers) / len(answers)
    body = {
        "suite": HELD_OUT,
        "metric": "exact_match",
        "value": value,
        "sample_count": len(answers),
    }
    api(turn.http, "POST", f"/v1/adapters/{turn.name}/versions/{number}/evals", body)
    print(
        f"    v{number} on {len(answers)} held-out messages: exact match {percent(value)} (stored)"
    )
    return answers


def audit_line(audit: dict[str, Any]) -> str:
    """The data audit's report in one line."""
    if "error" in audit:
        return str(audit["error"])
    chars = audit.get("length", {}).get("chars", {})
    return (
        f"{audit.get('examples')} examples, "
        f"exact duplicates {audit['exact_duplicates']['groups']}, "
        f"near duplicates {audit['near_duplicates']['groups']}, "
        f"blank answers {audit['blank_answers']['count']}, "
        f"split leakage {audit['leakage']['groups']}, "
        f"{chars.get('min')}-{chars.get('max')} characters"
    )


# -- the turn's steps ------------------------------------------------------------------


def train_v1(turn: Turn) -> int:
    """Dataset v1 (no refund messages) and a job on it; -> v1, which must be production."""
    upload = turn.client.files.create(
        file=(f"{turn.name}-v1.jsonl", chat_jsonl(turn.splits.v1_train)), purpose="fine-tune"
    )
    about = {"name": turn.name, "description": "support messages -> intent (JSON)"}
    api(turn.http, "POST", "/v1/datasets", about)
    first = api(
        turn.http, "POST", f"/v1/datasets/{turn.name}/versions", {"training_file": upload.id}
    ).json()
    say(
        f"tenant {TENANT}: dataset {turn.name!r} v{first['number']} from {upload.id}: "
        f"{first['examples']} support messages, deliberately without any {MISSING!r} ones"
    )
    job_id = start_job(turn, turn.base, first["file_id"])
    say(f"fine-tuning job {job_id} on dataset v1 (hyperparameters: {HYPERPARAMETERS or 'auto'})")
    number = wait_job(turn, job_id, "training v1")
    print(f"    {turn.job_events[number]}")
    if production(turn) != number:
        raise SystemExit(
            f"v{number} was not promoted, so the loop has no production to improve on; "
            f"see the job's events: GET /v1/fine_tuning/jobs/{job_id}/events"
        )
    return number


def dataset_from_feedback(turn: Turn, served_by: int) -> str:
    """Dataset v2: v1's examples plus the liked and corrected answers; -> its file id."""
    wanted = {"adapter": turn.name, "version": served_by, "metadata": {"loop": "live"}}
    path = f"/v1/datasets/{turn.name}/versions"
    made = api(turn.http, "POST", path, {"from_completions": wanted}).json()
    shown = api(turn.http, "GET", f"{path}/{made['number']}").json()
    diff = shown["diff"]
    say(
        f"dataset {turn.name!r} v{shown['number']} (parent v{shown['parent']}) from the feedback "
        f"on v{served_by}'s answers: {shown['examples']} examples, "
        f"diff +{len(diff['added'])} -{len(diff['removed'])}"
    )
    print(f"    audit: {audit_line(shown['audit'])}")
    return str(shown["file_id"])


def retrain(turn: Turn, file_id: str) -> int:
    """Gates on the adapter, then a job continuing production's weights; -> v2."""
    api(turn.http, "PUT", f"/v1/adapters/{turn.name}/gates", {"gates": GATES})
    shown = ", ".join(f"{g['suite']}/{g['metric']} >= {g['min_value']}" for g in GATES)
    say(f"gates on {turn.name!r}: {shown}")
    job_id = start_job(turn, turn.name, file_id)
    say(f"fine-tuning job {job_id}: model {turn.name!r} (continues production's weights)")
    number = wait_job(turn, job_id, "training v2")
    print(f"    {turn.job_events[number]}")
    return number


def shadow(turn: Turn, candidate: int) -> None:
    """The candidate answers a copy of production's traffic; its results become evals."""
    path = f"/v1/adapters/{turn.name}/shadow"
    body = {"version": candidate, "share": 1.0}
    production_version = api(turn.http, "POST", path, body).json()["production_version"]
    time.sleep(ALIAS_FRESH_S)
    say(f"shadow: v{candidate} gets a copy of all of production v{production_version}'s traffic")
    sent = len(ask(turn, turn.name, turn.splits.shadow, None))
    results = wait_compared(turn, path, sent)
    print(
        f"    {results['compared']} compared: agreement {percent(results['agreement'])}, "
        f"JSON valid {percent(results['json_valid'])} of {results['json_checked']}, "
        f"{results['failed']} failed, {results['completion_tokens']} completion tokens metered"
    )
    recorded = api(turn.http, "POST", f"{path}/evals", {"version": candidate}).json()["data"]
    shown = ", ".join(f"{r['suite']}/{r['metric']}={r['value']:.2f}" for r in recorded)
    print(f"    POST {path}/evals -> {shown}")
    api(turn.http, "DELETE", path)


def wait_compared(turn: Turn, path: str, sent: int) -> dict[str, Any]:
    """Copies go after production's answers and are flushed every few seconds: poll until
    all are counted, or (copies are dropped, not queued, when replicas are busy) until the
    count stops moving for ``SHADOW_STALL_S``."""
    started = moved = time.monotonic()
    done = -1
    while True:
        results: dict[str, Any] = api(turn.http, "GET", path).json()["results"]
        now, counted = time.monotonic(), int(results["compared"]) + int(results["failed"])
        if counted != done:
            done, moved = counted, now
        if done >= sent or (done > 0 and now - moved > SHADOW_STALL_S):
            print(f"\r    shadow copies counted: {done} of {sent}")
            if done < sent:  # the gateway's counter says why the others were not
                scraped = api(turn.http, "GET", "/metrics").text
                outcomes = counter_values(scraped, "loraplex_shadow_copies_total", TENANT)
                shown = ", ".join(f"{name} {count:g}" for name, count in sorted(outcomes.items()))
                print(f"    loraplex_shadow_copies_total by outcome: {shown}")
            return results
        if now - started > SHADOW_TIMEOUT_S:
            raise SystemExit(
                f"the shadow counted {done} of {sent} copies in {SHADOW_TIMEOUT_S} s; "
                f"see {HOME / 'logs' / 'demo-serve.log'}"
            )
        print(f"\r    shadow copies counted: {max(done, 0)} of {sent}", end="", flush=True)
        time.sleep(1)


def promote(turn: Turn, candidate: int) -> bool:
    """The gates' verdict on the candidate, then the promote route; -> promoted."""
    values = evals_by_version(turn).get(candidate, {})
    for gate in GATES:
        label = f"{gate['suite']}/{gate['metric']}"
        print(f"    gate {label} >= {gate['min_value']}: v{candidate} has {values.get(label, '-')}")
    path = f"/v1/adapters/{turn.name}/promote"
    reply = api(turn.http, "POST", path, {"version": candidate}, allow=(409,))
    if reply.status_code == 409:
        say(f"POST {path}: refused by the gates")
        print("    " + reply.json().get("error", {}).get("message", reply.text))
        return False
    say(f"POST {path} -> the gates pass: production is now v{production(turn)}")
    time.sleep(ALIAS_FRESH_S)
    return True


def evals_by_version(turn: Turn) -> dict[int, dict[str, float]]:
    """Version -> ``suite/metric`` -> its latest stored value (``GET .../evals``)."""
    table = api(turn.http, "GET", f"/v1/adapters/{turn.name}/evals").json()["data"]
    return {
        int(row["version"]): {f"{e['suite']}/{e['metric']}": e["value"] for e in row["evals"]}
        for row in table
    }


# -- side by side ------------------------------------------------------------------------

ROWS = (
    ("held-out exact match (stored)", f"{HELD_OUT}/exact_match"),
    ("own test split exact match (the job's)", "fine-tune-test/exact_match"),
    ("live thumbs-up share (online)", "online/thumbs_up_share"),
    ("shadow agreement with production", "shadow/agreement"),
    ("shadow JSON valid", "shadow/json_valid"),
)
"""(row label, ``suite/metric`` of the stored eval result it shows)."""


def one_per_intent(answers: Sequence[Answer]) -> list[int]:
    """Positions of the first answer to each intent's message, in ``INTENTS`` order."""
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        first.setdefault(intent_of(answer.record["completion"]) or "", i)
    return [first[intent] for intent in INTENTS if intent in first]


def loop_rows(
    values: dict[int, dict[str, float]], answers: dict[int, list[Answer]], old: int, new: int
) -> list[tuple[str, str, str]]:
    """The two versions' stored results, then their answers to one message per intent."""
    rows = [
        (label, percent(values.get(old, {}).get(key)), percent(values.get(new, {}).get(key)))
        for label, key in ROWS
    ]
    for i in one_per_intent(answers[old]):
        marks = ["✓" if a[i].right else "✗" for a in (answers[old], answers[new])]
        rows.append(
            (
                repr(answers[old][i].record["prompt"]),
                f"{answers[old][i].text.strip()} {marks[0]}",
                f"{answers[new][i].text.strip()} {marks[1]}",
            )
        )
    return rows


# -- the turn --------------------------------------------------------------------------


def run_turn(url: str, base: str) -> list[tuple[str, str, str]]:
    """One turn of the loop on the server at ``url`` (a worker must be running); -> the
    side-by-side rows, also printed and written to ``HOME/demo-loop.md``."""
    turn = open_turn(url, base)
    say(f"one turn of the continuous fine-tuning loop: tenant {TENANT}, adapter {turn.name!r}")
    enable_capture(turn)
    v1 = train_v1(turn)
    answers = {v1: score_held_out(turn, v1)}
    serve_with_feedback(turn, turn.splits.live, "live")
    v2 = retrain(turn, dataset_from_feedback(turn, v1))
    answers[v2] = score_held_out(turn, v2)
    shadow(turn, v2)
    if promote(turn, v2):
        serve_with_feedback(turn, turn.splits.after, "after")
    rows = loop_rows(evals_by_version(turn), answers, v1, v2)
    head = ("", f"v{v1} (weak, production first)", f"v{v2} (retrained)")
    say(f"{turn.name}: v{v1} and v{v2} side by side")
    print(side_by_side(rows, head))
    (HOME / "demo-loop.md").write_text(markdown_table(rows, head) + "\n")
    turn.http.close()
    turn.admin.close()
    return rows


def main() -> int:
    """The turn alone: the demo base, a server and a worker of its own."""
    return run_alone(run_turn)


if __name__ == "__main__":
    sys.exit(main())
