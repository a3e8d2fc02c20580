"""What a routed model's decision costs (issue 19, section 2: "Cost, bounded").

Three measurements, side by side in one run:

1. **The rules decision alone**: ``router.RoutingPolicy.by_rules`` (pure, in process) on a
   12-rule policy mixing keyword sets and regular expressions over 300 varied support
   messages, each decision timed on its own; also with ``RequestText.of`` reading the
   request body first (what the gateway does per request).
2. **Gateway micro-benchmark, fake engine**: loraplex in front of the STUB upstream
   (``bench/stub_upstream.py``), one closed-loop client, rounds alternating between a
   request for the adapter itself and one for a rules-routed model in front of it (its
   message matches none of the 12 rules: every rule runs, then the default). Per round:
   latency p50/p99 and the gateway's CPU per request.
3. **The classifier on the real vLLM CPU engine** (``bench.engine_session``: ``loraplex
   serve`` with one engine, random-weight stock PEFT adapters): chat completions
   (``max_tokens`` 16) sent to the target adapter directly, to a routed model whose
   classifier (``max_tokens`` 3, ``cache_seconds`` 0) picks that adapter, and to the same
   policy with the label cache on (an identical prompt, so every request after the first
   is a cache hit), interleaved; and the classifier's own call, asked directly. The
   classifier has random weights: its greedy answer to the prompt is observed first and
   becomes the label that maps to the target.

Numbers are printed, never asserted. Run: ``.venv/bin/python -m bench.routing [--quick]``;
writes ``bench/results/routing.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

import router
from bench import engine_session, loadgen, procs, targets
from bench.gateway import machine
from bench.results import publish
from bench.stats import percentile, summarize_ms

WORK = Path(__file__).resolve().parent / ".work" / "routing"
COMMAND = ".venv/bin/python -m bench.routing"
SETTLE = 1.5
"""Seconds for the gateway to see a new routed model (its registry cache holds ~1 s)."""
PROMPT = "Where is my parcel? It has not come yet."
"""The engine part's one message (identical every time, so a cache can hit)."""
NO_RULE_MATCHES = "Hello, I have a question about something else entirely."
"""The gateway part's message: no rule matches it, so all 12 run (the dearest rules case)."""
LONG = 200
"""Messages this long or longer are reported apart (a long message costs every rule more)."""
ANSWER_TOKENS = 16
CLASSIFIER_TOKENS = 3


@dataclass(frozen=True)
class RoutingBenchConfig:
    passes: int = 20
    """Passes over the messages when timing the rules decision in process."""
    duration: float = 5.0
    """Seconds each gateway round lasts (after its warm-up)."""
    warmup: float = 0.5
    rounds: int = 4
    """Gateway rounds per mode, alternating; the medians over them are reported."""
    requests: int = 60
    """Engine requests per mode (interleaved), after ``engine_warmup`` each."""
    engine_warmup: int = 3

    def quick(self) -> RoutingBenchConfig:
        return replace(self, passes=3, duration=1.0, rounds=2, requests=8, engine_warmup=1)


# -- 1. the rules decision, in process ------------------------------------------------


def rules_policy(targets_: tuple[str, str, str]) -> dict[str, Any]:
    """A realistic 12-rule policy: keyword sets and regular expressions on the last user
    message, the system prompt and metadata, then a default."""
    billing, shipping, account = targets_
    kw = "keywords"
    rules: list[dict[str, Any]] = [
        {"target": billing, "field": "metadata.team", "pattern": "^billing$"},
        {"target": shipping, "field": "metadata.team", "pattern": "^(shipping|logistics)$"},
        {"target": account, "field": "system", "pattern": r"(?i)\baccount desk\b"},
        {"target": billing, kw: ["invoice", "receipt", "vat", "billing address", "overcharged"]},
        {"target": billing, "pattern": r"(?i)\b(charged|refund(ed)?|card|payment)s?\b"},
        {"target": shipping, kw: ["tracking number", "courier", "parcel", "delivery", "dispatch"]},
        {"target": shipping, "pattern": r"(?i)\b(arriv(e|ed|al)|ship(ped|ping)?|mail)\b"},
        {"target": shipping, "pattern": r"\b[A-Z]{2}\d{9}[A-Z]{2}\b"},  # a postal tracking id
        {"target": account, kw: ["password", "log in", "login", "sign in", "two-factor", "2fa"]},
        {"target": account, "pattern": r"(?i)\b(e-?mail|username|profile) (change|update)"},
        {"target": account, "field": "user", "pattern": r"^admin-"},
        {"target": account, kw: ["delete my account", "close my account", "gdpr"]},
    ]
    return {"default": account, "rules": rules}


def messages(count: int = 300) -> list[router.RequestText]:
    """Varied request texts: support messages (the demo's intent data, which hits the
    rules at various depths), long and short chatter that hits none, and a few whose
    metadata, system prompt or user field decides."""
    from training.demo_data import intent_records

    rng = random.Random(0)
    support = [r["prompt"] for r in intent_records(10_000)]
    chatter = [
        "Hello, I have a question about something else entirely.",
        "Can you tell me more about your company and what it does? " * 8,
        "hi",
        "My password stopped working after the update",
        "Parcel RR123456789GB has been stuck for days",
        "I'd like to update my username change settings",
    ]
    texts = []
    for i in range(count):
        pool = support if i % 3 else chatter
        system = "You are the account desk." if i % 17 == 0 else "You are a helpful assistant."
        metadata = {"team": "logistics"} if i % 29 == 0 else {}
        user = "admin-7" if i % 31 == 0 else f"user-{i}"
        texts.append(router.RequestText(rng.choice(pool), system, user, metadata))
    return texts


def time_rules(config: RoutingBenchConfig) -> dict[str, Any]:
    """Microseconds per rules decision (and per body read + decision), p50/p99."""
    policy = router.RoutingPolicy.from_json(rules_policy(("billing", "shipping", "account")))
    texts = messages()
    bodies = [_body(t) for t in texts]
    decide_us, with_body_us, by = [], [], {"rule": 0, "none": 0}
    by_length: dict[str, list[float]] = {f"under {LONG} chars": [], f"{LONG}+ chars": []}
    for _ in range(config.passes):
        for text, body in zip(texts, bodies, strict=True):
            started = time.perf_counter_ns()
            decision = policy.by_rules(text)
            decide_us.append((time.perf_counter_ns() - started) / 1000)
            started = time.perf_counter_ns()
            policy.by_rules(router.RequestText.of(body))
            with_body_us.append((time.perf_counter_ns() - started) / 1000)
            by["rule" if decision is not None else "none"] += 1
            long = len(text.last_user) >= LONG
            by_length[f"{LONG}+ chars" if long else f"under {LONG} chars"].append(decide_us[-1])
    return {
        "rules": len(policy.rules),
        "messages": len(texts),
        "decisions": len(decide_us),
        "matched": by,
        "by_rules_us": _us(decide_us),
        "read_body_and_by_rules_us": _us(with_body_us),
        "by_rules_us_by_message_length": {k: _us(v) for k, v in by_length.items() if v},
    }


def _body(text: router.RequestText) -> dict[str, Any]:
    messages_ = [
        {"role": "system", "content": text.system},
        {"role": "user", "content": text.last_user},
    ]
    body: dict[str, Any] = {"model": "desk", "messages": messages_, "user": text.user}
    if text.metadata:
        body["metadata"] = dict(text.metadata)
    return body


def _us(values: list[float]) -> dict[str, float]:
    return {
        "p50_us": percentile(values, 50),
        "p99_us": percentile(values, 99),
        "max_us": max(values),
        "mean_us": statistics.fmean(values),
    }


# -- 2. the gateway with a fake engine --------------------------------------------------

STUB_ADAPTERS = ("billing", "shipping", "account")
ROUTED = "desk"


class StubSite:
    """The stub, loraplex in front of it, three adapters and a rules-routed model."""

    def __init__(self, work: Path) -> None:
        from registry import Actor, Registry, open_blob_store
        from server.dev.demo_site import random_adapter

        self.stub = targets.start_stub(work)
        self.gateway = targets.start_loraplex(work, self.stub.url)
        home = work / "loraplex-home"
        registry = Registry(f"sqlite:///{home}/registry.db", open_blob_store(str(home / "blobs")))
        principal = registry.authenticate(self.gateway.api_key)
        assert principal is not None and principal.tenant_id is not None
        actor = Actor("bench", admin=True)
        weights = random_adapter(work / "tiny-base", work / "adapter", 1)
        for name in STUB_ADAPTERS:
            version = registry.push_adapter(
                principal.tenant_id, name, weights, targets.MODEL, actor
            )
            registry.promote(principal.tenant_id, name, version.number, actor)
        registry.close()
        _save_routed(self.gateway.url, self.gateway.api_key, ROUTED, rules_policy(STUB_ADAPTERS))

    def stop(self) -> None:
        self.gateway.stop()
        self.stub.stop()


def _save_routed(url: str, key: str, name: str, policy: dict[str, Any]) -> None:
    answer = httpx.post(
        url + "/v1/routed_models",
        json={"name": name, "policy": policy},
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )
    if answer.status_code != 201:
        raise RuntimeError(f"saving routed model {name!r}: {answer.status_code} {answer.text}")


def _gateway_round(site: StubSite, spec: loadgen.RunSpec) -> dict[str, Any]:
    proc = site.gateway.proc
    assert proc is not None
    cpu_before = procs.cpu_seconds(proc.pid)
    summary = loadgen.run(spec).summary()
    cpu = procs.cpu_seconds(proc.pid) - cpu_before
    return {
        "requests_ok": summary["requests_ok"],
        "errors": summary["errors"],
        "p50_ms": summary["latency"].get("p50_ms"),
        "p99_ms": summary["latency"].get("p99_ms"),
        # warm-up requests used the CPU too
        "cpu_us_per_request": 1e6 * cpu / max(1, summary["total_incl_warmup"]),
    }


def gateway_micro(config: RoutingBenchConfig) -> dict[str, Any]:
    """Direct adapter vs rules-routed model through loraplex on the stub, alternating."""
    WORK.mkdir(parents=True, exist_ok=True)
    site = StubSite(WORK)
    try:
        time.sleep(SETTLE)
        rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "routed": []}
        for index in range(config.rounds):
            for mode in ("direct", "routed") if index % 2 == 0 else ("routed", "direct"):
                model = STUB_ADAPTERS[2] if mode == "direct" else ROUTED
                workload = loadgen.Workload(
                    site.gateway.url, model=model, api_key=site.gateway.api_key,
                    prompt=NO_RULE_MATCHES,
                )  # fmt: skip
                spec = loadgen.RunSpec(workload, duration=config.duration, warmup=config.warmup)
                rounds[mode].append(_gateway_round(site, spec))
                print(f"gateway round {index + 1} {mode}: {rounds[mode][-1]}", flush=True)
    finally:
        site.stop()
    keys = ("p50_ms", "p99_ms", "cpu_us_per_request")
    medians = {
        m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in rounds.items()
    }
    added = {k: medians["routed"][k] - medians["direct"][k] for k in keys}
    return {"rounds": rounds, "medians": medians, "added_by_routing": added}


# -- 3. the classifier on the real engine -------------------------------------------------


@dataclass(frozen=True)
class Sample:
    seconds: float
    adapter: str
    reason: str
    completion_tokens: int


def _chat(
    client: httpx.Client, url: str, key: str, model: str, max_tokens: int
) -> tuple[Sample, str]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    headers = {"authorization": f"Bearer {key}"}
    started = time.perf_counter()
    answer = client.post(url + "/v1/chat/completions", json=body, headers=headers)
    took = time.perf_counter() - started
    if answer.status_code != 200:
        raise RuntimeError(f"{model}: HTTP {answer.status_code}: {answer.text[:300]}")
    payload = answer.json()
    sample = Sample(
        took,
        answer.headers.get("x-loraplex-adapter", ""),
        answer.headers.get("x-loraplex-routing-reason", ""),
        int(payload["usage"]["completion_tokens"]),
    )
    return sample, payload["choices"][0]["message"]["content"] or ""


MODES = ("direct", "classifier_alone", "routed_no_cache", "routed_cached")


def engine_classifier(config: RoutingBenchConfig) -> dict[str, Any]:
    """Direct, classifier alone, routed (no cache), routed (cached): interleaved."""
    session_config = engine_session.SessionConfig(adapters=3, max_loras=4, max_cpu_loras=4)
    with engine_session.session(session_config) as s:
        target, default, classifier = s.adapter_names[:3]
        with httpx.Client(timeout=300) as client:
            _, said = _chat(client, s.gateway_url, s.tenant_key, classifier, CLASSIFIER_TOKENS)
            label = router.label_text(said)
            base_policy = {
                "default": default,
                "classifier": {
                    "adapter": classifier,
                    "labels": {label: target},
                    "max_tokens": CLASSIFIER_TOKENS,
                },
            }
            for name, cache in (("routed_no_cache", 0), ("routed_cached", 300)):
                policy = json.loads(json.dumps(base_policy))
                policy["classifier"]["cache_seconds"] = cache
                _save_routed(s.gateway_url, s.tenant_key, name.replace("_", "-"), policy)
            time.sleep(SETTLE)
            samples = _interleave(client, s, config, {"direct": target}, classifier)
        start_seconds = s.start_seconds
    return _engine_report(samples, label, said, start_seconds, (target, default, classifier))


def _interleave(
    client: httpx.Client,
    s: engine_session.Session,
    config: RoutingBenchConfig,
    names: dict[str, str],
    classifier: str,
) -> dict[str, list[Sample]]:
    models = {
        "direct": names["direct"],
        "classifier_alone": classifier,
        "routed_no_cache": "routed-no-cache",
        "routed_cached": "routed-cached",
    }
    samples: dict[str, list[Sample]] = {m: [] for m in MODES}
    for i in range(config.engine_warmup + config.requests):
        order = MODES[i % len(MODES) :] + MODES[: i % len(MODES)]  # rotate who goes first
        for mode in order:
            tokens = CLASSIFIER_TOKENS if mode == "classifier_alone" else ANSWER_TOKENS
            sample, _ = _chat(client, s.gateway_url, s.tenant_key, models[mode], tokens)
            if i >= config.engine_warmup:
                samples[mode].append(sample)
    return samples


def _engine_report(
    samples: dict[str, list[Sample]],
    label: str,
    said: str,
    start_seconds: float,
    names: tuple[str, str, str],
) -> dict[str, Any]:
    latency = {m: summarize_ms([x.seconds for x in xs]) for m, xs in samples.items()}
    direct = latency["direct"]
    added = {
        m: {k: latency[m][k] - direct[k] for k in ("p50_ms", "p99_ms")}
        for m in ("routed_no_cache", "routed_cached")
    }
    for mode, figures in added.items():
        # Each round's requests ran back to back: their differences cancel the host's
        # slower and faster minutes, which on shared cores move a p50 by tens of ms.
        paired = [
            1000 * (r.seconds - d.seconds)
            for r, d in zip(samples[mode], samples["direct"], strict=True)
        ]
        figures["paired_median_ms"] = statistics.median(paired)
    served = {
        m: sorted({f"{x.adapter} ({x.reason or 'direct'})" for x in xs})
        for m, xs in samples.items()
    }
    tokens = {m: sorted({x.completion_tokens for x in xs}) for m, xs in samples.items()}
    target, default, classifier = names
    return {
        "engine_start_seconds": start_seconds,
        "target": target,
        "default": default,
        "classifier": classifier,
        "classifier_answer": said,
        "label": label,
        "latency": latency,
        "added_by_routing": added,
        "served_by": served,
        "completion_tokens": tokens,
    }


# -- the report ---------------------------------------------------------------------------


def summary_lines(
    rules: dict[str, Any], micro: dict[str, Any], engine: dict[str, Any]
) -> list[str]:
    r, rb = rules["by_rules_us"], rules["read_body_and_by_rules_us"]
    med, add = micro["medians"], micro["added_by_routing"]
    lat, eadd = engine["latency"], engine["added_by_routing"]
    return [
        f"rules decision ({rules['rules']} rules, {rules['decisions']} decisions over "
        f"{rules['messages']} messages): p50 {r['p50_us']:.1f} µs, p99 {r['p99_us']:.1f} µs "
        f"(with reading the body: p50 {rb['p50_us']:.1f} µs, p99 {rb['p99_us']:.1f} µs); "
        + "; ".join(
            f"{k}: p50 {v['p50_us']:.1f} / p99 {v['p99_us']:.1f} µs"
            for k, v in rules["by_rules_us_by_message_length"].items()
        ),
        f"gateway on the stub (fake engine), no rule matching: direct p50 "
        f"{med['direct']['p50_ms']:.2f} ms / CPU {med['direct']['cpu_us_per_request']:.0f} µs, "
        f"rules-routed p50 {med['routed']['p50_ms']:.2f} ms / CPU "
        f"{med['routed']['cpu_us_per_request']:.0f} µs per request (added p50 "
        f"{add['p50_ms']:+.2f} ms, CPU {add['cpu_us_per_request']:+.0f} µs)",
        f"real vLLM CPU engine, chat max_tokens {ANSWER_TOKENS}, {lat['direct']['count']} each: "
        f"direct p50 {lat['direct']['p50_ms']:.1f} / p99 {lat['direct']['p99_ms']:.1f} ms; "
        f"classifier call alone ({CLASSIFIER_TOKENS} tokens) p50 "
        f"{lat['classifier_alone']['p50_ms']:.1f} / p99 {lat['classifier_alone']['p99_ms']:.1f} ms",
        f"routed, classifier each request (cache_seconds 0): p50 "
        f"{lat['routed_no_cache']['p50_ms']:.1f} / p99 {lat['routed_no_cache']['p99_ms']:.1f} ms, "
        f"added p50 {eadd['routed_no_cache']['p50_ms']:+.1f} / p99 "
        f"{eadd['routed_no_cache']['p99_ms']:+.1f} ms (median of paired differences "
        f"{eadd['routed_no_cache']['paired_median_ms']:+.1f} ms)",
        f"routed, label cached (identical prompt): p50 {lat['routed_cached']['p50_ms']:.1f} / "
        f"p99 {lat['routed_cached']['p99_ms']:.1f} ms, added p50 "
        f"{eadd['routed_cached']['p50_ms']:+.1f} / p99 {eadd['routed_cached']['p99_ms']:+.1f} ms "
        f"(median of paired differences {eadd['routed_cached']['paired_median_ms']:+.1f} ms)",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="short runs, for debugging")
    args = parser.parse_args(argv)
    config = RoutingBenchConfig().quick() if args.quick else RoutingBenchConfig()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    rules = time_rules(config)
    micro = gateway_micro(config)
    engine = engine_classifier(config)
    report = {
        "benchmark": "routing",
        "command": COMMAND + (" --quick" if args.quick else ""),
        "started": started,
        "machine": machine(),
        "workload": (
            f"rules: {rules['rules']}-rule policy over {rules['messages']} messages in process; "
            f"gateway: 1 closed-loop client on the stub upstream; engine: one chat message "
            f"(max_tokens {ANSWER_TOKENS}), classifier max_tokens {CLASSIFIER_TOKENS}, "
            f"random-weight rank-8 adapters on the demo base"
        ),
        "config": config.__dict__,
        "rules_in_process": rules,
        "gateway_stub": micro,
        "engine": engine,
        "summary_lines": summary_lines(rules, micro, engine),
    }
    publish("routing", report)


if __name__ == "__main__":
    main()
