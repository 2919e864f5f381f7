"""Name -> class registries for the scorers and the selection policies.

A plugin registers itself with a decorator in its own module:

    @register_policy("stratified")
    class StratifiedPolicy(Policy): ...

The built-in plugins are listed once, here, by module path, and imported on the first lookup; so this module
imports no plugin, no registry imports its plugins, and a plugin's imports (the config, the policy base) never
run back into the registry. A user's plugin registers when its module is imported, before the run's config is
loaded: `register_scorer` / `register_policy` are public (raysel/__init__.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import TypeVar

from raysel.errors import ConfigError

T = TypeVar("T", bound=type)


class UnknownName(ConfigError, KeyError):
    """A name no plugin registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class Registry(MutableMapping[str, type]):
    """Classes by name, for one kind of plugin; the built-in modules are imported on the first lookup.

    Args:
        kind: what is registered ("scorer", "policy"), for the messages.
        builtins: the module paths of the built-in plugins, imported on the first lookup.

    Example:
        >>> shapes = Registry("shape", builtins=())
        >>> @shapes.register("square")
        ... class Square: ...
        >>> shapes["square"].__name__
        'Square'
        >>> shapes["circle"]
        Traceback (most recent call last):
        raysel.registry.UnknownName: unknown shape 'circle'; choose from ['square']
    """

    def __init__(self, kind: str, *, builtins: tuple[str, ...]) -> None:
        self.kind = kind
        self.builtins = builtins
        self._classes: dict[str, type] = {}
        self._loaded = False

    def register(self, *names: str) -> Callable[[T], T]:
        """A class decorator registering the class under each of `names`; a name taken already is an error."""

        def wrap(cls: T) -> T:
            if not self._is_builtin(cls):
                self._load_builtins()  # so that a user's plugin cannot take a built-in's name unnoticed
            for name in names:
                if name in self._classes:
                    taken = self._classes[name]
                    raise ValueError(
                        f"{self.kind} {name!r} is registered twice ({taken.__module__}.{taken.__qualname__} and "
                        f"{cls.__module__}.{cls.__qualname__}); register the new one under another name"
                    )
                self._classes[name] = cls
            return cls

        return wrap

    def _is_builtin(self, cls: type) -> bool:
        return any(cls.__module__ == m or cls.__module__.startswith(m + ".") for m in self.builtins)

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first: a built-in module that registers while it loads must not load the others again
        try:
            for module in self.builtins:
                importlib.import_module(module)
        except BaseException:
            self._loaded = False  # the next lookup raises the same error, rather than missing names
            raise

    def __getitem__(self, name: str) -> type:
        self._load_builtins()
        try:
            return self._classes[name]
        except KeyError:
            raise UnknownName(f"unknown {self.kind} {name!r}; choose from {sorted(self._classes)}") from None

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        self._load_builtins()
        return iter(dict(self._classes))

    def __len__(self) -> int:
        self._load_builtins()
        return len(self._classes)

    def __setitem__(self, name: str, cls: type) -> None:
        """Replace or add a class without the duplicate check (tests patch a registry this way)."""
        self._load_builtins()
        self._classes[name] = cls

    def __delitem__(self, name: str) -> None:
        self._load_builtins()
        del self._classes[name]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self)})"


# The built-ins, one module each (a module may register several names: lm gives entropy, loss and el2n_lm).
SCORERS = Registry(
    "scorer",
    builtins=(
        "raysel.scorers.lm",
        "raysel.scorers.lm_influence",
        "raysel.scorers.classifier_entropy",
        "raysel.scorers.el2n",
        "raysel.scorers.influence",
        "raysel.scorers.vog",
        "raysel.scorers.aum",
    ),
)
POLICIES = Registry(
    "policy",
    builtins=(
        "raysel.select.simple",  # random, topk, threshold, stratified
        "raysel.select.hard_easy",
        "raysel.select.mig",
        "raysel.select.bandit",
        "raysel.select.ccs",
        "raysel.select.d2",
    ),
)

register_scorer = SCORERS.register
register_policy = POLICIES.register

__all__ = ["POLICIES", "SCORERS", "Registry", "UnknownName", "register_policy", "register_scorer"]
