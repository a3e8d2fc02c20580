"""Adapter composition: a new version from several of a tenant's versions on one base.

The combined weight change of each module is PEFT's (``peft.utils.merge_utils``, the
functions ``LoraModel.add_weighted_adapter`` calls) applied to the parents' deltas
``B @ A * scaling``, then factored again by SVD to the target rank, as PEFT's
``*_svd`` combination types do:

- ``linear``: the weighted sum of the deltas (PEFT's ``svd``; exact while the target
  rank is at least the sum of the parents' ranks; its SVD is taken on the factors,
  ``refactor_sum``, never on a dense delta). PEFT's own ``linear`` sums the A
  and the B factors separately, which is not the weighted sum of the deltas (its
  cross terms ``B_i A_j`` remain), so it is not offered;
- ``ties``: TIES (trim to ``density`` by magnitude, elect signs, disjoint merge;
  PEFT's ``ties_svd``);
- ``dare_linear`` / ``dare_ties``: DARE's random drop (keep ``density``, rescale) then
  the sum or TIES (PEFT's ``dare_linear_svd`` / ``dare_ties_svd``).

Everything is computed from the parents' stored files alone (no base weights), so the
REST API and the CLI compose without loading a model. DARE's drop draws from torch's
generator seeded per module from the spec's seed and the module's path
(``module_seed``): the result depends on nothing but the spec and the parents, not on
the order modules are visited or on the process's random state (which is left as it
was). The result is a stock PEFT adapter (``r = lora_alpha = target rank``, so its
scaling is 1), pushed through ``Registry.push_adapter`` like any upload: validated,
content-addressed, and then evaluated and gated like any other version.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file

from registry import (
    Actor,
    AdapterVersion,
    InvalidRequest,
    NotFound,
    Provenance,
    Registry,
)
from registry.adapter_names import check_adapter_name
from registry.archive import CONFIG_FILE, WEIGHTS_FILE
from registry.bundle import unpack_bundle
from registry.models import RETIRED

METHODS: tuple[str, ...] = ("linear", "ties", "dare_linear", "dare_ties")
PEFT_COMBINATION: dict[str, str] = {
    "linear": "svd",
    "ties": "ties_svd",
    "dare_linear": "dare_linear_svd",
    "dare_ties": "dare_ties_svd",
}
"""The ``add_weighted_adapter`` combination type each method computes exactly."""
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("ties", "dare_ties")
RANDOM_METHODS = ("dare_linear", "dare_ties")
MAJORITY_SIGN_METHODS = ("total", "frequency")
MAX_PARENTS = 16
"""More would be a slow request (one SVD per module and parent count) for no known use."""

# PEFT's tensor names, as registry.validation reads them.
_TENSOR_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass(frozen=True)
class Parent:
    """One version composed in, and its weight."""

    adapter: str
    """The tenant's adapter name."""
    version: int
    """Its version number."""
    weight: float
    """Factor of its delta (negative subtracts it)."""

    @property
    def ref(self) -> str:
        return f"{self.adapter}@{self.version}"


@dataclass(frozen=True)
class CompositionSpec:
    """How to combine the parents; ``problems`` says what is wrong with it."""

    parents: list[Parent]
    """Two or more distinct versions, in the order their deltas are combined."""
    method: str = "linear"
    """``linear``, ``ties``, ``dare_linear`` or ``dare_ties``."""
    density: float | None = None
    """Share of each delta's entries kept, in (0, 1]: required by ties and DARE only."""
    seed: int | None = None
    """DARE's random drop (0 when not given); only for ``dare_*``."""
    target_rank: int | None = None
    """Rank of the result; default the parents' summed rank capped at the serving rank."""
    majority_sign_method: str | None = None
    """TIES sign election, ``total`` (default) or ``frequency``; only for ``*ties``."""

    def problems(self, max_rank: int) -> list[str]:
        """Everything wrong with the spec itself, without looking at the parents."""
        found = self._parent_problems()
        if self.method not in METHODS:
            found.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        found += self._parameter_problems()
        rank = self.target_rank
        if rank is not None and (isinstance(rank, bool) or not 1 <= rank <= max_rank):
            found.append(f"target_rank {rank!r} must be between 1 and the serving rank {max_rank}")
        return found

    def _parent_problems(self) -> list[str]:
        found = []
        if not 2 <= len(self.parents) <= MAX_PARENTS:
            found.append(f"give 2 to {MAX_PARENTS} parents, not {len(self.parents)}")
        refs = [p.ref for p in self.parents]
        for ref in sorted({r for r in refs if refs.count(r) > 1}):
            found.append(f"parent {ref} is listed more than once; give each version once")
        for p in self.parents:
            if not math.isfinite(p.weight):
                found.append(f"parent {p.ref}: weight {p.weight} is not a finite number")
        return found

    def _parameter_problems(self) -> list[str]:
        found = []
        if self.method in DENSITY_METHODS:
            if self.density is None:
                found.append(f"method {self.method} needs a density in (0, 1]")
            elif not 0 < self.density <= 1:
                found.append(f"density {self.density} must be in (0, 1] (the share kept)")
        elif self.density is not None:
            found.append(f"density is used only by {', '.join(DENSITY_METHODS)}")
        if self.seed is not None and self.method not in RANDOM_METHODS:
            found.append(f"seed is used only by {', '.join(RANDOM_METHODS)}")
        sign = self.majority_sign_method
        if sign is not None and self.method not in SIGN_METHODS:
            found.append(f"majority_sign_method is used only by {', '.join(SIGN_METHODS)}")
        elif sign is not None and sign not in MAJORITY_SIGN_METHODS:
            found.append(
                f"majority_sign_method {sign!r} is not one of {', '.join(MAJORITY_SIGN_METHODS)}"
            )
        return found

    @property
    def sign_method(self) -> str:
        return self.majority_sign_method or "total"

    @property
    def drop_seed(self) -> int:
        return self.seed if self.seed is not None else 0


class CompositionRejected(InvalidRequest):
    """A composition was refused; ``problems`` lists every reason, and nothing was stored."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"composition rejected ({len(self.problems)} problem(s)); fix these and retry:\n{lines}"
        )


@dataclass
class LoadedAdapter:
    """A PEFT adapter's config and tensors, in memory."""

    config: dict[str, Any]
    """Its ``adapter_config.json``."""
    tensors: dict[str, torch.Tensor] = field(repr=False)
    """Its ``adapter_model.safetensors``, by tensor name."""

    @classmethod
    def load(cls, directory: Path) -> LoadedAdapter:
        config = json.loads((directory / CONFIG_FILE).read_text())
        return cls(config, load_file(directory / WEIGHTS_FILE))

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True))
        save_file(self.tensors, directory / WEIGHTS_FILE)
        return directory

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module path -> (lora_A, lora_B)."""
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in self.tensors.items():
            match = _TENSOR_NAME.match(name)
            if match is not None:
                parts.setdefault(match["module"], {})[match["part"]] = tensor
        return {m: (p["A"], p["B"]) for m, p in parts.items() if p.keys() == {"A", "B"}}

    def scaling(self, module: str, rank: int) -> float:
        """PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) for ``module``."""
        patterns = self.config.get("alpha_pattern") or {}
        alpha = float(_pattern_value(module, patterns, self.config.get("lora_alpha", 8)))
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules().values())


def _pattern_value(module: str, patterns: dict[str, Any], default: Any) -> Any:
    """PEFT's rank/alpha pattern rule: a key matches the path, a suffix or as a regex."""
    for key, value in patterns.items():
        if module == key or module.endswith(f".{key}") or re.fullmatch(key, module):
            return value
    return default


def module_seed(seed: int, module: str) -> int:
    """The seed of DARE's drop in ``module``: from the spec's seed and the module's path."""
    digest = hashlib.sha256(f"loraplex-dare\n{seed}\n{module}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def default_rank(parents: list[LoadedAdapter], max_rank: int) -> int:
    """The summed rank (a linear sum needs no more to be exact), capped at the serving rank."""
    return min(sum(p.rank() for p in parents), max_rank)


def merge_deltas(
    deltas: list[torch.Tensor], weights: list[float], spec: CompositionSpec, module: str
) -> torch.Tensor:
    """One module's combined delta, exactly as PEFT's ``add_weighted_adapter`` combines it."""
    factors = torch.tensor(weights).to(deltas[0].device)
    density = spec.density if spec.density is not None else 1.0
    if spec.method == "linear":
        return merge_utils.task_arithmetic(deltas, factors)
    if spec.method == "ties":
        return merge_utils.ties(deltas, factors, density, spec.sign_method)  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(module_seed(spec.drop_seed, module))
        if spec.method == "dare_linear":
            return merge_utils.dare_linear(deltas, factors, density)
        return merge_utils.dare_ties(deltas, factors, density, spec.sign_method)  # type: ignore[arg-type]


def _padded(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A and columns of B up to ``rank`` (a module smaller than the rank)."""
    if a.shape[0] < rank:
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
    return a.contiguous(), b.contiguous()


def refactor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank ``rank`` with ``B @ A`` the best rank-``rank`` approximation of
    ``delta``, factored as PEFT factors it: ``B = U S``, ``A = Vh``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return _padded(vh[:rank, :], u[:, :rank] @ torch.diag(s[:rank]), rank)


Term = tuple[float, float, torch.Tensor, torch.Tensor]
"""One parent's part in a module: its weight, its scaling, lora_A and lora_B (float32)."""


def refactor_sum(terms: list[Term], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``refactor`` of the weighted sum of the terms' deltas without forming it.

    The sum is ``B_cat @ A_cat`` (the B factors side by side, weighted and scaled, the A
    factors stacked); with ``B_cat = Qb Rb`` and ``A_cat^T = Qa Ra`` its SVD is that of
    the small ``Rb Ra^T`` turned by ``Qb`` and ``Qa``: the same singular values and
    vectors as the dense SVD PEFT takes, in O(d r^2) instead of O(d^3) a module.
    """
    b_cat = torch.cat([b * (weight * scale) for weight, scale, _, b in terms], dim=1)
    qb, rb = torch.linalg.qr(b_cat)
    qa, ra = torch.linalg.qr(torch.cat([a for _, _, a, _ in terms]).T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return _padded(vh[:rank, :] @ qa.T, qb @ u[:, :rank] @ torch.diag(s[:rank]), rank)


def _terms(
    parents: list[LoadedAdapter],
    tables: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
    weights: list[float],
    module: str,
) -> list[Term]:
    terms = []
    for parent, table, weight in zip(parents, tables, weights, strict=True):
        if module in table:  # as PEFT: a parent without the module adds nothing there
            a, b = (t.to(torch.float32) for t in table[module])
            terms.append((weight, parent.scaling(module, a.shape[0]), a, b))
    return terms


def combine(
    parents: list[LoadedAdapter], weights: list[float], spec: CompositionSpec, rank: int
) -> LoadedAdapter:
    """The composed adapter: every module any parent changes, combined and re-factored."""
    tables = [p.modules() for p in parents]
    dtypes = {t.dtype for p in parents for t in p.tensors.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    tensors: dict[str, torch.Tensor] = {}
    for module in sorted(set().union(*tables)):
        terms = _terms(parents, tables, weights, module)
        if spec.method == "linear":  # a sum of low-rank deltas: no dense SVD needed
            a, b = refactor_sum(terms, rank)
        else:  # pruning makes the combined delta dense: PEFT's full SVD of it
            deltas = [(b @ a) * scale for _, scale, a, b in terms]
            merged = merge_deltas(deltas, [w for w, *_ in terms], spec, module)
            a, b = refactor(merged, rank)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype)
    return LoadedAdapter(_composed_config(parents, tables, rank), tensors)


def _composed_config(
    parents: list[LoadedAdapter],
    tables: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
    rank: int,
) -> dict[str, Any]:
    """The first parent's config with the new rank, scaling 1 and the union of targets."""
    names = [p.config.get("target_modules") for p in parents]
    if all(isinstance(n, list) for n in names) and not any(
        p.config.get("layers_to_transform") for p in parents
    ):
        targets = sorted({str(t) for n in names for t in n or []})
    else:  # regex or layer-restricted targets: name exactly the modules that have weights
        targets = sorted(set().union(*tables))
    config = dict(parents[0].config)
    config.update(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=targets,
        layers_to_transform=None,
        layers_pattern=None,
    )
    return config


# -- against the registry ------------------------------------------------------------


@dataclass(frozen=True)
class _Resolved:
    parent: Parent
    version: AdapterVersion


def _resolve(
    registry: Registry, tenant_id: int, spec: CompositionSpec
) -> tuple[list[_Resolved], list[str]]:
    """The tenant's parent versions, and what is wrong with them (foreign = unknown)."""
    found, problems = [], []
    for parent in spec.parents:
        try:
            version = registry.get_version(tenant_id, parent.adapter, parent.version)
        except NotFound as exc:
            problems.append(f"parent {parent.ref}: {exc}")
            continue
        if version.state == RETIRED:
            problems.append(f"parent {parent.ref} is retired; compose from versions not retired")
        found.append(_Resolved(parent, version))
    bases = sorted({r.version.base_id for r in found})
    if len(bases) > 1:
        pins = ", ".join(f"{r.parent.ref} on base {r.version.base_id}" for r in found)
        problems.append(f"the parents are pinned to different bases ({pins}); use one base's")
    return found, problems


def _fetch(registry: Registry, version: AdapterVersion, dest: Path) -> LoadedAdapter:
    bundle = dest.with_suffix(".tar")
    registry.blobs.fetch(version.blob_key, version.blob_sha256, bundle)
    unpack_bundle(bundle, dest, version.blob_key)
    return LoadedAdapter.load(dest)


def composition_record(
    spec: CompositionSpec, resolved: list[_Resolved], rank: int
) -> dict[str, Any]:
    """What the new version's provenance says about how it was made."""
    return {
        "method": spec.method,
        "peft_combination_type": PEFT_COMBINATION[spec.method],
        "density": spec.density,
        "seed": spec.drop_seed if spec.method in RANDOM_METHODS else None,
        "majority_sign_method": spec.sign_method if spec.method in SIGN_METHODS else None,
        "target_rank": rank,
        "parents": [{**asdict(r.parent), "fingerprint": r.version.fingerprint} for r in resolved],
    }


def compose(
    registry: Registry,
    tenant_id: int,
    name: str,
    spec: CompositionSpec,
    actor: Actor,
    description: str | None = None,
) -> AdapterVersion:
    """Compose the tenant's parent versions into the next version of adapter ``name``.

    Every problem with the spec, the name and the parents is reported at once
    (``CompositionRejected``) before anything is fetched or written.
    """
    problems = spec.problems(registry.limits.max_rank)
    try:
        check_adapter_name(name)
    except InvalidRequest as exc:
        problems.append(str(exc))
    resolved, parent_problems = _resolve(registry, tenant_id, spec)
    if problems or parent_problems:
        raise CompositionRejected(problems + parent_problems)
    base = next(b for b in registry.list_bases() if b.id == resolved[0].version.base_id)
    with tempfile.TemporaryDirectory(prefix="loraplex-compose-") as tmp:
        loaded = [
            _fetch(registry, r.version, Path(tmp) / f"parent-{i}") for i, r in enumerate(resolved)
        ]
        rank = spec.target_rank or default_rank(loaded, registry.limits.max_rank)
        composed = combine(loaded, [p.weight for p in spec.parents], spec, rank)
        out = composed.save(Path(tmp) / "composed")
        provenance = Provenance(composition=composition_record(spec, resolved, rank))
        return registry.push_adapter(
            tenant_id, name, out, base.fingerprint, actor, provenance, description
        )
