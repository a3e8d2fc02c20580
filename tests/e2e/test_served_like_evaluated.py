"""A trained adapter answers the same through vLLM serving as in the evaluator (issue 17).

The evaluator's exact-match numbers only mean something if the served adapter gives
the answers it scored: same chat rendering (bos, generation prompt), same stop tokens,
same greedy decoding, same token budget. The adapter is trained here, on the demo base
and the ``persona`` demo task, so its answers are the partly learned, varied kind a real
candidate gives (one even runs to the budget), not a random LoRA's noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI

from registry import Registry
from tests.e2e.conftest import OPERATOR, make_tenant
from tests.e2e.serving import ServeProcess
from training.config import TrainConfig
from training.data import Example
from training.demo_data import demo_jsonl
from training.evaluate import BASE, CANDIDATE, Evaluator, new_token_budget
from training.pipeline import RunSpec, prepare
from training.recipe import LoRARecipe
from training.render import tokenize_text

PROMPTS = 12
ADAPTER = "pirate"
# Few steps at a high rate: about 40 s of CPU, and the answers turn pirate (measured:
# all 12 differ from the base's) without all being the reference line.
QUICK = TrainConfig(
    learning_rate=5e-3,
    epochs=1,
    max_steps=30,
    batch_size=8,
    eval_every=30,
    max_length=64,
    num_threads=2,
    seed=3,
)


@dataclass(frozen=True)
class Evaluated:
    adapter_dir: Path
    examples: list[Example]
    candidate: list[str]
    """The evaluator's greedy answers of the trained adapter, in prompt order."""
    base: list[str]
    prompt_tokens: list[int]
    """Length of each prompt as the evaluator tokenizes it."""
    max_tokens: int
    """The evaluator's generation budget for these prompts."""


@pytest.fixture(scope="module")
def evaluated(demo_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Evaluated:
    prepared = prepare(RunSpec(demo_base, demo_jsonl("persona"), QUICK))
    recipe = LoRARecipe(QUICK, demo_base)
    recipe.setup(prepared.splits["train"], prepared.splits["validation"])
    recipe.train()
    adapter_dir = recipe.save(tmp_path_factory.mktemp("trained") / ADAPTER)
    del recipe  # frees the training copy of the base before the evaluator loads one
    examples = prepared.splits["test"][:PROMPTS]
    assert len(examples) == PROMPTS, "the persona test split shrank; lower PROMPTS"
    # One generation batch (the evaluator's budget is per batch), so one budget for all.
    evaluator = Evaluator(demo_base, examples, QUICK.max_length)
    evaluator.add_adapter(CANDIDATE, adapter_dir)
    tokenizer = evaluator.tokenizer
    return Evaluated(
        adapter_dir,
        examples,
        evaluator.answers(CANDIDATE),
        evaluator.answers(BASE),
        [len(tokenize_text(tokenizer, t.prompt_text, first=True)) for t in evaluator.turns],
        new_token_budget(tokenizer, evaluator.turns),
    )


def ask(client: OpenAI, model: str, evaluated: Evaluated) -> list[tuple[str, int]]:
    """The served answers (and prompt lengths) to the evaluated prompts, one chat each."""
    out = []
    for example in evaluated.examples:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": example.data["prompt"]}],
            temperature=0,
            max_tokens=evaluated.max_tokens,
        )
        assert reply.usage is not None
        out.append((reply.choices[0].message.content or "", reply.usage.prompt_tokens))
    return out


def assert_same(served: list[tuple[str, int]], evaluated: Evaluated, expected: list[str]) -> None:
    lengths = [tokens for _, tokens in served]
    # A second bos or a different template would show here before in the answers.
    assert lengths == evaluated.prompt_tokens, "the engine rendered the prompts differently"
    mismatches = [
        (example.data["prompt"], got, want)
        for example, (got, _), want in zip(evaluated.examples, served, expected, strict=True)
        if got.strip() != want.strip()
    ]
    assert not mismatches, f"served != evaluated (prompt, served, evaluator): {mismatches}"


def test_the_served_adapter_gives_the_evaluators_answers(
    gateway: ServeProcess, registry: Registry, base_name: str, evaluated: Evaluated
) -> None:
    pairs = zip(evaluated.candidate, evaluated.base, strict=True)
    changed = sum(c.strip() != b.strip() for c, b in pairs)
    assert changed >= PROMPTS // 2, "training barely changed the answers; the test would be weak"
    tenant = make_tenant(registry, "evaluated")
    version = registry.push_adapter(
        tenant.tenant_id, ADAPTER, evaluated.adapter_dir, base_name, OPERATOR
    )
    registry.promote(tenant.tenant_id, ADAPTER, version.number, OPERATOR)
    client = OpenAI(base_url=gateway.url + "/v1", api_key=tenant.key, max_retries=0, timeout=120)
    assert_same(ask(client, ADAPTER, evaluated), evaluated, evaluated.candidate)
    # The base through the same gateway too: a mismatch above is then the adapter's.
    assert_same(ask(client, base_name, evaluated), evaluated, evaluated.base)
