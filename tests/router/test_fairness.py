"""Deficit round robin across tenants, per-tenant in-flight budgets and the pool's capacity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import FairQueue, Ticket
from router.fairness import PRIORITY_LEVELS


def join(queue: FairQueue, tenant: str, cost: int, budget: int | None = None) -> Ticket:
    ticket, _ = queue.join(tenant, cost, budget)
    return ticket


def test_an_idle_pool_starts_a_request_at_once() -> None:
    queue = FairQueue(capacity=1000, quantum=100)
    ticket, started = queue.join("a", 300, None)
    assert ticket.started and started == [ticket]
    assert queue.in_flight == 300 and queue.in_flight_of("a") == 300


def test_a_tenant_over_its_budget_waits_behind_its_own_requests_only() -> None:
    queue = FairQueue(capacity=10_000, quantum=100)
    first = join(queue, "flood", 600, budget=1000)
    second = join(queue, "flood", 600, budget=1000)
    quiet = join(queue, "quiet", 50, budget=1000)
    assert first.started and not second.started
    assert quiet.started  # not behind the flood's waiting request
    assert queue.over_budget(second) and queue.waiting("flood") == 1
    assert queue.leave(first) == [second]
    assert queue.in_flight_of("flood") == 600


def test_a_request_larger_than_its_budget_runs_alone() -> None:
    queue = FairQueue(capacity=10_000, quantum=100)
    big = join(queue, "a", 5000, budget=1000)
    small = join(queue, "a", 10, budget=1000)
    assert big.started and not small.started
    assert queue.leave(big) == [small]


def test_a_request_larger_than_the_pool_runs_when_the_pool_is_empty() -> None:
    queue = FairQueue(capacity=1000, quantum=100)
    running = join(queue, "a", 10)
    big = join(queue, "b", 5000)
    assert not big.started and not queue.over_budget(big)
    assert queue.leave(running) == [big]


def test_when_the_pool_is_full_tenants_start_equal_tokens_in_turn() -> None:
    queue = FairQueue(capacity=1000, quantum=1000)
    blocker = join(queue, "blocker", 1000)
    heavy = [join(queue, "heavy", 500) for _ in range(8)]
    light = [join(queue, "light", 100) for _ in range(40)]
    assert not any(t.started for t in heavy + light)
    queue.leave(blocker)
    order: list[Ticket] = []
    while queue.waiting():
        running = [t for t in heavy + light if t.started and not t.left]
        for ticket in running:
            queue.leave(ticket)
        order += [t for t in heavy + light if t.started and t not in order]
    tokens = {"heavy": 0, "light": 0}
    for ticket in order[:24]:  # 4 heavy (2,000 tokens) and 20 light (2,000 tokens) first
        tokens[ticket.tenant] += ticket.cost
    assert tokens == {"heavy": 2000, "light": 2000}


def test_a_waiting_request_that_leaves_frees_its_place_and_its_turn() -> None:
    queue = FairQueue(capacity=100, quantum=100)
    running = join(queue, "a", 100)
    gone = join(queue, "b", 100)
    after = join(queue, "c", 100)
    assert queue.leave(gone) == []  # b's turn was first; it withdrew while waiting
    assert queue.waiting() == 1 and queue.waiting("b") == 0
    assert queue.leave(running) == [after]


def test_leaving_twice_frees_once() -> None:
    queue = FairQueue(capacity=100, quantum=100)
    first = join(queue, "a", 100)
    second = join(queue, "b", 100)
    assert queue.leave(first) == [second]
    assert queue.leave(first) == []
    assert queue.in_flight == 100


def test_a_pool_that_grows_starts_who_now_fits() -> None:
    queue = FairQueue(capacity=100, quantum=100)
    join(queue, "a", 100)
    waiting = join(queue, "b", 100)
    assert queue.resize(200) == [waiting]


def test_a_pool_that_shrinks_keeps_what_runs_and_holds_new_requests() -> None:
    queue = FairQueue(capacity=200, quantum=100)
    running = [join(queue, "a", 100), join(queue, "b", 100)]
    assert queue.resize(50) == []
    assert all(t.started for t in running)
    assert not join(queue, "c", 10).started


def test_a_new_budget_applies_to_the_tenants_waiting_requests() -> None:
    queue = FairQueue(capacity=10_000, quantum=100)
    join(queue, "a", 500, budget=600)
    waiting = join(queue, "a", 500, budget=600)
    assert not waiting.started
    wider = join(queue, "a", 10, budget=2000)  # the tenant's limit was raised meanwhile
    assert waiting.started and wider.started


def test_an_idle_tenant_is_forgotten() -> None:
    queue = FairQueue(capacity=100, quantum=100)
    ticket = join(queue, "a", 10)
    queue.leave(ticket)
    assert queue.in_flight == 0 and queue._tenants == {}


def test_a_tenant_over_its_prompt_budget_waits_though_its_tokens_fit() -> None:
    queue = FairQueue(capacity=10_000, quantum=100, prompt_capacity=5000)
    first, _ = queue.join("flood", 1500, 5000, prompt=1400, prompt_budget=2000)
    second, _ = queue.join("flood", 1500, 5000, prompt=1400, prompt_budget=2000)
    chat, _ = queue.join("flood", 600, 5000, prompt=50, prompt_budget=2000)
    assert first.started and not second.started  # 2,800 prompt tokens would pass 2,000
    assert not chat.started  # behind its own tenant's waiting request, in order
    assert queue.over_budget(second) and queue.in_flight_prompt_of("flood") == 1400
    quiet, _ = queue.join("quiet", 1500, 5000, prompt=1400, prompt_budget=2000)
    assert quiet.started and queue.in_flight_prompt == 2800
    assert queue.leave(first) == [second, chat]


def test_the_pool_holds_prompts_back_past_its_prompt_capacity() -> None:
    queue = FairQueue(capacity=10_000, quantum=2000, prompt_capacity=2000)
    running = [join(queue, tenant, 1000) for tenant in "ab"]  # no prompts: tokens only
    long_prompt, _ = queue.join("c", 1500, None, prompt=1500)
    assert long_prompt.started  # alone: nothing held prompt tokens
    more, _ = queue.join("d", 1000, None, prompt=600)
    decode, _ = queue.join("e", 1000, None, prompt=0)
    assert not more.started and not decode.started  # the pool's turn is the prompt's
    assert queue.leave(long_prompt) == [more, decode]
    assert [t.started for t in running] == [True, True]
    assert queue.join("f", 1000, None, prompt=5000)[0].prompt == 1000  # within its cost


def test_priority_is_the_share_of_the_pool_the_tenants_other_requests_hold() -> None:
    queue = FairQueue(capacity=1000, quantum=100)
    first = join(queue, "flood", 400)
    assert queue.priority(first) == 0  # nothing else of its tenant's in flight
    second = join(queue, "flood", 400)
    quiet = join(queue, "quiet", 10)
    assert queue.priority(second) == 40 and queue.priority(quiet) == 0
    queue.leave(first)
    assert queue.priority(second) == 0


def test_priority_stays_within_its_levels_past_the_pool() -> None:
    queue = FairQueue(capacity=1000, quantum=100)
    join(queue, "a", 900)
    after = join(queue, "a", 100)
    queue.resize(100)  # replicas left: the tenant holds nine pools' worth
    assert after.started and queue.priority(after) == PRIORITY_LEVELS


def test_quantum_must_be_positive() -> None:
    with pytest.raises(ValueError, match="quantum"):
        FairQueue(capacity=100, quantum=0)


def within(running: list[Ticket], tokens: int | None, prompt: int | None) -> bool:
    """Whether ``running`` keeps within both bounds, but for one request that started alone."""
    prompting = [t for t in running if t.prompt]
    return (tokens is None or len(running) <= 1 or sum(t.cost for t in running) <= tokens) and (
        prompt is None or len(prompting) <= 1 or sum(t.prompt for t in prompting) <= prompt
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from("abc"),
            st.integers(min_value=1, max_value=400),
            st.integers(min_value=0, max_value=100),
            st.booleans(),
        ),
        max_size=60,
    ),
    st.integers(min_value=0, max_value=1000),
)
def test_bounds_hold_and_everything_ends(
    steps: list[tuple[str, int, int, bool]], capacity: int
) -> None:
    """Random joins and leaves: no bound is passed (but by a request alone), every waiting
    request starts once those before it finish, and nothing is left holding tokens."""
    queue = FairQueue(capacity=capacity, quantum=200, prompt_capacity=capacity // 2)
    tickets: list[Ticket] = []
    budgets = {"a": (None, None), "b": (150, 100), "c": (600, 200)}
    for tenant, cost, percent, leave_one in steps:
        budget, prompt_budget = budgets[tenant]
        prompt = cost * percent // 100
        tickets.append(queue.join(tenant, cost, budget, prompt, prompt_budget)[0])
        if leave_one:
            queue.leave(tickets[len(tickets) // 3])
        running = [t for t in tickets if t.started and not t.left]
        assert queue.in_flight == sum(t.cost for t in running)
        assert queue.in_flight_prompt == sum(t.prompt for t in running)
        assert within(running, capacity, capacity // 2)
        for name, (limit, prompt_limit) in budgets.items():
            assert within([t for t in running if t.tenant == name], limit, prompt_limit)
    while running := [t for t in tickets if t.started and not t.left]:
        for ticket in running:  # each finishes; whoever waited starts in its place
            queue.leave(ticket)
    assert all(t.left for t in tickets)  # everyone started and finished, or withdrew
    assert queue.in_flight == 0 and queue.waiting() == 0 and queue._tenants == {}
