"""The gateway's fair queue: requests wait here, not in the engines' first-come queue.

One ``router.FairQueue`` per base holds that base's requests back while their
tenant's in-flight budget or the pool of the base's healthy replicas is full, in
tokens or in prompt tokens, and starts them in deficit-round-robin order across
tenants as tokens free. The prompt bound is the one a flood of long prompts meets:
it keeps the prefill an engine has been sent to a few steps' worth
(``engine_max_in_flight_prompt_tokens``), while the token bound, sized in
full-length sequences, leaves short-prompt requests free to decode together.
A request holds its seat from the moment it starts until its answer ends (whole,
streamed, failed, or abandoned by the client): ``Seat.release`` runs from the
request's ``Outcome.on_finish``, which every path reaches exactly once.

A request's cost is known before the engine tokenizes its prompt only as an
estimate: the one the tenant limits charge (``accounting.estimate_tokens``:
characters / 3 + max completion), capped at ``engine_max_model_len`` per choice,
the most one sequence can hold in an engine; its prompt's share likewise. A request
that waits longer than ``fair_queue_timeout`` gets a retryable answer with
``Retry-After``: 429 when it waited behind its own tenant's requests, 503 when
behind the engines' capacity.

A started request goes to the engine with the ``priority`` its tenant's share of the
pool gives it (``router.FairQueue.priority``), so the engine's waiting queue (vLLM's
``--scheduling-policy priority``, which ``engine_command`` passes) puts a quiet
tenant's request ahead of a flood's already there. A client's own ``priority`` is
dropped, fair queueing on or off: it would let any tenant jump every queue. (vLLM's
``X-Vllm-Priority`` header cannot arrive: the gateway sends engines its own headers.)
"""

from __future__ import annotations

import asyncio
import time
from asyncio import FIRST_COMPLETED
from typing import Any

from starlette.types import Receive

import router
from server.config import Settings
from server.errors import APIError
from server.gateway.accounting import estimate_prompt_tokens, estimate_tokens
from server.gateway.metrics import Metrics

REPLICA_TOKENS_PER_MAX_MODEL_LEN = 16
"""Default in-flight tokens of one replica, in full-length sequences (``engine_max_model_len``)."""
BUDGET_RETRY_AFTER = 1
"""Seconds suggested to a tenant that waited out its own budget: its requests end any time."""
BUSY_RETRY_AFTER = 2
"""Seconds suggested when every tenant's requests filled the engines."""


class QueueTimeout(APIError):
    """A request waited at the fair queue too long; ``reason`` labels the request metric."""

    def __init__(self, status: int, message: str, reason: str, retry_after: int) -> None:
        code = "rate_limit_exceeded" if status == 429 else reason
        super().__init__(status, message, code=code, headers={"Retry-After": str(retry_after)})
        self.reason = reason


class ClientGone(APIError):
    """The client disconnected while its request waited; nobody reads this answer."""

    reason = "client_disconnected"

    def __init__(self) -> None:
        super().__init__(400, "The client disconnected while its request waited in the queue.")


class Seat:
    """A started request's hold on its pool; ``release`` it when the answer ends (idempotent)."""

    __slots__ = ("_gate", "_queue", "_ticket", "waited")

    def __init__(
        self, gate: FairGate, queue: router.FairQueue, ticket: router.Ticket, waited: bool
    ) -> None:
        self._gate, self._queue, self._ticket = gate, queue, ticket
        self.waited = waited
        """Whether it waited for its turn (or started at once)."""

    def release(self) -> None:
        self._gate.leave(self._queue, self._ticket)


class Unseated:
    """What ``FairGate.enter`` answers with fair queueing off: nothing held, nothing to free."""

    __slots__ = ()
    waited = False

    def release(self) -> None:
        return None


UNSEATED = Unseated()


class FairGate:
    """A fair queue per base, in front of the base's replicas."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.enabled = settings.fair_queueing
        self.max_model_len = settings.engine_max_model_len
        self.replica_tokens = settings.engine_max_in_flight_tokens or (
            REPLICA_TOKENS_PER_MAX_MODEL_LEN * settings.engine_max_model_len
        )
        """Tokens one replica is sent at once."""
        self.replica_prompt_tokens = settings.resolved_max_in_flight_prompt_tokens()
        """Prompt tokens one replica is sent at once; 0: no bound."""
        self.tenant_tokens = settings.tenant_max_in_flight_tokens
        """A tenant's in-flight budget; 0: half of its base's pool."""
        self.timeout = settings.fair_queue_timeout
        self.metrics = metrics
        self._queues: dict[str, router.FairQueue] = {}
        self._waiters: dict[router.Ticket, asyncio.Future[None]] = {}

    def cost(self, body: dict[str, Any]) -> int:
        """Tokens a request holds while in flight (an estimate; see the module's docstring)."""
        choices = body.get("n", 1)
        return min(estimate_tokens(body, self.max_model_len), self.max_model_len * choices)

    def prompt_cost(self, body: dict[str, Any]) -> int:
        """Of those, its prompt's (the queue keeps it within the cost)."""
        return min(estimate_prompt_tokens(body), self.max_model_len)

    def budget(self, pool_capacity: int) -> int:
        """A tenant's in-flight token budget on a pool holding ``pool_capacity`` tokens."""
        return self.tenant_tokens or max(1, pool_capacity // 2)

    @staticmethod
    def prompt_budget(prompt_capacity: int | None) -> int | None:
        """A tenant's in-flight prompt budget on a pool holding ``prompt_capacity``: half."""
        return None if prompt_capacity is None else max(1, prompt_capacity // 2)

    async def enter(
        self, tenant: str, base: str, replicas: int, body: dict[str, Any], receive: Receive
    ) -> Seat | Unseated:
        """Wait until the request may go to one of ``base``'s ``replicas`` healthy engines.

        Raises ``QueueTimeout`` past ``fair_queue_timeout`` and ``ClientGone`` if the
        client disconnects meanwhile; either way it holds nothing after.
        """
        if not self.enabled:
            body.pop("priority", None)  # vLLM's default, 0, for all: first come, first served
            return UNSEATED
        capacity = self.replica_tokens * replicas
        prompts = self.replica_prompt_tokens * replicas if self.replica_prompt_tokens else None
        queue = self._queues.get(base)
        if queue is None:
            queue = router.FairQueue(capacity, quantum=self.max_model_len, prompt_capacity=prompts)
            self._queues[base] = queue
        elif (queue.capacity, queue.prompt_capacity) != (capacity, prompts):
            self._wake(queue.resize(capacity, prompts))
        ticket, started = queue.join(
            tenant,
            self.cost(body),
            self.budget(capacity),
            self.prompt_cost(body),
            self.prompt_budget(prompts),
        )
        self._wake(started)
        if ticket.started:
            self.metrics.queue_wait_of(tenant).observe(0.0)
            seat = Seat(self, queue, ticket, waited=False)
        else:
            seat = await self._wait(queue, ticket, receive)
        body["priority"] = queue.priority(ticket)  # replaces the client's, if it sent one
        return seat

    def crowded(self, base: str, body: dict[str, Any]) -> bool:
        """Whether a request that takes no seat (a shadow copy) would crowd ``base``'s
        replicas: someone waits at its queue, or its in-flight tokens leave no room."""
        queue = self._queues.get(base) if self.enabled else None
        if queue is None:
            return False
        return queue.waiting() > 0 or queue.in_flight + self.cost(body) > queue.capacity

    def last_in_line(self, body: dict[str, Any]) -> None:
        """Give a request that takes no seat the engines' lowest priority (when fair
        queueing sets priorities at all: an engine without priority scheduling refuses one)."""
        if self.enabled:
            body["priority"] = router.PRIORITY_LEVELS
        else:
            body.pop("priority", None)

    def leave(self, queue: router.FairQueue, ticket: router.Ticket) -> None:
        """Free what ``ticket`` holds or waits for; start whom that lets in."""
        self._wake(queue.leave(ticket))

    async def _wait(self, queue: router.FairQueue, ticket: router.Ticket, receive: Receive) -> Seat:
        waited = time.perf_counter()
        turn = self._waiters[ticket] = asyncio.get_running_loop().create_future()
        gone = asyncio.ensure_future(_disconnect(receive))
        self._count_waiting(ticket.tenant)
        try:
            await asyncio.wait((turn, gone), timeout=self.timeout, return_when=FIRST_COMPLETED)
            if not ticket.started:
                raise ClientGone() if _ended(gone) else self._timeout(queue, ticket)
        except BaseException:
            self.leave(queue, ticket)  # refused or cancelled: started or not, it holds nothing
            raise
        finally:
            gone.cancel()
            del self._waiters[ticket]
            self._count_waiting(ticket.tenant)
            self.metrics.queue_wait_of(ticket.tenant).observe(time.perf_counter() - waited)
        return Seat(self, queue, ticket, waited=True)

    def _timeout(self, queue: router.FairQueue, ticket: router.Ticket) -> QueueTimeout:
        if queue.over_budget(ticket):
            held, budget = queue.in_flight_of(ticket.tenant), self.budget(queue.capacity)
            prompts = queue.in_flight_prompt_of(ticket.tenant)
            prompt_budget = self.prompt_budget(queue.prompt_capacity)
            of_prompts = (
                "" if prompt_budget is None else f" and {prompts} prompt tokens of {prompt_budget}"
            )
            return QueueTimeout(
                429,
                f"your requests in flight hold {held} tokens of your in-flight budget of "
                f"{budget}{of_prompts}; this one ({ticket.cost} tokens, {ticket.prompt} of "
                f"them prompt) waited {self.timeout:g} s for them: send fewer at once, or retry",
                "in_flight_tokens",
                BUDGET_RETRY_AFTER,
            )
        return QueueTimeout(
            503,
            f"The engines are busy with other requests; this one waited {self.timeout:g} s. "
            "Retry in a few seconds.",
            "engines_busy",
            BUSY_RETRY_AFTER,
        )

    def _wake(self, started: list[router.Ticket]) -> None:
        for ticket in started:
            turn = self._waiters.get(ticket)
            if turn is not None and not turn.done():
                turn.set_result(None)

    def _count_waiting(self, tenant: str) -> None:
        waiting = sum(queue.waiting(tenant) for queue in self._queues.values())
        self.metrics.queued.labels(tenant).set(waiting)


def _ended(watcher: asyncio.Future[None]) -> bool:
    """Whether the disconnect watcher finished (a receive that failed counts as gone)."""
    if not watcher.done() or watcher.cancelled():
        return False
    watcher.exception()  # retrieved, so asyncio does not log it as never retrieved
    return True


async def _disconnect(receive: Receive) -> None:
    """Return when the client disconnects (its body was read already: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass
