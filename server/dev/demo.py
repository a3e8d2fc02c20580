"""``make demo``: the whole product on one laptop, with the official ``openai`` client.

Builds the demo base (once), starts ``loraplex serve`` as users run it, sends
a few requests to the base, then plays two tenants: each uploads a stock PEFT
adapter through the REST API, promotes it, and gets its own adapter's answers
while the other's stays invisible to it; both fine-tune through the openai client, and
one turn of the continuous fine-tuning loop follows (``server.dev.demo_loop``), then a
routed model whose trained classifier picks one of three adapters per request
(``server.dev.demo_routing``). Finally it stops the server and its engine.

The demo adapters carry seeded random LoRA weights, so "their behaviour" is
simply different text from the base's; trained adapters come from the
fine-tuning API (``loraplex worker``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from openai import NotFoundError, OpenAI

from server.dev.demo_loop import run_turn
from server.dev.demo_routing import run_routing
from server.dev.demo_site import (
    HOME,
    demo_registry,
    random_adapter,
    say,
    start_server,
    start_worker,
    tenant_key,
    upload_and_promote,
    wait_ready,
)
from server.dev.fleet import free_port


def show_requests(client: OpenAI, model: str) -> None:
    say(f"GET /v1/models -> {[m.id for m in client.models.list()]}")

    prompt = "The cat sat on the"
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0)
    say(f"completion of {prompt!r}:")
    print(f"    {prompt}{reply.choices[0].text}")

    question = "What color is the sky?"
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=30, temperature=0
    )
    say(f"chat: {question!r}")
    print(f"    {chat.choices[0].message.content}")

    say("streamed chat: 'Tell me a story.'")
    print("    ", end="")
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


TENANTS = {"acme": ("support-bot", 1), "globex": ("legal-bot", 2)}


def show_tenants(url: str, base: Path, keys: dict[str, str]) -> None:
    registry = demo_registry()
    prompt = "The cat sat on the"
    clients = {}
    for tenant, (adapter_name, seed) in TENANTS.items():
        key = keys[tenant]
        adapter = random_adapter(base, HOME / "demo-adapters" / adapter_name, seed)
        number = upload_and_promote(url, key, adapter_name, adapter, base.name)
        say(f"tenant {tenant}: uploaded {adapter_name} (stock PEFT files), promoted v{number}")
        clients[tenant] = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    for tenant, (adapter_name, _) in TENANTS.items():
        client = clients[tenant]
        ids = [m.id for m in client.models.list()]
        say(f"tenant {tenant} sees models {ids}")
        for model in (base.name, adapter_name):
            raw = client.completions.with_raw_response.create(
                model=model, prompt=prompt, max_tokens=12, temperature=0
            )
            served = raw.headers.get("x-loraplex-adapter") or "base"
            print(
                f"    {model:12} -> {prompt}{raw.parse().choices[0].text!r}  (served by: {served})"
            )
    other = TENANTS["globex"][0]
    try:
        clients["acme"].completions.create(model=other, prompt=prompt, max_tokens=4)
    except NotFoundError as exc:
        say(f"tenant acme asking for globex's {other!r}: 404 {exc.body}")
    time.sleep(1.5)  # usage is flushed once a second
    for tenant in TENANTS:
        rows = registry.usage(registry.get_tenant(tenant).id or 0)
        total = sum(r.prompt_tokens + r.completion_tokens for r in rows)
        say(
            f"usage recorded for {tenant}: {total} tokens, {sum(r.requests for r in rows)} requests"
        )
    registry.close()


JOBS = {
    "acme": ("format", "acme-json"),
    "globex": ("persona", "globex-pirate"),
}
"""Tenant -> (demo dataset behaviour, fine-tuned model name)."""

HELD_OUT = ["What color is the kettle?", "Where is the owl?", "Do you like the bench?"]


def fine_tune(url: str, base: Path, keys: dict[str, str]) -> dict[str, str]:
    """Each tenant uploads its dataset and runs a job through the openai client; -> model names."""
    from training.demo_data import FORMAT_SCHEMA, demo_jsonl

    jobs = {}
    for tenant, (behaviour, suffix) in JOBS.items():
        client = OpenAI(base_url=url + "/v1", api_key=keys[tenant], max_retries=0)
        upload = client.files.create(
            file=(f"{behaviour}.jsonl", demo_jsonl(behaviour)), purpose="fine-tune"
        )
        # Default ("auto") hyperparameters: the worker sizes epochs and batches to the data
        # and searches the learning rate, as for any user's job.
        extra: dict[str, object] = {}
        if behaviour == "format":
            extra["json_schema"] = FORMAT_SCHEMA
        job = client.fine_tuning.jobs.create(
            model=base.name, training_file=upload.id, suffix=suffix, seed=0, extra_body=extra
        )
        say(f"tenant {tenant}: uploaded {upload.filename}, started fine-tuning job {job.id}")
        jobs[tenant] = (client, job.id)
    started = time.monotonic()
    models: dict[str, str] = {}
    while len(models) < len(jobs):
        for tenant, (client, job_id) in jobs.items():
            job = client.fine_tuning.jobs.retrieve(job_id)
            if job.status == "succeeded" and tenant not in models:
                models[tenant] = str(job.fine_tuned_model)
                say(f"tenant {tenant}: job {job_id} succeeded -> model {job.fine_tuned_model!r}")
            elif job.status in ("failed", "cancelled"):
                raise SystemExit(f"fine-tuning job {job_id} {job.status}: {job.error}")
        # Two jobs one after another, each with its learning-rate search: 10-13 min on 2 cores.
        if time.monotonic() - started > 1800:
            raise SystemExit("fine-tuning took over 30 minutes; see .loraplex/logs/demo-worker.log")
        print(f"\r    training... {time.monotonic() - started:.0f} s", end="", flush=True)
        time.sleep(2)
    print()
    return models


def show_trained(url: str, base: Path, keys: dict[str, str], models: dict[str, str]) -> None:
    registry = demo_registry()
    for tenant, model in models.items():
        client = OpenAI(base_url=url + "/v1", api_key=keys[tenant], max_retries=0)
        say(f"tenant {tenant}: {model} next to the base, on questions it was not trained on")
        for question in HELD_OUT:
            answers = []
            for name in (base.name, model):
                reply = client.chat.completions.create(
                    model=name,
                    messages=[{"role": "user", "content": question}],
                    max_tokens=40,
                    temperature=0,
                )
                answers.append(reply.choices[0].message.content)
            print(f"    Q: {question}\n       base:  {answers[0]!r}\n       tuned: {answers[1]!r}")
        tenant_id = registry.get_tenant(tenant).id or 0
        [version] = registry.list_versions(tenant_id, model)[-1:]
        evals = registry.eval_results(tenant_id, model, version.number)
        table = ", ".join(
            f"{e.suite}/{e.metric}={e.value:.2f}" for e in evals if e.metric != "loss"
        )
        print(f"    stored eval results (held-out test split): {table}")
    registry.close()


def main() -> int:
    from training.demo_base import build_demo_base

    say("building the demo base model (cached after the first run)")
    base = build_demo_base(HOME / "demo-base")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = HOME / "logs" / "demo-serve.log"
    say(f"starting `loraplex serve` on {url} (log: {log_path})")
    server = start_server(base, port, log_path)
    try:
        wait_ready(url, server)
        registry = demo_registry()
        client = OpenAI(base_url=url + "/v1", api_key=tenant_key(registry, "demo"), max_retries=0)
        registry.close()
        show_requests(client, base.name)
        registry = demo_registry()
        keys = {tenant: tenant_key(registry, tenant) for tenant in TENANTS}
        registry.close()
        show_tenants(url, base, keys)
        say(f"starting `loraplex worker` (log: {HOME / 'logs' / 'demo-worker.log'})")
        worker = start_worker(base, HOME / "logs" / "demo-worker.log")
        try:
            models = fine_tune(url, base, keys)
            show_trained(url, base, keys, models)
            run_turn(url, base.name)  # one turn of the fine-tuning loop; needs the worker
            run_routing(url, base.name)  # a routed model with a trained classifier
        finally:
            worker.stop()
    finally:
        say("stopping the server and its engine")
        server.stop()
    say("demo finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
