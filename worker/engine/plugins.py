"""Finding handlers: the `forseti.handlers` entry-point group, or `module:factory` given on the command line."""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import EntryPoint, entry_points
from typing import cast

from .context import Handler

ENTRY_POINT_GROUP = "forseti.handlers"
log = logging.getLogger(__name__)


def load_handler(spec: str) -> Handler:
    """Import `package.module:factory` and call the factory (a class or a function) with no arguments."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"handler {spec!r} is not of the form package.module:factory")
    module = importlib.import_module(module_name)
    try:
        factory = getattr(module, attr)
    except AttributeError as exc:
        raise ValueError(f"{module_name} has no {attr!r}") from exc
    handler = factory()
    for needed in ("kind", "run", "capabilities"):
        if not hasattr(handler, needed):
            raise ValueError(f"{spec} made a {type(handler).__name__} without `{needed}`: not a Handler")
    return cast(Handler, handler)


def installed_handlers() -> list[Handler]:
    """One handler from each installed `forseti.handlers` entry point whose dependencies are installed
    (a backbone-only install, `make install TORCH=none`, has no RL or fine-tune handler)."""
    handlers = []
    # one entry point can be found twice: a checkout's stale `forseti.egg-info` (the distribution's
    # name before forseti-worker) sits beside the installed metadata when commands run from it
    unique: dict[str, EntryPoint] = {}
    for found in entry_points(group=ENTRY_POINT_GROUP):
        unique.setdefault(found.value, found)
    for ep in unique.values():
        try:
            handlers.append(load_handler(f"{ep.module}:{ep.attr}"))
        except ModuleNotFoundError as exc:
            log.warning("handler %s not loaded: %s is not installed (see the extras in the README)", ep.name, exc.name)
    return handlers
