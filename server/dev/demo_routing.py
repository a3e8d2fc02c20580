"""A routed model: one name, three answer adapters behind it (issue 19, section 5).

Tenant ``support-co``, all through the HTTP API and the official ``openai`` client:

1. a fine-tuning job on generated support messages (``training.demo_data``'s intent
   task: billing, shipping and refund messages) trains a **classifier** adapter that
   answers a message's intent as ``{"intent": ...}``; three **answer adapters**, one per
   desk, are stock PEFT adapters with seeded random weights uploaded through ``POST
   /v1/adapters`` (their answers are the base's kind of text, not desk replies). With
   ``--train-desks`` they are fine-tuned instead, each on its own intent's messages to
   answer with its desk's reply: three more jobs, about 3 times the time on 2 cores;
2. a routed model ``support-suite``: a few rules (keywords, a pattern, a metadata value),
   then the classifier, whose label picks the desk, then the base as the default;
3. held-out messages sent to ``support-suite`` with the ``openai`` client: the adapter the
   gateway chose (``x-loraplex-adapter``), why (rule, classifier and its label, default)
   and the answer;
4. a routing eval on 60 held-out labelled messages (``POST
   /v1/routed_models/support-suite/versions/1/evals``): the route's accuracy and its
   confusion matrix, stored with the version.

"Held-out" messages are phrasing/noun combinations the classifier never trained on; each
phrasing and each noun did occur in its training data (the generated task has 4
phrasings per intent). ``python -m server.dev.demo_routing`` runs this alone, with a
server and a worker of its own.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from openai import OpenAI, omit

from server.dev.demo_loop import INTENT_SCHEMA, INTENTS, api, chat_jsonl, intent_of
from server.dev.demo_site import (
    HOME,
    demo_registry,
    run_alone,
    say,
    tenant_key,
)

TENANT = "support-co"
ROUTED = "support-suite"
CLASSIFIER = "support-intent"
DESKS = {
    "billing": ("billing-desk", "Billing desk here. I will look at your bill today."),
    "shipping": ("shipping-desk", "Shipping desk here. Your box is on the way to your house."),
    "refund": ("refund-desk", "Refund desk here. You will get your money back soon."),
}
"""Intent -> (answer adapter, the reply it is trained to give)."""
EVAL_PER_INTENT = 20
SHOWN_PER_INTENT = 2
CLASSIFIER_TOKENS = 24
"""``{"intent": "shipping"}`` is 20 tokens of the demo base's byte-level BPE."""
ANSWER_TOKENS = 24
JOB_TIMEOUT_S = 1200
CLASSIFIER_HYPERPARAMETERS = {"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 25}
"""What the worker's "auto" picks for this data (4 epochs, batch 4, 5e-3; README), given
so that the job skips the learning-rate search: the demo's slowest step."""
DESK_SEEDS = {"billing": 31, "shipping": 32, "refund": 33}
"""Intent -> the seed of its stock answer adapter's random weights."""
RULE_MESSAGES = (
    ("Can I have a receipt for the lamp?", None),
    ("What is the tracking number of my box?", None),
    ("The chair came in the wrong color.", {"channel": "returns"}),
)
"""Messages a rule decides (the last by its ``metadata``), shown before the classifier's."""


# -- the data and the policy: pure, tested ------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Disjoint sets of support messages (``{"prompt", "completion"}`` records)."""

    train: list[dict[str, str]]
    """The classifier's training data; each desk trains on its intent's share of it."""
    held_out: list[dict[str, str]]
    """The routing eval's messages: trained on by no adapter."""
    shown: list[dict[str, str]]
    """Sent to the routed model one by one, their routes and answers printed."""


def split_messages(
    records: Iterable[dict[str, str]],
    eval_per_intent: int = EVAL_PER_INTENT,
    shown_per_intent: int = SHOWN_PER_INTENT,
) -> Split:
    """Deal each intent's messages (in order): the eval's, the shown ones, then training."""
    by_intent: dict[str, list[dict[str, str]]] = {}
    for record in records:
        by_intent.setdefault(intent_of(record["completion"]) or "", []).append(record)
    train: list[dict[str, str]] = []
    held_out: list[dict[str, str]] = []
    shown: list[dict[str, str]] = []
    for intent in INTENTS:
        pool = by_intent.get(intent, [])
        if len(pool) <= eval_per_intent + shown_per_intent:
            raise ValueError(f"intent {intent!r} has only {len(pool)} messages")
        held_out += pool[:eval_per_intent]
        shown += pool[eval_per_intent : eval_per_intent + shown_per_intent]
        train += pool[eval_per_intent + shown_per_intent :]
    return Split(train, held_out, shown)


def desk_records(records: Iterable[dict[str, str]], intent: str) -> list[dict[str, str]]:
    """The intent's messages, each answered with its desk's reply."""
    reply = DESKS[intent][1]
    return [
        {"prompt": r["prompt"], "completion": reply}
        for r in records
        if intent_of(r["completion"]) == intent
    ]


def routing_policy(names: Mapping[str, str], classifier: str, default: str) -> dict[str, Any]:
    """Rules first (keywords, a pattern, a metadata value), then the classifier's label;
    ``names``: intent -> the answer adapter's name."""
    return {
        "default": default,
        "rules": [
            {"target": names["billing"], "keywords": ["receipt", "invoice"]},
            {"target": names["shipping"], "pattern": r"(?i)\btracking (number|code)\b"},
            {"target": names["refund"], "field": "metadata.channel", "pattern": "^returns$"},
        ],
        "classifier": {
            "adapter": classifier,
            "labels": {intent: names[intent] for intent in INTENTS},
            "max_tokens": CLASSIFIER_TOKENS,
        },
    }


def eval_examples(records: Iterable[dict[str, str]], names: Mapping[str, str]) -> list[Any]:
    """Labelled messages for ``POST .../evals``: the desk each should reach."""
    return [
        {
            "messages": [{"role": "user", "content": r["prompt"]}],
            "expected": names[intent_of(r["completion"]) or ""],
        }
        for r in records
    ]


def confusion_lines(table: Mapping[str, Mapping[str, int]], order: Sequence[str]) -> list[str]:
    """A confusion matrix as aligned text: a row per expected target, a column per chosen
    one (``order`` first, then any other target chosen)."""
    chosen = {c for row in table.values() for c in row}
    columns = [*order, *sorted(chosen - set(order))]
    width = max(len(c) for c in [*columns, "expected \\ chosen"])
    cell = {c: max(len(c), 3) for c in columns}
    lines = ["expected \\ chosen".ljust(width) + "".join(f"  {c:>{cell[c]}}" for c in columns)]
    for expected in [*order, *sorted(set(table) - set(order))]:
        row = table.get(expected, {})
        cells = "".join(f"  {row.get(c, 0):>{cell[c]}}" for c in columns)
        lines.append(expected.ljust(width) + cells)
    return lines


# -- talking to the server -------------------------------------------------------------


@dataclass
class Suite:
    """The tenant's clients and the names this run uses (numbered on a rerun)."""

    base: str
    key: str
    """The tenant's API key."""
    client: OpenAI
    http: httpx.Client
    routed: str
    classifier: str
    desks: dict[str, str]
    """Intent -> the answer adapter's name."""


def open_suite(url: str, base: str) -> Suite:
    registry = demo_registry()
    key = tenant_key(registry, TENANT)
    registry.close()
    http = httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"})
    taken = {a["id"] for a in api(http, "GET", "/v1/adapters").json()["data"]}
    taken |= {m["name"] for m in api(http, "GET", "/v1/routed_models").json()["data"]}
    wanted = [ROUTED, CLASSIFIER, *(name for name, _ in DESKS.values())]
    tag = next(
        t for t in ("", *(f"-{i}" for i in range(2, 1000))) if not {w + t for w in wanted} & taken
    )
    client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    desks = {intent: name + tag for intent, (name, _) in DESKS.items()}
    return Suite(base, key, client, http, ROUTED + tag, CLASSIFIER + tag, desks)


def start_jobs(suite: Suite, split: Split, train_desks: bool) -> dict[str, str]:
    """The classifier's job (and the desks', when trained), queued at once; -> name -> id."""
    datasets = {suite.classifier: split.train}
    if train_desks:
        datasets |= {suite.desks[i]: desk_records(split.train, i) for i in INTENTS}
    jobs = {}
    for name, records in datasets.items():
        upload = suite.client.files.create(
            file=(f"{name}.jsonl", chat_jsonl(records)), purpose="fine-tune"
        )
        classifier = name == suite.classifier
        extra = {"json_schema": INTENT_SCHEMA} if classifier else {}
        hyperparameters = CLASSIFIER_HYPERPARAMETERS if classifier else {}  # desks: auto
        method: Any = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
        job = suite.client.fine_tuning.jobs.create(
            model=suite.base,
            training_file=upload.id,
            suffix=name,
            seed=0,
            method=method,
            extra_body=extra,
        )
        jobs[name] = job.id
        say(f"fine-tuning job {job.id}: {name!r} on {len(records)} messages")
    return jobs


def wait_jobs(suite: Suite, jobs: Mapping[str, str]) -> None:
    """Poll until every job succeeded; each adapter is then made production if its job
    did not promote it (its own test split decides that; the demo needs all four live)."""
    started, done = time.monotonic(), set[str]()
    while len(done) < len(jobs):
        for name, job_id in jobs.items():
            job = suite.client.fine_tuning.jobs.retrieve(job_id)
            if job.status in ("failed", "cancelled"):
                raise SystemExit(
                    f"job {job_id} ({name}) {job.status}: {job.error}\n"
                    f"    the worker's log: {HOME / 'logs' / 'demo-worker.log'}"
                )
            if job.status == "succeeded" and name not in done:
                done.add(name)
                print(f"\r    {name}: succeeded after {time.monotonic() - started:.0f} s")
                ensure_production(suite, name, str(job.fine_tuned_model))
        if time.monotonic() - started > JOB_TIMEOUT_S:
            raise SystemExit(f"the jobs took over {JOB_TIMEOUT_S} s")
        elapsed = time.monotonic() - started
        print(f"\r    training ({len(done)} of {len(jobs)} done)... {elapsed:.0f} s", end="")
        time.sleep(2)
    print()


def upload_desks(suite: Suite, url: str) -> None:
    """The three answer adapters as stock PEFT output (seeded random weights)."""
    from server.dev.demo_site import random_adapter, upload_and_promote

    for intent, name in suite.desks.items():
        folder = random_adapter(
            HOME / "demo-base", HOME / "demo-adapters" / name, DESK_SEEDS[intent]
        )
        number = upload_and_promote(url, suite.key, name, folder, suite.base)
        say(f"uploaded {name!r} (stock PEFT files, random weights), promoted v{number}")


def ensure_production(suite: Suite, name: str, model: str) -> None:
    if "@" not in model:
        return  # the job promoted it
    number = int(model.rsplit("@", 1)[1])
    api(suite.http, "POST", f"/v1/adapters/{name}/promote", {"version": number})
    print(f"    {name}: v{number} not promoted by its job; promoted through the REST API")


def show_routes(suite: Suite, split: Split) -> None:
    """Messages in; the chosen adapter, why, and its answer out."""
    shown = [(r["prompt"], None) for r in split.shown]
    for text, metadata in [*RULE_MESSAGES, *shown]:
        raw = suite.client.chat.completions.with_raw_response.create(
            model=suite.routed,
            messages=[{"role": "user", "content": text}],
            max_tokens=ANSWER_TOKENS,
            temperature=0,
            metadata=metadata if metadata else omit,
        )
        answer = raw.parse().choices[0].message.content or ""
        reason = raw.headers.get("x-loraplex-routing-reason", "?")
        label = raw.headers.get("x-loraplex-routing-label")
        why = f"{reason}: {label}" if label else reason
        meta = f"  metadata {metadata}" if metadata else ""
        print(f"    {text!r}{meta}")
        served = raw.headers.get("x-loraplex-adapter") or f"{suite.base} (the base)"
        print(f"        -> {served} ({why}): {answer!r}")


def routing_eval(suite: Suite, split: Split) -> dict[str, Any]:
    path = f"/v1/routed_models/{suite.routed}/versions/1/evals"
    body = {"examples": eval_examples(split.held_out, suite.desks)}
    result: dict[str, Any] = api(suite.http, "POST", path, body).json()
    order = [suite.desks[i] for i in INTENTS]
    say(
        f"POST {path} ({len(body['examples'])} held-out labelled messages): "
        f"accuracy {100 * result['accuracy']:.1f} %"
    )
    for line in confusion_lines(result["confusion"], order):
        print(f"    {line}")
    return result


def run_routing(url: str, base: str, train_desks: bool = False) -> float:
    """The routed-model turn on the server at ``url`` (a worker must be running); -> the
    route's accuracy on the held-out messages. ``train_desks``: fine-tune the answer
    adapters too (stock PEFT adapters otherwise)."""
    from training.demo_data import intent_records

    started = time.monotonic()
    suite = open_suite(url, base)
    split = split_messages(intent_records(10_000))
    desks = "fine-tuned" if train_desks else "stock PEFT, random weights"
    say(f"tenant {TENANT}: a classifier, three answer adapters ({desks}), then {ROUTED!r}")
    jobs = start_jobs(suite, split, train_desks)
    if not train_desks:
        upload_desks(suite, url)
    wait_jobs(suite, jobs)
    policy = routing_policy(suite.desks, suite.classifier, base)
    api(suite.http, "POST", "/v1/routed_models", {"name": suite.routed, "policy": policy})
    time.sleep(1.0)  # the gateway's registry view is up to 0.9 s old
    rules = "; ".join(
        f"{r.get('field', 'last_user')} {r.get('pattern') or r.get('keywords')} -> {r['target']}"
        for r in policy["rules"]
    )
    say(f"POST /v1/routed_models {suite.routed!r}: rules [{rules}], then {suite.classifier!r}")
    print(f"    labels {policy['classifier']['labels']}; default {base!r}")
    say(f"messages to model {suite.routed!r} (the official openai client)")
    show_routes(suite, split)
    accuracy = float(routing_eval(suite, split)["accuracy"])
    say(f"routing turn done in {time.monotonic() - started:.0f} s")
    suite.http.close()
    return accuracy


def main(argv: list[str] | None = None) -> int:
    """The turn alone: the demo base, a server and a worker of its own."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--train-desks", action="store_true", help="fine-tune the three answer adapters too"
    )
    args = parser.parse_args(argv)
    return run_alone(lambda url, base: run_routing(url, base, args.train_desks))


if __name__ == "__main__":
    sys.exit(main())
