"""Composed adapters served by the real vLLM engine answer as PEFT's own composition does.

Two stock PEFT adapters of one tenant are composed through the REST route with each
method (linear, TIES, DARE-linear, DARE-TIES); each composed version, promoted and
served through the gateway, must give the greedy output (float32) of the base with
PEFT's ``add_weighted_adapter`` combination of the same two adapters active.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from registry import Registry
from tests.e2e.conftest import OPERATOR, TenantKeys, make_tenant
from tests.e2e.serving import ServeProcess
from tests.registry.registry_testdata import build_adapter, edit_tensors
from tests.training.peft_compose import peft_composed_model
from training.compose import METHODS, CompositionSpec, Parent

PROMPTS = ("The cat sat on the", "Once upon a time")
MAX_TOKENS = 10
WEIGHTS = {"left": 0.6, "right": 0.4}
RANK = 16
"""The parents' summed rank (8 + 8), under the engine's maximum: the default target."""


def spec_for(method: str) -> CompositionSpec:
    parents = [Parent(name, 1, weight) for name, weight in WEIGHTS.items()]
    if method == "linear":
        return CompositionSpec(parents, method)
    seed = 5 if method.startswith("dare") else None
    return CompositionSpec(parents, method, density=0.6, seed=seed)


def body_of(spec: CompositionSpec) -> dict[str, Any]:
    return {
        "parents": [{"adapter": p.adapter, "version": p.version, "weight": p.weight}
                    for p in spec.parents],
        "method": spec.method,
        "density": spec.density,
        "seed": spec.seed,
    }  # fmt: skip


def peft_answers(base: Path, parents: list[Path], spec: CompositionSpec | None) -> list[str]:
    """Greedy float32 answers of the base alone (``spec`` None) or with PEFT's composition."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model: Any
    if spec is None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    else:
        model = peft_composed_model(base, parents, spec, RANK)
    answers = []
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        answers.append(str(tokenizer.decode(new, skip_special_tokens=True)))
    return answers


@pytest.fixture(scope="module")
def composer(
    registry: Registry, demo_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TenantKeys, list[Path]]:
    """A tenant with adapters left and right (version 1 each): random LoRAs scaled up so
    the answers move away from the base's."""
    tenant = make_tenant(registry, "composer")
    paths = []
    for seed, (name, targets) in enumerate(
        [("left", ["q_proj", "v_proj", "o_proj"]), ("right", ["q_proj", "v_proj", "down_proj"])],
        start=60,
    ):
        path = build_adapter(
            demo_base, tmp_path_factory.mktemp(name) / name, seed=seed, target_modules=targets
        )
        edit_tensors(path, lambda tensors: {k: 3 * t for k, t in tensors.items()})
        registry.push_adapter(tenant.tenant_id, name, path, demo_base.name, OPERATOR)
        paths.append(path)
    return tenant, paths


def served_answers(gateway: ServeProcess, tenant: TenantKeys, model: str) -> list[str]:
    client = OpenAI(base_url=gateway.url + "/v1", api_key=tenant.key, max_retries=0, timeout=120)
    answers = []
    for prompt in PROMPTS:
        reply = client.completions.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        answers.append(reply.choices[0].text)
    return answers


@pytest.mark.parametrize("method", METHODS)
def test_the_served_composition_answers_as_peft_s_composition(
    method: str,
    gateway: ServeProcess,
    composer: tuple[TenantKeys, list[Path]],
    demo_base: Path,
) -> None:
    tenant, parents = composer
    spec = spec_for(method)
    headers = {"authorization": f"Bearer {tenant.key}"}
    name = f"mix-{method.replace('_', '-')}"
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=120) as rest:
        made = rest.post(f"/v1/adapters/{name}/compositions", json=body_of(spec))
        assert made.status_code == 201, made.text
        assert made.json()["rank"] == RANK
        promoted = rest.post(f"/v1/adapters/{name}/promote", json={"version": 1})
        assert promoted.status_code == 200, promoted.text
    expected = peft_answers(demo_base, parents, spec)
    assert expected != peft_answers(demo_base, parents, None), "composition changed nothing"
    assert served_answers(gateway, tenant, name) == expected
