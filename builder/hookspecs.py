"""The plugin hooks. Built-in architectures, quantizers and targets use them exactly as a third
party does: a package lists a module under the ``builder`` entry-point group, and that module
implements any of these hooks with ``@builder.hookimpl``."""

from __future__ import annotations

import pluggy

PROJECT = "builder"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_architectures(register):
    """Register DecoderBuilder subclasses.

    Called once when plugins load. ``register(cls, replace=False)`` files ``cls`` under every name
    in ``cls.architectures`` (Hugging Face ``config.architectures[0]`` strings). A name another
    plugin already registered is an error unless ``replace=True`` is given on purpose.
    """


@hookspec
def register_quantizers(register):
    """Register weight quantizers.

    ``register(cls, replace=False)`` files ``cls`` under ``cls.name``; quantization policies look
    quantizers up by that name.
    """


@hookspec
def register_targets(register):
    """Register execution targets.

    ``register(target, replace=False)`` files a ``TargetCaps`` instance under ``target.name``, the
    value of ``-e/--execution_provider`` that selects it.
    """


@hookspec
def register_options(register):
    """Register extra options of the plugin's own.

    ``register(option, replace=False)`` files a ``builder.PluginOption`` (name, default, help,
    choices) under its name: ``--extra_options name=value`` then parses and validates it like a
    built-in option, --help lists it, and a builder reads it with ``self.extra.plugin(name)``.
    A built-in option's name, or one another plugin declared, is an error.
    """
