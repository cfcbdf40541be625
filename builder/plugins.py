"""Loads plugins from the ``builder`` entry-point group and fills the registries.

The built-in architectures and targets are entry points of this very package (see
pyproject.toml), so they load through exactly the path a third-party plugin takes.
``BUILDER_LOAD_PLUGINS=name1,name2`` narrows loading to those entry-point names.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import pluggy

from builder import hookspecs
from builder.errors import PluginError
from builder.options import ExtraOptions, PluginOption
from builder.registry import Registry

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = hookspecs.PROJECT


@dataclass(frozen=True)
class Plugins:
    """What the loaded plugins registered."""

    architectures: Registry
    quantizers: Registry
    targets: Registry
    loaded: tuple[str, ...]
    options: Registry  # PluginOption by name: the plugins' own extra options


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    def order(ep):  # our own built-ins first, so that a plugin's replace=True comes after them
        dist = getattr(ep, "dist", None)
        return (dist is None or dist.name != hookspecs.PROJECT, ep.name)

    eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=order)
    wanted = os.environ.get("BUILDER_LOAD_PLUGINS")
    if wanted is not None:
        names = {n.strip() for n in wanted.split(",") if n.strip()}
        unknown = sorted(names - {ep.name for ep in eps})
        if unknown:
            raise PluginError(f"BUILDER_LOAD_PLUGINS names {', '.join(map(repr, unknown))}, "
                              "which no installed plugin is; installed: "
                              f"{', '.join(sorted({ep.name for ep in eps}))}")
        eps = [ep for ep in eps if ep.name in names]
    return eps


def load_plugins(extra: Iterable[tuple[str, object]] = (), *,
                 entry_points: bool = True) -> Plugins:
    """Load entry-point plugins (and ``extra`` (name, module) pairs) into fresh registries."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    plugins: list[tuple[str, object]] = []
    if entry_points:
        for ep in _entry_points():
            try:
                plugins.append((ep.name, ep.load()))
            except Exception as e:
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: "
                                  f"{type(e).__name__}: {e}") from e
    plugins.extend(extra)
    for name, module in plugins:
        try:
            pm.register(module, name=name)
        except ValueError as e:
            raise PluginError(f"plugin {name!r} cannot be registered: {e}") from None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"plugin {e.plugin_name if hasattr(e, 'plugin_name') else '?'} "
                          f"implements an unknown hook: {e}") from None

    result = Plugins(
        architectures=Registry("architecture", lambda cls: cls.architectures),
        quantizers=Registry("quantizer", lambda cls: (cls.name,)),
        targets=Registry("target", lambda target: (target.name,)),
        loaded=tuple(name for name, _ in plugins),
        options=Registry("extra option", _option_names),
    )
    for hook, registry in ((pm.hook.register_architectures, result.architectures),
                           (pm.hook.register_quantizers, result.quantizers),
                           (pm.hook.register_targets, result.targets),
                           (pm.hook.register_options, result.options)):
        for impl in hook.get_hookimpls():  # in registration order: built-ins first
            try:
                impl.function(register=functools.partial(_register, registry, impl.plugin_name))
            except PluginError:
                raise
            except Exception as e:  # a plugin's own bug, named (the CLI prints one line)
                raise PluginError(f"plugin {impl.plugin_name!r} failed in {hook.name}: "
                                  f"{type(e).__name__}: {e}") from e
    logger.debug("plugins loaded: %s", ", ".join(result.loaded) or "none")
    return result


def _option_names(option: PluginOption) -> tuple[str]:
    """A plugin option's name, checked against the built-in options' names and aliases."""
    if not isinstance(option, PluginOption):
        raise PluginError(f"register_options: expected a builder.PluginOption, got {option!r}")
    builtin = {n for f in ExtraOptions.catalogue()
               for n in (f.name, *f.metadata["aliases"], *f.metadata["inverse_aliases"])}
    if option.name in builtin:
        raise PluginError(f"extra option {option.name!r} is built in; a plugin's option needs "
                          "a name of its own")
    return (option.name,)


def _register(registry: Registry, owner: str, item, replace: bool = False) -> None:
    registry.register(item, replace=replace, owner=owner)


@functools.cache
def default_plugins() -> Plugins:
    """The entry-point plugins, loaded once per process."""
    return load_plugins()
