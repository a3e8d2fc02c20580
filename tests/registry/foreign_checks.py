"""One check the alias and tag tests share: another tenant's adapter reads like nobody's."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from registry import NotFound


def assert_foreign_reads_as_unknown(calls: Sequence[Callable[[str], object]]) -> None:
    """Each call, given the name of another tenant's adapter ``bot``, raises ``NotFound``
    in the very words it uses for ``nobody``, a name no tenant has."""
    for call in calls:
        with pytest.raises(NotFound) as foreign:
            call("bot")
        with pytest.raises(NotFound) as unknown:
            call("nobody")
        assert str(foreign.value) == str(unknown.value).replace("nobody", "bot")
