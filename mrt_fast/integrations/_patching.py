"""Contract checks and reversible attribute swaps shared by the TRL and verl adapters.

An adapter replaces a library's function only after every target it will touch has been found
with the parameter names it was written against; otherwise it raises
:class:`UnsupportedVersionError` naming the installed and the supported versions, and changes
nothing.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any


class UnsupportedVersionError(RuntimeError):
    """The installed library does not have the contract an adapter was written for."""


def version_tuple(version: str) -> tuple[int, ...]:
    """``"1.16.0.dev0"`` -> ``(1, 16, 0)``: the leading numeric release fields."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


@dataclass
class Library:
    """An installed library checked against the contract an adapter expects.

    ``supported`` is the human-readable range named in every error (e.g. ``"trl >= 1.15"``);
    ``minimum`` the oldest release with that contract. Newer releases are accepted when every
    target still has the expected parameters.
    """

    distribution: str
    supported: str
    minimum: tuple[int, ...]
    version: str = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.version = metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            raise UnsupportedVersionError(
                f"{self.distribution} is not installed; mrt_fast supports {self.supported}") from None
        if version_tuple(self.version) < self.minimum:
            self.fail(f"{self.distribution} {self.version} is older than the contract mrt_fast adapts")

    def fail(self, problem: str) -> None:
        raise UnsupportedVersionError(
            f"{problem}; mrt_fast supports {self.supported}. Install a supported version or leave the adapter off.")

    def attribute(self, owner: Any, name: str) -> Any:
        if not hasattr(owner, name):
            self.fail(f"{getattr(owner, '__name__', owner)}.{name} is missing in {self.distribution} {self.version}")
        return getattr(owner, name)

    def parameters(self, func: Callable, expected: Iterable[str], what: str) -> None:
        """Fail unless ``func``'s parameters start with ``expected``, in order."""
        expected = tuple(expected)
        try:
            names = tuple(inspect.signature(func).parameters)
        except (TypeError, ValueError):
            names = ()
        if names[: len(expected)] != expected:
            self.fail(f"{what} in {self.distribution} {self.version} takes {names}, expected {expected}")


@dataclass
class Swaps:
    """Attribute replacements made by an adapter, undone in reverse order."""

    done: list[tuple[Any, str, Any]] = field(default_factory=list)

    def replace(self, owner: Any, name: str, new: Any) -> None:
        self.done.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    def replace_bound_copies(self, package: str, name: str, original: Any, new: Any) -> None:
        """Replace ``name`` in every loaded ``package.*`` module that bound ``original`` by a from-import."""
        for module_name, module in list(sys.modules.items()):
            if (module is not None and (module_name == package or module_name.startswith(package + "."))
                    and getattr(module, "__dict__", {}).get(name) is original):
                self.replace(module, name, new)

    def undo(self) -> None:
        while self.done:
            owner, name, old = self.done.pop()
            setattr(owner, name, old)

    def __bool__(self) -> bool:
        return bool(self.done)
