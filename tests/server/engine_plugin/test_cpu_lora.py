"""vLLM's own CPU LoRA ops, with and without the fix: a token without an adapter (index -1)
must get no LoRA delta, even when the last adapter slot is occupied."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest
import torch

from server.engine_plugin import cpu_lora

SLOTS, HIDDEN, RANK, OUT = 3, 8, 4, 6


@pytest.fixture
def ops() -> Iterator[object]:
    """vLLM's ops module, restored after the test (the fix patches it in place)."""
    modules = [importlib.import_module(name) for name in cpu_lora.MODULES]
    saved = [{name: getattr(m, name) for name in cpu_lora.OPS if hasattr(m, name)} for m in modules]
    for module, names in zip(modules, saved, strict=True):  # vLLM's own, if installed before
        for name, op in names.items():
            setattr(module, name, getattr(op, "__wrapped__", op))
    yield modules[0]
    for module, names in zip(modules, saved, strict=True):
        for name, op in names.items():
            setattr(module, name, op)


def _shrink_then_expand(ops: object, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """One LoRA layer's delta as PunicaWrapperCPU computes it: shrink by A, expand by B."""
    torch.manual_seed(0)
    lora_a = torch.randn(SLOTS, 1, RANK, HIDDEN)  # every slot occupied, the last one too
    lora_b = torch.randn(SLOTS, 1, OUT, RANK)
    buffer = torch.zeros(x.shape[0], RANK)
    ops.bgmv_shrink(x, lora_a, buffer, indices, 1.0)  # type: ignore[attr-defined]
    delta = torch.zeros(x.shape[0], OUT)
    ops.bgmv_expand(buffer, lora_b, delta, indices, True)  # type: ignore[attr-defined]
    return delta


def test_unfixed_ops_give_a_token_without_an_adapter_the_last_slots_weights(ops: object) -> None:
    x = torch.randn(4, HIDDEN)
    delta = _shrink_then_expand(ops, x, torch.tensor([0, -1, 2, -1]))
    assert delta[1].abs().sum() > 0  # the bug this module fixes (if vLLM fixed it, drop us)
    assert torch.allclose(delta[1], _shrink_then_expand(ops, x[1:2], torch.tensor([2]))[0])


def test_fixed_ops_give_a_token_without_an_adapter_no_delta_and_leave_the_rest(
    ops: object,
) -> None:
    x = torch.randn(4, HIDDEN)
    indices = torch.tensor([0, -1, 2, -1])
    before = _shrink_then_expand(ops, x, indices)
    assert cpu_lora.install() and cpu_lora.install()  # idempotent
    after = _shrink_then_expand(ops, x, indices)
    assert torch.equal(after[1], torch.zeros(OUT)) and torch.equal(after[3], torch.zeros(OUT))
    assert torch.allclose(after[[0, 2]], before[[0, 2]])  # tokens with adapters: unchanged
    punica = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu")
    assert punica.bgmv_expand is ops.bgmv_expand  # type: ignore[attr-defined]


def test_the_prefill_path_is_fixed_too(ops: object) -> None:
    cpu_lora.install()
    torch.manual_seed(1)
    x = torch.randn(5, HIDDEN)
    lora_a = torch.randn(SLOTS, 1, RANK, HIDDEN)
    out = torch.zeros(5, RANK)
    # Two sequences: 2 tokens of no adapter, then 3 of slot 1 (vLLM's prefill metadata).
    starts, lengths, indices = torch.tensor([0, 2]), torch.tensor([2, 3]), torch.tensor([-1, 1])
    ops.sgmv_shrink(x, lora_a, out, starts, lengths, indices, 2, 3, 5, 1.0)  # type: ignore[attr-defined]
    assert torch.equal(out[:2], torch.zeros(2, RANK)) and out[2:].abs().sum() > 0
