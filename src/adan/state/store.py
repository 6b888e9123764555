"""The optimizer's ``state`` map, which counts every change of the objects it holds, so that
the stepping seam can tell at no cost per tensor whether a cached plan is still valid."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

__all__ = ["StateMap", "States", "TrackedState"]

States = defaultdict[Any, Any]
"""An optimizer's ``state``: a :class:`StateMap`, or what a user put in its place."""

_MISSING = object()


class _CountsRemovals:
    """Removals that count in ``self.changes`` (mixed into the two dicts below)."""

    __slots__ = ()
    changes: list[int]

    def __delitem__(self, key: Any) -> None:
        self.changes[0] += 1
        super().__delitem__(key)  # type: ignore[misc]

    def pop(self, *args: Any) -> Any:
        self.changes[0] += 1
        return super().pop(*args)  # type: ignore[misc]

    def popitem(self) -> Any:
        self.changes[0] += 1
        return super().popitem()  # type: ignore[misc]

    def clear(self) -> None:
        self.changes[0] += 1
        super().clear()  # type: ignore[misc]


class TrackedState(_CountsRemovals, dict):
    """One parameter's state dict that counts, in its map's ``changes``, every change of the
    objects it holds (not in-place writes into them), so that the optimizer can tell at no
    cost per tensor whether a cached step plan (which holds addresses) is still valid.
    Pickled, saved and deep-copied as a plain dict."""

    __slots__ = ("changes",)

    def __init__(self, changes: list[int], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changes = changes

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.get(key, _MISSING) is not value:  # ``state["step"] += 1`` changes nothing
            self.changes[0] += 1
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.changes[0] += 1
        super().update(*args, **kwargs)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.changes[0] += 1
        return super().setdefault(key, default)

    def __ior__(self, other: Any) -> TrackedState:  # type: ignore[misc]
        self.update(other)
        return self

    def __reduce__(self) -> Any:
        return dict, (dict(self),)


class StateMap(_CountsRemovals, defaultdict):
    """The optimizer's ``state`` (a ``defaultdict(dict)``, as torch's): parameters' states are
    :class:`TrackedState` dicts sharing one change count. A plain dict stored into it keeps
    working (it is not copied) but marks the map ``untracked``: the optimizer then checks
    every state's contents at each step instead of the count."""

    def __init__(self, items: Any = ()) -> None:
        super().__init__(None)
        self.changes = [0]
        self.untracked = False
        self.default_factory = self._new
        for key, value in dict(items).items():
            self[key] = TrackedState(self.changes, value) if type(value) is dict else value

    def _new(self) -> TrackedState:
        return TrackedState(self.changes)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.changes[0] += 1
        if not (isinstance(value, TrackedState) and value.changes is self.changes):
            self.untracked = True
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __reduce__(self) -> Any:
        return defaultdict, (dict,), None, None, iter(self.items())
