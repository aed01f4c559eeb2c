"""What a new thread carries: a run's context only as long as it can still be right.

The OpenTelemetry threading instrumentation hands a thread the context current at
``Thread.start()`` for the thread's whole life. That is right for a thread whose target is the
work of the run that started it, and wrong for a long-lived thread that a run happened to create
lazily (a ``ThreadPool``'s workers, a queue worker, a client's background thread) and that later
serves other requests: their spans would carry the first request's ID, inside its trace.

crew_otel keeps that instrumentation (it also carries the submitter's context into
``ThreadPoolExecutor.submit`` work) and decides, in a hook on ``Thread.start`` around it, which
context a new thread (or ``Timer``) gets:

* a pool's own threads (``multiprocessing.pool`` workers and handlers, ``ThreadPoolExecutor``
  workers) get an empty context: each work item carries the context of the code that submitted
  it instead (``ThreadPoolExecutor.submit`` through the threading instrumentation,
  ``ThreadPool.apply``/``map``/``imap``/... through :class:`PoolSubmitHook`);
* any other thread started inside a run gets a :class:`RunBoundContext`: the run's context
  while the run's kickoff is in flight, an empty one once it has ended. A long-lived loop's
  work items cannot be told apart, so after the run ended its spans are roots without a request
  ID rather than spans in the wrong request;
* threads started outside any run get the current context, as before.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import wrapt
from opentelemetry import context as otel_context
from opentelemetry.context.context import Context

from crew_otel import internals
from crew_otel.context import KICKOFF_KEY, REQUEST_SCOPE_KEY
from crew_otel.safety import safe_call

if TYPE_CHECKING:
    from _collections_abc import dict_items, dict_keys, dict_values

_logger = logging.getLogger("crew_otel")

#: (module, qualname) of the targets of threads that belong to a pool's machinery: their work
#: comes from a queue, with the context of whoever submitted it (checked on Python 3.10-3.13).
POOL_THREAD_TARGETS = frozenset(
    {
        ("multiprocessing.pool", "worker"),
        ("multiprocessing.pool", "Pool._handle_workers"),
        ("multiprocessing.pool", "Pool._handle_tasks"),
        ("multiprocessing.pool", "Pool._handle_results"),
        ("concurrent.futures.thread", "_worker"),
    }
)

#: ``multiprocessing.pool.Pool`` methods every submission goes through (``apply`` calls
#: ``apply_async``; ``map``, ``map_async``, ``starmap``, ``starmap_async`` call ``_map_async``);
#: each takes the function to run as its first argument, ``func``.
POOL_SUBMIT_METHODS = ("apply_async", "_map_async", "imap", "imap_unordered")

_EMPTY = Context()


def _bound_scope_ended(kickoff: Any) -> bool:
    """Whether the kickoff (``wrappers.kickoff.ActiveKickoff``) has ended: its span has; or
    the request scope (``context.RequestScope``) a thread was started in has exited.

    A kickoff whose span is not recording (sampled out) never reads as ended; its work is not
    recorded under a parent-based sampler either way.
    """
    if getattr(kickoff, "ended", False) is True:
        return True
    return getattr(getattr(kickoff, "span", None), "end_time", None) is not None


class RunBoundContext(Context):
    """A run's context carried into a thread: it reads as empty once the run's kickoff ended.

    Every read of the OpenTelemetry API goes through ``get`` (values, the current span) or
    ``copy`` (``set_value``), so a span started on the thread after the run ended has no parent
    and, having no request ID in its context, gets none from the request span processor.
    Contexts derived from it while the run was in flight keep what they copied.
    """

    def __init__(self, values: Mapping[str, object], kickoff: Any) -> None:
        super().__init__(values)
        self._kickoff = kickoff
        self._ended = False

    def in_flight(self) -> bool:
        """Whether the run this context belongs to is still in flight (once not, never again)."""
        if self._ended:
            return False
        if _bound_scope_ended(self._kickoff):
            self._ended = True
            # A long-lived thread must not keep the ended run's objects alive.
            dict.clear(self)
            self._kickoff = None
            return False
        return True

    def _values(self) -> dict[str, object]:
        return dict(dict.items(self)) if self.in_flight() else {}

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self, key, default) if self.in_flight() else default

    def copy(self) -> dict[str, object]:
        return self._values()

    def __getitem__(self, key: str) -> object:
        if not self.in_flight():
            raise KeyError(key)
        return dict.__getitem__(self, key)

    def __contains__(self, key: object) -> bool:
        return self.in_flight() and dict.__contains__(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())

    def keys(self) -> dict_keys[str, object]:
        return self._values().keys()

    def values(self) -> dict_values[str, object]:
        return self._values().values()

    def items(self) -> dict_items[str, object]:
        return self._values().items()


def carried_context(thread: Any) -> Context | None:
    """The context ``thread`` should carry, or ``None`` to carry the current one unchanged."""
    target = internals.THREAD_TARGET.read(thread)
    where = (getattr(target, "__module__", None), getattr(target, "__qualname__", None))
    if where in POOL_THREAD_TARGETS:
        return _EMPTY
    current = otel_context.get_current()
    if isinstance(current, RunBoundContext):
        return None  # started from a thread that is itself bound to a run: same run, same end
    # Bound to the innermost kickoff, else to the request scope the thread was started in.
    bound = current.get(KICKOFF_KEY) or current.get(REQUEST_SCOPE_KEY)
    if bound is None:
        return None
    return RunBoundContext(current, bound)


#: Where the threading instrumentation keeps the context a thread runs in (0.55b0-0.66b1).
_INSTRUMENTATION_CONTEXT_ATTRIBUTE = "_otel_context"


class ThreadStartHook:
    """Around ``Thread.start``: makes the threading instrumentation carry the right context.

    The instrumentation's ``start`` hook stores the context current when it runs, and its
    ``run`` hook attaches what was stored. Installed by crew_otel, its hook is inside this one,
    which makes :func:`carried_context` current for the call; installed later (by
    ``opentelemetry-instrument``, after crew_otel) it is outside and has stored already, so
    this hook also overwrites what it stored.

    ``on_pool_thread`` runs when a pool's own thread starts (before the pool takes any work).
    """

    def __init__(self, on_pool_thread: Callable[[], None] | None = None) -> None:
        self.active = True
        self._on_pool_thread = on_pool_thread

    def __call__(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if not self.active:
            return wrapped(*args, **kwargs)
        ctx = safe_call(carried_context, instance, default=None)
        if ctx is None:
            return wrapped(*args, **kwargs)
        if ctx is _EMPTY and self._on_pool_thread is not None:
            safe_call(self._on_pool_thread, default=None)
        safe_call(setattr, instance, _INSTRUMENTATION_CONTEXT_ATTRIBUTE, ctx, default=None)
        return _run_in(ctx, wrapped, args, kwargs)


class PoolSubmitHook:
    """Around ``ThreadPool`` submissions: the work runs in the submitter's context.

    The same thing the threading instrumentation does for ``ThreadPoolExecutor.submit``.
    Process pools are left alone (their functions must stay picklable).
    """

    def __init__(self, thread_pool_type: type) -> None:
        self.active = True
        self._thread_pool_type = thread_pool_type

    def __call__(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if self.active and isinstance(instance, self._thread_pool_type):
            args, kwargs = safe_call(_in_submitting_context, args, kwargs, default=(args, kwargs))
        return wrapped(*args, **kwargs)


def _in_submitting_context(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The submission's arguments with ``func`` bound to the current context."""
    if args:
        return (_bind(args[0], otel_context.get_current()), *args[1:]), kwargs
    if "func" in kwargs:
        return args, {**kwargs, "func": _bind(kwargs["func"], otel_context.get_current())}
    return args, kwargs


def _bind(func: Callable[..., Any], ctx: Context) -> Callable[..., Any]:
    def run_in_submitting_context(*args: Any, **kwargs: Any) -> Any:
        return _run_in(ctx, func, args, kwargs)

    return run_in_submitting_context


def _run_in(
    ctx: Context, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``func(*args, **kwargs)`` with ``ctx`` current, the caller's context restored after."""
    token = otel_context.attach(ctx)
    try:
        return func(*args, **kwargs)
    finally:
        otel_context.detach(token)


@dataclasses.dataclass
class _Installed:
    owner: Any
    name: str
    original: Any
    wrapper: Any
    hook: ThreadStartHook | PoolSubmitHook


class ThreadContextHooks:
    """Installs and removes the hooks of this module, around the threading instrumentation.

    ``instrumentation`` is the threading instrumentation to install first and remove last, or
    ``None`` when the application (or ``opentelemetry-instrument``) owns it.
    """

    def __init__(self, instrumentation: Any = None) -> None:
        self._instrumentation = instrumentation
        self._installed: list[_Installed] = []
        self._timer_had_start = True
        self._lock = threading.Lock()
        self._active = False
        self._pools_hooked = False

    def install(self, tracer_provider: Any = None) -> None:
        """Install the threading instrumentation (if given), then hook around it.

        Hooked: ``Thread.start``, ``Timer.start`` when the instrumentation gave ``Timer`` one of
        its own (else a ``Timer`` would bypass the ``Thread.start`` hook) and the ``ThreadPool``
        submission methods: now if ``multiprocessing.pool`` is imported, else when the first
        pool starts its threads (importing it here would cost every application start-up).
        """
        if self._instrumentation is not None:
            self._timer_had_start = "start" in threading.Timer.__dict__
            self._instrumentation.instrument(tracer_provider=tracer_provider)
        self._active = True
        start_hook = ThreadStartHook(self._hook_pools)
        safe_call(self._wrap, threading.Thread, "start", start_hook, default=None)
        if "start" in threading.Timer.__dict__:
            timer_hook = ThreadStartHook(self._hook_pools)
            safe_call(self._wrap, threading.Timer, "start", timer_hook, default=None)
        self._hook_pools()

    def _hook_pools(self) -> None:
        """Hook the ``ThreadPool`` submission methods once ``multiprocessing.pool`` is loaded."""
        if self._pools_hooked:
            return
        pool = sys.modules.get("multiprocessing.pool")
        if pool is None:
            return
        with self._lock:
            if self._pools_hooked or not self._active:
                return
            self._pools_hooked = True
            for name in POOL_SUBMIT_METHODS:
                hook = PoolSubmitHook(pool.ThreadPool)
                safe_call(self._wrap, pool.Pool, name, hook, default=None)

    def _wrap(self, owner: Any, name: str, hook: ThreadStartHook | PoolSubmitHook) -> None:
        original = owner.__dict__.get(name)
        if not callable(original):
            _logger.debug("crew_otel: %s.%s not found; not hooked", owner.__name__, name)
            return
        wrapper = wrapt.FunctionWrapper(original, hook)
        setattr(owner, name, wrapper)
        self._installed.append(_Installed(owner, name, original, wrapper, hook))

    def uninstall(self) -> None:
        """Restore every original; a hook someone wrapped on top of stays, passing through.

        Ours go first: the instrumentation's ``unwrap`` takes off whatever wrapper is outermost.
        """
        with self._lock:
            self._active = False
            installed, self._installed = self._installed, []
        for item in reversed(installed):
            item.hook.active = False
            if item.owner.__dict__.get(item.name) is item.wrapper:
                setattr(item.owner, item.name, item.original)
            else:
                _logger.debug(
                    "crew_otel: %s.%s was re-wrapped by another library",
                    item.owner.__name__,
                    item.name,
                )
        instrumentation, self._instrumentation = self._instrumentation, None
        if instrumentation is None:
            return
        safe_call(instrumentation.uninstrument, default=None)
        if not self._timer_had_start:
            safe_call(_remove_timer_start_left_over, default=None)


def _remove_timer_start_left_over() -> None:
    """Undo what the threading instrumentation's uninstrument leaves behind (0.55b0-0.66b1).

    It gives ``Timer`` a ``start`` of its own and, on removal, replaces it with a bound wrapper
    of ``Thread.start`` instead of deleting it.
    """
    left = threading.Timer.__dict__.get("start")
    if left is not None and getattr(left, "__wrapped__", None) is threading.Thread.start:
        del threading.Timer.start
