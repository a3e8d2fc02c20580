"""A fix for vLLM's CPU LoRA kernels: tokens of requests without an adapter get no LoRA delta.

vLLM marks a token that belongs to no adapter with the LoRA index ``-1``. Its GPU
kernels skip such tokens; its PyTorch ops for the CPU (``vllm.lora.ops.torch_ops``,
used by ``PunicaWrapperCPU``) index the stacked weights with it, and ``weights[-1]``
is the *last* adapter slot. So a base-model request batched beside adapter requests,
once the last slot is occupied, is answered with another adapter's weights: another
tenant's adapter (found by the chaos soak; upstream vllm-project/vllm#48421, #49656,
open for vLLM 0.32).

The fix wraps the three ``bgmv_*`` ops (the ``sgmv_*`` ones call them): rows whose
index is negative enter with zeroed inputs and a valid index, so their product is
zero, which is exactly "no adapter". Batches where every token has an adapter take
the original path unchanged. Installed once per process, from the plugin's entry point
(vLLM loads it in the API server, the engine core and every worker).
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
MODULES = (
    "vllm.lora.ops.torch_ops.lora_ops",  # the sgmv_* ops there call bgmv_* by module global
    "vllm.lora.ops.torch_ops",
    "vllm.lora.punica_wrapper.punica_cpu",  # imported the names before we could wrap them
)
_MARK = "_loraplex_masks_no_adapter"


def masking_no_adapter(op: Callable[..., Any]) -> Callable[..., Any]:
    """``op(inputs, weights, output, lora_indices, ...)`` with negative indices meaning none."""

    @functools.wraps(op)
    def masked(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kw: Any) -> Any:
        without = indices < 0
        if not bool(without.any()):
            return op(inputs, weights, output, indices, *args, **kw)
        kept = inputs.masked_fill(without.unsqueeze(-1), 0)
        return op(kept, weights, output, indices.clamp(min=0), *args, **kw)

    setattr(masked, _MARK, True)
    return masked


def install() -> bool:
    """Wrap the CPU ops wherever vLLM holds them; False outside vLLM (nothing imported then)
    or if this vLLM has none to wrap."""
    if "vllm" not in sys.modules:
        return False  # not loaded by vLLM: importing it here would cost every CLI start
    try:
        modules = [importlib.import_module(name) for name in MODULES]
    except ImportError:
        return False
    wrapped = {name: getattr(modules[0], name) for name in OPS}
    if all(getattr(op, _MARK, False) for op in wrapped.values()):
        return True  # already installed in this process
    fixed = {name: masking_no_adapter(op) for name, op in wrapped.items()}
    for module in modules:
        for name, op in fixed.items():
            if hasattr(module, name):
                setattr(module, name, op)
    log.info("loraplex: vLLM's CPU LoRA ops now skip tokens without an adapter")
    return True
