"""Finding handlers: entry points (skipping those whose dependencies are missing) and module:factory specs."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from forseti.schemas.tasks import TaskKind
from forseti.worker.engine import plugins
from forseti.worker.engine.plugins import installed_handlers, load_handler


def test_installed_handlers_include_rl_and_finetune() -> None:
    kinds = {handler.kind for handler in installed_handlers()}
    assert {TaskKind.RL, TaskKind.FINETUNE} <= kinds


def test_a_handler_whose_dependency_is_missing_is_skipped_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    points = [
        EntryPoint("rl", "forseti.worker.handlers.rl:RLHandler", plugins.ENTRY_POINT_GROUP),
        EntryPoint("broken", "forseti_absent_extra.handler:Handler", plugins.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(plugins, "entry_points", lambda group: points)
    handlers = installed_handlers()
    assert [h.kind for h in handlers] == [TaskKind.RL]
    assert "handler broken not loaded: forseti_absent_extra is not installed" in caplog.text


def test_an_entry_point_found_twice_gives_one_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    # a checkout's stale forseti.egg-info (the name before forseti-worker) beside the installed
    # metadata listed every handler twice, and a worker with two handlers for a kind did not start
    rl = EntryPoint("rl", "forseti.worker.handlers.rl:RLHandler", plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [rl, rl])
    assert [h.kind for h in installed_handlers()] == [TaskKind.RL]


@pytest.mark.parametrize(
    ("spec", "words"), [("nocolon", "not of the form"), ("forseti.worker.engine.plugins:nope", "has no")]
)
def test_bad_handler_specs_are_refused(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        load_handler(spec)
