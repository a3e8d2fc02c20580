"""The rendered Kubernetes fleets, shared by the manifest tests."""

from __future__ import annotations

import pytest
from deploy_paths import K8S, OVERLAYS
from manifests import Obj, render


@pytest.fixture(scope="module", params=OVERLAYS)
def fleet(request: pytest.FixtureRequest) -> list[Obj]:
    """Every object one overlay renders, for each overlay in turn."""
    return render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def fleets() -> dict[str, list[Obj]]:
    """Every overlay's objects, by overlay name."""
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}
