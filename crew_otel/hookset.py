"""One way to install and remove a hook: ``HookSet``.

Every function crew_otel replaces (CrewAI's methods from the plan, the provider LLM classes, the
HTTP pools, ``Thread.start`` and the pools and queues of :mod:`crew_otel.threads`, ``open`` and
``sqlite3.connect`` for the shared-state watcher) is replaced the same way: ``owner.__dict__``
holds the original, crew_otel sets its wrapper there, remembers both, and on removal puts the
original back only while its wrapper is still the one there. A library that wrapped on top of
crew_otel's keeps its wrapper; crew_otel's inside it passes through, because every hook checks
whether its runtime is still active.

A slot (owner, name) is hooked at most once per set, and a slot whose chain of wrappers already
holds the same wrapper callable (crew_otel's inert wrapper, kept under another library's after a
removal) is not wrapped again: that callable decides at each call whether it is live.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

import wrapt

from crew_otel import internals

__all__ = ["Hook", "HookSet"]

_logger = logging.getLogger("crew_otel")

#: How far down a chain of ``__wrapped__`` to look for a wrapper of this set.
_MAX_CHAIN = 16


@dataclasses.dataclass(frozen=True)
class Hook:
    """One installed hook: ``owner.__dict__[name]`` was ``original`` and is now ``wrapper``."""

    key: str
    owner: Any
    name: str
    original: Any
    wrapper: Any

    @property
    def where(self) -> str:
        """``module.Owner.name`` (or ``module.name`` for a module's function)."""
        owner_name = getattr(self.owner, "__qualname__", None)
        module = getattr(self.owner, "__module__", None)
        if owner_name is None:  # a module
            return f"{getattr(self.owner, '__name__', '?')}.{self.name}"
        return f"{module}.{owner_name}.{self.name}"

    @property
    def in_place(self) -> bool:
        """Whether crew_otel's wrapper is still the one in the slot (nobody wrapped on top)."""
        return _slot(self.owner, self.name) is self.wrapper


class HookSet:
    """The hooks one component installed, removable together.

    Thread-safe: installs and removal may race (a post-import hook installs while the
    application calls ``uninstrument()``); a slot installed after :meth:`remove_all` began
    belongs to the next round and is removed by the next call.
    """

    def __init__(self, name: str) -> None:
        #: What installed these hooks (shown by ``crew-otel doctor``).
        self.name = name
        self._hooks: list[Hook] = []
        self._slots: set[tuple[int, str]] = set()
        self._lock = threading.Lock()

    def holds(self, owner: Any, name: str) -> bool:
        """Whether this set has hooked ``owner.name``."""
        return (id(owner), name) in self._slots

    def wrap(
        self,
        owner: Any,
        name: str,
        wrapper: Callable[..., Any],
        *,
        key: str | None = None,
    ) -> Hook | None:
        """Replace ``owner.name`` by ``wrapt.FunctionWrapper(original, wrapper)``.

        Returns ``None`` (nothing installed) when ``owner`` has no callable ``name`` of its own
        or the slot is already hooked by this set.
        """
        return self.replace(
            owner,
            name,
            lambda original: wrapt.FunctionWrapper(original, wrapper),
            key=key,
            marker=wrapper,
        )

    def replace(
        self,
        owner: Any,
        name: str,
        build: Callable[[Any], Any],
        *,
        key: str | None = None,
        marker: Any = None,
    ) -> Hook | None:
        """Replace ``owner.name`` by ``build(original)`` (a hook that is not a wrapt wrapper,
        e.g. one that replaces a method with a plain function for speed).

        ``marker``: a wrapper callable that, found in the slot's chain, means "already hooked".
        """
        with self._lock:
            if (id(owner), name) in self._slots:
                return None
            original = _slot(owner, name)
            if not callable(original) or self._holds(original, marker):
                return None
            replacement = build(original)
            try:
                setattr(owner, name, replacement)
            except BaseException:
                if _slot(owner, name) is replacement:
                    setattr(owner, name, original)
                raise
            hook = Hook(key or name, owner, name, original, replacement)
            self._hooks.append(hook)
            self._slots.add((id(owner), name))
            return hook

    def slots(self) -> set[tuple[int, str]]:
        """``(id(owner), name)`` of every slot hooked now (a copy)."""
        with self._lock:
            return set(self._slots)

    def hooks(self) -> tuple[Hook, ...]:
        """The hooks installed now, in installation order."""
        with self._lock:
            return tuple(self._hooks)

    def remove_all(self) -> None:
        """Put every original back where crew_otel's wrapper is still in place; a wrapper that
        another library wrapped on top of stays (inert), inside that library's."""
        with self._lock:
            hooks, self._hooks = self._hooks, []
            self._slots = set()
        for hook in reversed(hooks):
            if hook.in_place:
                setattr(hook.owner, hook.name, hook.original)
            else:
                _logger.debug("crew_otel: %s was wrapped again by another library", hook.where)

    def _holds(self, function: Any, marker: Any) -> bool:
        """Whether ``function`` is, or wraps, a hook this set holds or a wrapt wrapper calling
        ``marker``."""
        ours = {id(hook.wrapper) for hook in self._hooks}
        for _ in range(_MAX_CHAIN):
            if function is None:
                return False
            if id(function) in ours:
                return True
            if (
                marker is not None
                and isinstance(function, wrapt.FunctionWrapper)
                and internals.WRAPT_WRAPPER.read(function) is marker
            ):
                return True
            function = _wrapped_by(function)
        return False


def _slot(owner: Any, name: str) -> Any:
    """``owner.__dict__[name]`` without running a descriptor (``None`` if absent)."""
    try:
        return vars(owner).get(name)
    except TypeError:
        return None


#: wrapt's proxy types (its C extension's base differs from the pure-Python ``wrapt.ObjectProxy``):
#: their ``__wrapped__`` is wrapt's own slot, read without running user code.
_PROXY_TYPES = (
    wrapt.ObjectProxy,
    *(klass for klass in wrapt.FunctionWrapper.__mro__ if klass.__name__ == "ObjectProxy"),
)


def _wrapped_by(function: Any) -> Any:
    """The function ``function`` wraps, read without running user code (``None`` if none)."""
    if isinstance(function, _PROXY_TYPES):
        try:
            return object.__getattribute__(function, "__wrapped__")
        except AttributeError:
            return None
    try:
        return vars(function).get("__wrapped__")
    except TypeError:
        return None
