"""The name → class-or-factory registry shared by transforms and inference procedures."""

from __future__ import annotations

from collections.abc import Callable


def registrar(registry: dict[str, Callable], name: str, kind: str, base: type) -> Callable:
    """A decorator adding a `base` subclass (its `name` set to `name`) or a factory to `registry` under `name`;
    registering a name twice raises ValueError, anything else TypeError."""

    def add(obj):
        if name in registry:
            raise ValueError(f"A {kind} named {name!r} is already registered ({registry[name]!r}).")
        if isinstance(obj, type):
            if not issubclass(obj, base):
                raise TypeError(f"register_{kind}({name!r}) expects a {base.__name__} subclass or a factory, got {obj!r}.")
            obj.name = name
        elif not callable(obj):
            raise TypeError(f"register_{kind}({name!r}) expects a {base.__name__} subclass or a factory, got {obj!r}.")
        registry[name] = obj
        return obj

    return add
