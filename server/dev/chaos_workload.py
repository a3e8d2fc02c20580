"""The chaos soak's traffic: what several tenants do to the fleet while its processes die.

Threads of :class:`Workload` send, each to a random gateway:

- inference with the official ``openai`` client (chat, completions and chat streams;
  the bases, adapters by alias, pinned versions), every answer's version headers and
  text kept;
- adapter uploads and alias changes (promote, canary, clear canary, rollback) with
  plain REST calls, each with its acknowledgement;
- small fine-tuning jobs (a file, then a job) through the ``openai`` client.

Every request becomes one :class:`~server.dev.chaos_checks.Call`, success or not.
Adapters are stock PEFT files with seeded random weights: one adapter name
(``bot``) exists in every tenant with different weights, so an answer from the
wrong tenant's adapter shows in its text.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from openai import OpenAI
from openai.types.chat import ChatCompletionChunk

from server.dev.chaos_checks import Call, shaped

REQUEST_TIMEOUT = 60.0
"""Seconds an inference request may take (a few tokens; engines restart on 2 CPU cores)."""
REGISTRY_TIMEOUT = 150.0
"""Seconds a registry call may take: a promote pre-warms on every engine (120 s each at most)."""
THINK_TIME = 0.5
"""Seconds an inference thread waits between requests at most (users, not a load test)."""
PROMPT = "The cat sat on the"
MESSAGES = [{"role": "user", "content": "Tell me about the owl."}]
MAX_TOKENS = 6
SHARED_NAME = "bot"
"""An adapter name every tenant has (its own weights): the case a mix-up would hit."""
OWN_NAME = "helper"
"""Each tenant's adapter on the second base, when the fleet has one."""
TUNED = "tuned"
"""The fine-tuning jobs' suffix (and so adapter name) on the first base; ``tuned-1`` on the
second (``tuned_name``): each base has its own worker."""
TRAINING = {"n_epochs": 1, "batch_size": 8, "max_steps": 2, "eval_every": 1000}
"""Tiny jobs: two optimizer steps, evaluated once on the held-out split."""


@dataclass
class SoakAdapter:
    """One tenant's adapter as the workload knows it (acknowledged writes only)."""

    tenant: str
    name: str
    base: str
    """The served name of the base it is pinned to."""
    versions: list[int] = field(default_factory=list)
    promoted: bool = False
    """It has had a production alias: its bare name resolves."""
    canary: bool = False
    tuned: bool = False
    """Its versions come from fine-tuning jobs (the worker promotes them), not uploads."""


def tuned_name(base_index: int) -> str:
    return TUNED if base_index == 0 else f"{TUNED}-{base_index}"


LOUDNESS = 5.0
"""How much larger than PEFT's own random weights the uploaded adapters' weights are."""


class AdapterPool:
    """Fresh stock PEFT adapters for a base, cheaply: one PEFT run, then re-seeded tensors."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.seed = seed
        self._templates: dict[Path, Path] = {}
        self._count = 0
        self._lock = threading.Lock()

    def fresh(self, base: Path) -> Path:
        """A new adapter directory for ``base`` whose weights no other adapter has."""
        from server.dev.demo_site import random_adapter

        with self._lock:
            self._count += 1
            number = self._count
            if base not in self._templates:
                dest = self.root / f"{base.name}-template"
                shutil.rmtree(dest, ignore_errors=True)
                self._templates[base] = random_adapter(base, dest, seed=self.seed)
        return _reseeded(self._templates[base], self.root / f"{base.name}-{number}", number)


def _reseeded(template: Path, dest: Path, seed: int) -> Path:
    """``template``'s files with every tensor drawn again, ``LOUDNESS`` times larger.

    PEFT's random weights barely move the demo bases: two such adapters often answer
    alike, and like the base. Louder ones answer each in their own (garbled) words, so
    an answer names the adapter that gave it.
    """
    import numpy as np
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(seed)
    weights = template / "adapter_model.safetensors"
    tensors = {
        name: rng.normal(0.0, LOUDNESS * (float(t.std()) or 0.02), t.shape).astype(t.dtype)
        for name, t in load_file(weights).items()
    }
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    save_file(tensors, dest / weights.name, metadata={"format": "pt"})
    shutil.copy(template / "adapter_config.json", dest / "adapter_config.json")
    return dest


@dataclass
class SoakTenant:
    name: str
    key: str
    adapters: dict[str, SoakAdapter] = field(default_factory=dict)


@dataclass
class Gateway:
    """What the workload needs of a gateway: its name and address (fixed across restarts)."""

    name: str
    url: str


@dataclass
class Workload:
    """The tenants' traffic; every thread appends its :class:`Call` records to ``calls``."""

    gateways: list[Gateway]
    tenants: list[SoakTenant]
    bases: dict[str, Path]
    """Served base name -> its directory."""
    pool: AdapterPool
    seed: int
    calls: list[Call] = field(default_factory=list)
    jobs: dict[str, SoakTenant] = field(default_factory=dict)
    """Fine-tuning job id -> its tenant, for jobs the API acknowledged."""
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    # -- running ------------------------------------------------------------------

    def start(self, inference_threads: int, job_every: float) -> None:
        loops: list[tuple[str, Callable[[random.Random], None]]] = [
            (f"infer-{i}", self._inference_loop) for i in range(inference_threads)
        ]
        loops.append(("registry", self._registry_loop))
        loops.append(("jobs", lambda rng: self._job_loop(rng, job_every)))
        for index, (name, loop) in enumerate(loops):
            rng = random.Random(self.seed * 1000 + index)
            thread = threading.Thread(target=loop, args=(rng,), name=f"chaos-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def finish(self) -> None:
        """Stop sending; wait for the requests in flight (each ends by its own timeout)."""
        self.stop.set()
        for thread in self._threads:
            thread.join(REGISTRY_TIMEOUT + 30)

    def _inference_loop(self, rng: random.Random) -> None:
        clients: dict[tuple[str, str], OpenAI] = {}
        while not self.stop.is_set():
            tenant = rng.choice(self.tenants)
            gateway = rng.choice(self.gateways)
            client = clients.get((tenant.name, gateway.name))
            if client is None:
                client = OpenAI(
                    base_url=gateway.url + "/v1",
                    api_key=tenant.key,
                    max_retries=0,
                    timeout=REQUEST_TIMEOUT,
                )
                clients[(tenant.name, gateway.name)] = client
            op = rng.choice(("chat", "completion", "stream"))
            call = Call(op, tenant.name, self._model(rng, tenant), gateway.name, 0, REQUEST_TIMEOUT)
            user = f"user-{rng.randrange(16)}"
            self._record(call, functools.partial(infer, client, call, user))
            self.stop.wait(rng.uniform(0.0, THINK_TIME))

    def _model(self, rng: random.Random, tenant: SoakTenant) -> str:
        """A base (1 in 5), a pinned version (1 in 5) or an adapter by its aliases."""
        with self._lock:
            adapters = [a for a in tenant.adapters.values() if a.promoted]
            roll = rng.random()
            if not adapters or roll < 0.2:
                return rng.choice(sorted(self.bases))
            adapter = rng.choice(adapters)
            if roll < 0.4:
                return f"{adapter.name}@{rng.choice(adapter.versions)}"
            return adapter.name

    def _record(self, call: Call, send: Callable[[], None]) -> None:
        call.sent = time.time()
        try:
            send()
        finally:
            call.done = time.time()
            self.calls.append(call)

    # -- the registry -------------------------------------------------------------

    def rest(
        self, call: Call, method: str, path: str, key: str, **request: Any
    ) -> dict[str, Any] | None:
        """One REST call through ``call.gateway``, recorded; the JSON body when acknowledged."""
        url = next(g.url for g in self.gateways if g.name == call.gateway) + path
        body: dict[str, Any] | None = None

        def send() -> None:
            nonlocal body
            body = rest_call(call, method, url, key, request)

        self._record(call, send)
        return body if call.acknowledged else None

    def upload(self, rng: random.Random, tenant: SoakTenant, adapter: SoakAdapter) -> None:
        files = self.pool.fresh(self.bases[adapter.base])
        parts = [("files", (f.name, f.read_bytes())) for f in sorted(files.iterdir())]
        call = Call("upload", tenant.name, adapter.name, rng.choice(self.gateways).name, 0, 0)
        call.timeout = REGISTRY_TIMEOUT
        form = {"name": adapter.name, "base": adapter.base}
        answer = self.rest(call, "POST", "/v1/adapters", tenant.key, files=parts, data=form)
        if answer is not None:
            call.answer = {"version": answer["version"], "fingerprint": answer["fingerprint"]}
            with self._lock:
                adapter.versions.append(int(answer["version"]))

    def move(self, rng: random.Random, tenant: SoakTenant, adapter: SoakAdapter, op: str) -> None:
        """One alias change: ``promote``, ``canary``, ``clear_canary`` or ``rollback``."""
        call = Call(op, tenant.name, adapter.name, rng.choice(self.gateways).name, 0, 0)
        call.timeout = REGISTRY_TIMEOUT
        path = f"/v1/adapters/{adapter.name}"
        if op == "promote":
            call.asked = {"version": rng.choice(adapter.versions)}
            answer = self.rest(call, "POST", f"{path}/promote", tenant.key, json=call.asked)
        elif op == "canary":
            call.asked = {"version": rng.choice(adapter.versions), "weight": 0.3}
            answer = self.rest(call, "POST", f"{path}/canary", tenant.key, json=call.asked)
        elif op == "clear_canary":
            answer = self.rest(call, "DELETE", f"{path}/canary", tenant.key)
        else:
            answer = self.rest(call, "POST", f"{path}/rollback", tenant.key)
        if not call.acknowledged:
            return
        if answer and "version" in answer:
            call.answer = {"version": answer["version"]}
        with self._lock:
            adapter.promoted = adapter.promoted or op in ("promote", "rollback")
            adapter.canary = op == "canary" or (adapter.canary and op != "clear_canary")

    def _registry_loop(self, rng: random.Random) -> None:
        while not self.stop.wait(rng.uniform(1.0, 3.0)):
            tenant = rng.choice(self.tenants)
            adapter = rng.choice([a for a in tenant.adapters.values() if not a.tuned])
            roll = rng.random()
            if roll < 0.2 or not adapter.versions:
                self.upload(rng, tenant, adapter)
            elif roll < 0.55:
                self.move(rng, tenant, adapter, "promote")
            elif roll < 0.75:
                self.move(rng, tenant, adapter, "canary")
            elif roll < 0.85 and adapter.canary:
                self.move(rng, tenant, adapter, "clear_canary")
            else:
                self.move(rng, tenant, adapter, "rollback")

    # -- fine-tuning --------------------------------------------------------------

    def _job_loop(self, rng: random.Random, every: float) -> None:
        while not self.stop.is_set():
            tenant = rng.choice(self.tenants)
            self.fine_tune(
                rng, tenant, rng.choice([a for a in tenant.adapters.values() if a.tuned])
            )
            self._note_tuned()
            self.stop.wait(every)
        self._note_tuned()

    def fine_tune(self, rng: random.Random, tenant: SoakTenant, adapter: SoakAdapter) -> None:
        """A training file, then a job on it whose versions go to ``adapter``."""
        gateway = rng.choice(self.gateways)
        client = OpenAI(
            base_url=gateway.url + "/v1",
            api_key=tenant.key,
            max_retries=0,
            timeout=REGISTRY_TIMEOUT,
        )
        upload = Call("file", tenant.name, "fine-tune", gateway.name, 0, REGISTRY_TIMEOUT)
        self._record(upload, lambda: create_file(client, upload, training_data(rng)))
        if not upload.acknowledged:
            return
        job = Call("job", tenant.name, adapter.base, gateway.name, 0, REGISTRY_TIMEOUT)
        job.asked = {"training_file": upload.answer["id"], "suffix": adapter.name}
        self._record(job, lambda: create_job(client, job, rng.randrange(1000)))
        if job.acknowledged:
            with self._lock:
                self.jobs[job.answer["id"]] = tenant

    def _note_tuned(self) -> None:
        """Send inference to each tuned adapter once the worker has promoted a version."""
        for tenant in self.tenants:
            for adapter in tenant.adapters.values():
                if adapter.tuned and not adapter.promoted and self._tuned_ready(tenant, adapter):
                    with self._lock:
                        adapter.promoted = True

    def _tuned_ready(self, tenant: SoakTenant, adapter: SoakAdapter) -> bool:
        try:
            shown = httpx.get(
                f"{self.gateways[0].url}/v1/adapters/{adapter.name}",
                headers={"authorization": f"Bearer {tenant.key}"},
                timeout=10,
            )
        except httpx.HTTPError:
            return False
        if shown.status_code != 200:
            return False
        body = shown.json()
        with self._lock:
            adapter.versions = [int(v["version"]) for v in body.get("versions", [])]
        return "production" in body.get("aliases", {})


# -- one request ---------------------------------------------------------------------


def infer(client: OpenAI, call: Call, user: str) -> None:
    """Send ``call`` (chat, completion or stream) with ``client``; fill in what came back."""
    try:
        if call.op == "completion":
            raw = client.completions.with_raw_response.create(
                model=call.target, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, user=user
            )
            _headers(call, raw.status_code, raw.headers)
            call.text = raw.parse().choices[0].text
        elif call.op == "chat":
            chat = client.chat.completions.with_raw_response.create(
                model=call.target,
                messages=MESSAGES,  # type: ignore[arg-type]
                max_tokens=MAX_TOKENS,
                temperature=0,
                user=user,
            )
            _headers(call, chat.status_code, chat.headers)
            call.text = chat.parse().choices[0].message.content or ""
        else:
            _stream(client, call, user)
    except openai.APIError as exc:
        note_error(call, exc)


def _stream(client: OpenAI, call: Call, user: str) -> None:
    with client.chat.completions.with_streaming_response.create(
        model=call.target,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        temperature=0,
        user=user,
        stream=True,
    ) as response:
        _headers(call, response.status_code, response.headers)
        pieces = []
        for chunk in response.parse():
            if (
                isinstance(chunk, ChatCompletionChunk)
                and chunk.choices
                and chunk.choices[0].delta.content
            ):
                pieces.append(chunk.choices[0].delta.content)
        call.text = "".join(pieces)


def _headers(call: Call, status: int, headers: Mapping[str, str]) -> None:
    call.status = status
    call.version = headers.get("x-loraplex-version", "")
    call.adapter = headers.get("x-loraplex-adapter", "")
    call.route = headers.get("x-loraplex-route", "")


def note_error(call: Call, exc: openai.APIError) -> None:
    """What an ``openai`` exception says about the failure, in ``call``'s terms."""
    if isinstance(exc, openai.APITimeoutError):
        call.status, call.error = 0, "timeout"
    elif isinstance(exc, openai.APIConnectionError):
        # Cut before, or in the middle of, an answer: no clean error came.
        call.status, call.error = 0, type(exc.__cause__ or exc).__name__
    elif isinstance(exc, openai.APIStatusError):
        call.status = exc.status_code
        call.detail = _text(exc.response)
        # The SDK keeps the inside of {"error": {...}} as the body.
        body = (
            exc.body if isinstance(exc.body, dict) and "error" in exc.body else {"error": exc.body}
        )
        call.shaped = shaped(body)
        call.error = _code(body) or f"http_{exc.status_code}"
    else:  # an error event that ended a stream
        call.status = call.status or 200
        call.detail = json.dumps(exc.body)[:300]
        call.shaped = shaped({"error": exc.body})
        call.error = "stream_error"


def _text(response: Any) -> str:
    try:
        return str(response.text)[:300]
    except Exception:  # a stream closed before its body was read
        return ""


def _code(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("code") or error.get("type") or "") if isinstance(error, dict) else ""


def rest_call(
    call: Call, method: str, url: str, key: str, request: dict[str, Any]
) -> dict[str, Any] | None:
    """One REST request for ``call``; the JSON body of a 2xx answer."""
    try:
        answer = httpx.request(
            method,
            url,
            headers={"authorization": f"Bearer {key}"},
            timeout=call.timeout,
            **request,
        )
    except httpx.TimeoutException:
        call.error = "timeout"
        return None
    except httpx.HTTPError as exc:
        call.error = type(exc).__name__
        return None
    call.status = answer.status_code
    try:
        body = answer.json() if answer.content else {}
    except ValueError:
        body = None
    if answer.status_code >= 400:
        call.detail = answer.text[:300]
        call.shaped = shaped(body)
        call.error = _code(body) or f"http_{answer.status_code}"
        return None
    return body if isinstance(body, dict) else {}


def training_data(rng: random.Random) -> bytes:
    """30 records of one of the demo's behaviours: enough to split, quick to train on."""
    from training.demo_data import demo_records

    records = demo_records(rng.choice(("format", "persona")))
    rng.shuffle(records)
    return "".join(json.dumps(r) + "\n" for r in records[:30]).encode()


def create_file(client: OpenAI, call: Call, content: bytes) -> None:
    try:
        made = client.files.with_raw_response.create(
            file=("chaos.jsonl", content), purpose="fine-tune"
        )
        call.status = made.status_code
        call.answer = {"id": made.parse().id}
    except openai.APIError as exc:
        note_error(call, exc)


def create_job(client: OpenAI, call: Call, seed: int) -> None:
    try:
        made = client.fine_tuning.jobs.with_raw_response.create(
            model=call.target,
            training_file=call.asked["training_file"],
            suffix=call.asked["suffix"],
            seed=seed,
            extra_body={"hyperparameters": TRAINING},
        )
        call.status = made.status_code
        call.answer = {"id": made.parse().id}
    except openai.APIError as exc:
        note_error(call, exc)
