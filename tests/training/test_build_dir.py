"""Directory builds: lock, scratch directory, atomic install."""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path

from training.build_dir import build_lock, install, remove_stale_scratch, scratch_dir


def test_scratch_dir_is_beside_the_target_and_removed_after_use(tmp_path: Path) -> None:
    target = tmp_path / "model"

    with scratch_dir(target) as scratch:
        assert scratch.parent == tmp_path
        (scratch / "weights").write_text("w")

    assert not scratch.exists()
    assert not target.exists()


def test_install_moves_scratch_into_place(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with scratch_dir(target) as scratch:
        (scratch / "weights").write_text("new")
        install(scratch, target)

    assert (target / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_install_makes_the_tree_readable_by_other_users(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with scratch_dir(target) as scratch:
        (scratch / "sub").mkdir(mode=0o700)
        (scratch / "sub" / "weights").write_text("w")
        (scratch / "sub" / "weights").chmod(0o600)
        install(scratch, target)

    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "sub" / "weights").stat().st_mode) == 0o644


def test_install_replaces_an_existing_target_and_leaves_no_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    (target / "only-in-old").write_text("x")

    with scratch_dir(target) as scratch:
        (scratch / "weights").write_text("new")
        install(scratch, target)

    assert sorted(p.name for p in target.iterdir()) == ["weights"]
    assert (target / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_remove_stale_scratch_spares_the_target_and_its_neighbours(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    neighbour = tmp_path / "other-model"
    neighbour.mkdir()
    (tmp_path / ".model.building-abc" / "half").mkdir(parents=True)
    (tmp_path / ".other-model.building-abc").mkdir()

    remove_stale_scratch(target)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other-model.building-abc",
        "model",
        "other-model",
    ]


def test_build_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    target = tmp_path / "model"
    events: list[str] = []

    def second_builder() -> None:
        with build_lock(target, announce=False):
            events.append("second in")

    with build_lock(target, announce=False):
        thread = threading.Thread(target=second_builder)
        thread.start()
        time.sleep(0.2)
        events.append("first out")
    thread.join(timeout=5)

    assert events == ["first out", "second in"]
