"""Which candidate a production request's copy goes to (router/shadow.py)."""

from __future__ import annotations

import router
from router import AliasTarget, RoutingView, VersionState, VersionView

BASE, OTHER_BASE = "fp-base", "fp-other"


def _view(shadow: AliasTarget | None, **versions: VersionView) -> RoutingView:
    numbered = {
        1: VersionView(1, "lora-1", BASE),
        2: VersionView(2, "lora-2", BASE),
        **{v.number: v for v in versions.values()},
    }
    aliases = {router.PRODUCTION: AliasTarget(1)}
    if shadow is not None:
        aliases[router.SHADOW] = shadow
    return RoutingView("bot", numbered, aliases)


def _target(view: RoutingView, model: str = "bot") -> router.ShadowTarget | None:
    ref = router.parse_model_name(model, {})
    return router.shadow_target(view, router.choose_version(view, ref, "user-1"))


def test_a_production_request_is_copied_to_the_shadow_version_at_its_share() -> None:
    target = _target(_view(AliasTarget(2, 0.3)))
    assert target is not None
    assert (target.version.lora_name, target.share) == ("lora-2", 0.3)


def test_the_shadow_alias_never_changes_which_version_answers() -> None:
    view = _view(AliasTarget(2, 1.0))
    for key in map(str, range(200)):
        choice = router.choose_version(view, router.parse_model_name("bot", {}), key)
        assert (choice.version.number, choice.label) == (1, router.PRODUCTION)


def test_only_production_requests_are_copied_not_pinned_or_other_aliases() -> None:
    view = _view(AliasTarget(2, 1.0))
    assert _target(view, "bot:production") is not None  # production, asked for by name
    assert _target(view, "bot@1") is None
    assert _target(view, "bot:shadow") is None  # asked for by name: it answers, uncopied


def test_no_copy_without_a_share_or_to_an_unservable_promoted_or_foreign_base_version() -> None:
    assert _target(_view(None)) is None
    assert _target(_view(AliasTarget(2, 0.0))) is None
    assert _target(_view(AliasTarget(1, 1.0))) is None  # promoted since: it is production
    retired = VersionView(2, "lora-2", BASE, VersionState.RETIRED)
    assert _target(_view(AliasTarget(2, 1.0), v2=retired)) is None
    elsewhere = VersionView(3, "lora-3", OTHER_BASE)
    assert _target(_view(AliasTarget(3, 1.0), v3=elsewhere)) is None
    assert _target(_view(AliasTarget(7, 1.0))) is None  # withdrawn from the view
