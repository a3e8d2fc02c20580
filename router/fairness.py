"""Fair queueing across tenants in front of a pool of engine replicas: deficit round robin.

vLLM serves what it is sent first come, first served, and the gateway cannot take
back a prompt the engine has started on. So a tenant flooding long prompts puts all
of them in front of everyone else's, unless the gateway holds them. ``FairQueue``
decides which requests go to the engines now and which wait, and in what order
waiting ones start. A request costs its tokens (prompt + max completion), of which
its prompt tokens (what the engine must prefill, the work that fills its steps); two
bounds, each on both counts, hold it back:

- its tenant's **in-flight budget**: the tokens (and prompt tokens) of that tenant's
  started, unfinished requests. A tenant over its budget waits behind its own
  requests and is skipped in the rotation, so it never delays anyone else;
- the pool's **capacity**: the tokens (and prompt tokens) of every tenant's started
  requests. When the pool is full, waiting requests start in deficit-round-robin
  order as it frees:
  each tenant's turn adds ``quantum`` tokens to its deficit, and the tenant starts
  requests while their cost fits the deficit. Over time every backlogged tenant
  starts the same number of tokens, however large or many its requests are.

A request costing more than a bound on its own starts when nothing else holds that
bound (alone), so no request waits forever. The pool waits for the request whose
turn it is rather than letting smaller ones pass, so large requests are never
starved either.

Once started, a request also carries a ``priority`` for the engine's own scheduler
(vLLM's ``--scheduling-policy priority``: lower runs first): the share of the pool its
tenant's other started requests hold. The engine's waiting queue is then ordered as the
rotation would order it, a tenant with nothing in flight ahead of one flooding.

Pure and single-threaded, like ``router.limits``: no clock (the caller times waits
out) and no locks (one asyncio loop; no call awaits).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

PRIORITY_LEVELS = 100
"""Engine priorities run from 0 (the tenant holds nothing else) to this (it holds the pool)."""


@dataclass(slots=True, eq=False)  # eq=False: a ticket is itself, hashed by identity
class Ticket:
    """One request at the queue: waiting until ``started``; hand it to ``FairQueue.leave``
    exactly once when it ends, whatever happened (started or not)."""

    tenant: str
    cost: int
    """Tokens it holds once started: prompt (estimated) + max completion."""
    prompt: int = 0
    """Of those, the prompt's (estimated): what the engine must prefill."""
    started: bool = False
    left: bool = False


def _fits(held: int, extra: int, bound: int | None) -> bool:
    """Whether ``extra`` more fits beside ``held`` under ``bound`` (None: no bound); alone
    (nothing held) anything fits."""
    return bound is None or held == 0 or held + extra <= bound


class _Tenant:
    __slots__ = ("budget", "deficit", "in_flight", "in_flight_prompt", "prompt_budget", "waiting")

    def __init__(self) -> None:
        self.budget: int | None = None
        self.prompt_budget: int | None = None
        self.deficit = 0
        self.in_flight = 0
        self.in_flight_prompt = 0
        self.waiting: deque[Ticket] = deque()

    def within_budget(self, ticket: Ticket) -> bool:
        return _fits(self.in_flight, ticket.cost, self.budget) and _fits(
            self.in_flight_prompt, ticket.prompt, self.prompt_budget
        )


class FairQueue:
    """Which requests of which tenants run now, on one pool of replicas."""

    def __init__(self, capacity: int, quantum: int, prompt_capacity: int | None = None) -> None:
        if quantum < 1:
            raise ValueError(f"quantum={quantum} must be at least 1 token")
        self.capacity = max(0, capacity)
        """Tokens the pool's started requests may hold together."""
        self.prompt_capacity = prompt_capacity
        """Prompt tokens they may hold together (None: no bound)."""
        self.quantum = quantum
        """Tokens a tenant's turn adds to its deficit; at least one request's usual cost."""
        self.in_flight = 0
        """Tokens of every started, unfinished request."""
        self.in_flight_prompt = 0
        """Prompt tokens of every started, unfinished request."""
        self._tenants: dict[str, _Tenant] = {}
        self._turns: deque[str] = deque()
        """Tenants with waiting requests, the one whose turn it is first."""
        self._turn_open = False
        """Whether the first tenant in ``_turns`` has had this turn's quantum already."""

    def join(
        self,
        tenant: str,
        cost: int,
        budget: int | None,
        prompt: int = 0,
        prompt_budget: int | None = None,
    ) -> tuple[Ticket, list[Ticket]]:
        """A new request of ``tenant`` costing ``cost`` tokens, ``prompt`` of them its
        prompt's, under its tenant's current in-flight ``budget`` and ``prompt_budget``
        (None: unbounded); (its ticket, every ticket this started, it included if it may
        go now)."""
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant()
        state.budget, state.prompt_budget = budget, prompt_budget
        ticket = Ticket(tenant, cost, min(prompt, cost))
        if not state.waiting:
            self._turns.append(tenant)
        state.waiting.append(ticket)
        return ticket, self._start_turns()

    def leave(self, ticket: Ticket) -> list[Ticket]:
        """A request ended (finished, failed, timed out or abandoned, started or still
        waiting): what it held is freed. Returns the tickets that start now in its place."""
        if ticket.left:
            return []
        ticket.left = True
        state = self._tenants[ticket.tenant]
        if ticket.started:
            state.in_flight -= ticket.cost
            self.in_flight -= ticket.cost
            state.in_flight_prompt -= ticket.prompt
            self.in_flight_prompt -= ticket.prompt
        else:
            self._withdraw(ticket, state)
        if not state.waiting and state.in_flight == 0:
            del self._tenants[ticket.tenant]  # an idle tenant costs no memory
        return self._start_turns()

    def resize(self, capacity: int, prompt_capacity: int | None = None) -> list[Ticket]:
        """Replicas came or went: the pool holds ``capacity`` tokens (``prompt_capacity``
        prompt tokens) now; the tickets that start because it grew."""
        self.capacity = max(0, capacity)
        self.prompt_capacity = prompt_capacity
        return self._start_turns()

    def waiting(self, tenant: str | None = None) -> int:
        """Requests waiting: of ``tenant``, or of everyone."""
        if tenant is not None:
            state = self._tenants.get(tenant)
            return 0 if state is None else len(state.waiting)
        return sum(len(self._tenants[t].waiting) for t in self._turns)

    def in_flight_of(self, tenant: str) -> int:
        """Tokens ``tenant``'s started, unfinished requests hold."""
        state = self._tenants.get(tenant)
        return 0 if state is None else state.in_flight

    def in_flight_prompt_of(self, tenant: str) -> int:
        """Prompt tokens ``tenant``'s started, unfinished requests hold."""
        state = self._tenants.get(tenant)
        return 0 if state is None else state.in_flight_prompt

    def priority(self, ticket: Ticket) -> int:
        """The engine priority of a started ``ticket`` (lower is scheduled first): the
        percentage of the pool's capacity its tenant's other started requests hold."""
        others = self.in_flight_of(ticket.tenant) - (ticket.cost if ticket.started else 0)
        return min(PRIORITY_LEVELS, max(0, others) * PRIORITY_LEVELS // max(1, self.capacity))

    def over_budget(self, ticket: Ticket) -> bool:
        """Whether a waiting ticket waits for its own tenant's requests (not for the pool)."""
        return not self._tenants[ticket.tenant].within_budget(ticket)

    def _withdraw(self, ticket: Ticket, state: _Tenant) -> None:
        state.waiting.remove(ticket)
        if state.waiting:
            return
        if self._turns[0] == ticket.tenant:
            self._end_turn(state, rotate=False)
        else:
            self._turns.remove(ticket.tenant)
            state.deficit = 0

    def _start_turns(self) -> list[Ticket]:
        """Start waiting requests in turn until the pool is full or every tenant waits on
        its own budget."""
        started: list[Ticket] = []
        skipped = 0
        while self._turns and skipped < len(self._turns):
            state = self._tenants[self._turns[0]]
            head = state.waiting[0]
            if not state.within_budget(head):
                self._end_turn(state, rotate=True)
                skipped += 1  # keeps its deficit: the budget, not the turn, held it back
                continue
            if not self._fits_pool(head):
                break  # the pool waits for this request: its turn is kept
            if not self._turn_open:
                state.deficit += self.quantum
                self._turn_open = True
            if head.cost > state.deficit:
                self._end_turn(state, rotate=True)
                skipped = 0
                continue
            state.waiting.popleft()
            state.deficit -= head.cost
            self._start(head, state)
            started.append(head)
            skipped = 0
            if not state.waiting:
                self._end_turn(state, rotate=False)
        return started

    def _fits_pool(self, ticket: Ticket) -> bool:
        return _fits(self.in_flight, ticket.cost, self.capacity) and _fits(
            self.in_flight_prompt, ticket.prompt, self.prompt_capacity
        )

    def _start(self, ticket: Ticket, state: _Tenant) -> None:
        ticket.started = True
        state.in_flight += ticket.cost
        self.in_flight += ticket.cost
        state.in_flight_prompt += ticket.prompt
        self.in_flight_prompt += ticket.prompt

    def _end_turn(self, state: _Tenant, rotate: bool) -> None:
        """The first tenant's turn ends: to the back of the rotation, or out of it (nothing
        left waiting: DRR forgets an idle tenant's deficit)."""
        tenant = self._turns.popleft()
        self._turn_open = False
        if rotate:
            self._turns.append(tenant)
        else:
            state.deficit = 0
