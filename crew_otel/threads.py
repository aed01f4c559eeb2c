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
  until the run ends (its :class:`~crew_otel.context.RunScope`, whatever its span), an empty one
  after. Such a thread may be a long-lived loop serving other runs too: when it takes an item
  from a ``queue.Queue`` (in its own context, outside any span it opened), it works from then on
  in the context of the code that put the item, bound to that code's run
  (:class:`QueueHooks`); from a queue whose order crew_otel does not follow (``LifoQueue``,
  ``PriorityQueue``, a subclass with its own ``_put``/``_get``) the item's run is unknown and it
  works in an empty context. Spans whose run cannot be known are roots without a request ID,
  never spans in the wrong request;
* threads started outside any run get the current context, as before.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import logging
import queue
import sys
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import wrapt
from opentelemetry import context as otel_context
from opentelemetry.context.context import Context

from crew_otel import internals
from crew_otel.context import RunScope, innermost_run
from crew_otel.hookset import HookSet
from crew_otel.safety import internal_error, safe_call

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


class RunBoundContext(Context):
    """A run's context carried into a thread: it reads as empty once released, which happens
    when its run ends (``RunScope.release_on_end``) or when the thread takes other work.

    Every read of the OpenTelemetry API goes through ``get`` (values, the current span) or
    ``copy`` (``set_value``), so a span started on the thread after that has no parent and,
    having no request ID in its context, gets none from the request span processor. Contexts
    derived from it before keep what they copied. ``run`` is ``None`` for a context from outside
    any run (an item put there): it never ends by itself.
    """

    def __init__(self, values: Mapping[str, object], run: RunScope | None) -> None:
        super().__init__(values)
        self._run = run
        self._released = False
        if run is not None:
            run.release_on_end(self)

    def release(self) -> None:
        """Read as empty from now on, and let go of the run's values (once, for good)."""
        self._released = True
        self._run = None
        dict.clear(self)

    def in_flight(self) -> bool:
        """Whether this still reads as its run's context (once not, never again)."""
        if self._released:
            return False
        run = self._run
        if run is not None and run.ended:
            self.release()
            return False
        return True

    def fork(self) -> Context:
        """What a thread started from this one carries: the same run, its own lifetime."""
        return RunBoundContext(self._values(), self._run) if self.in_flight() else Context()

    def snapshot(self) -> Context:
        """A plain copy of what this reads as now (empty once released)."""
        return Context(self._values())

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
        return current.fork()  # started from a thread bound to a run: same run, same end
    run = innermost_run(current)  # the innermost kickoff's, else the request scope's
    if run is None:
        return None
    return RunBoundContext(current, run)


#: Where the threading instrumentation keeps the context a thread runs in (0.55b0-0.66b1).
_INSTRUMENTATION_CONTEXT_ATTRIBUTE = "_otel_context"


class ThreadStartHook:
    """Around ``Thread.start``: makes the threading instrumentation carry the right context.

    The instrumentation's ``start`` hook stores the context current when it runs, and its
    ``run`` hook attaches what was stored. Installed by crew_otel, its hook is inside this one,
    which makes :func:`carried_context` current for the call; installed later (by
    ``opentelemetry-instrument``, after crew_otel) it is outside and has stored already, so
    this hook also overwrites what it stored.

    ``on_pool_thread`` runs when a pool's own thread starts (before the pool takes any work),
    ``on_bound_thread`` when a thread bound to a run starts (before it takes any).
    """

    def __init__(
        self,
        on_pool_thread: Callable[[], None] | None = None,
        on_bound_thread: Callable[[], None] | None = None,
    ) -> None:
        self.active = True
        self._on_pool_thread = on_pool_thread
        self._on_bound_thread = on_bound_thread

    def __call__(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if not self.active:
            return wrapped(*args, **kwargs)
        # Inline ``try``/``internal_error`` (what ``safe_call`` does, one call fewer per step:
        # CrewAI starts a thread per agent step).
        try:
            ctx = carried_context(instance)
        except Exception as exc:
            ctx = internal_error(carried_context, exc, None)
        if ctx is None:
            return wrapped(*args, **kwargs)
        if ctx is _EMPTY and self._on_pool_thread is not None:
            safe_call(self._on_pool_thread, default=None)  # once per pool thread
        if isinstance(ctx, RunBoundContext):
            try:
                setattr(instance, _SERVING_ATTRIBUTE, _Serving(ctx))
            except Exception as exc:
                internal_error(setattr, exc, None)
            if self._on_bound_thread is not None:
                safe_call(self._on_bound_thread, default=None)
        try:
            setattr(instance, _INSTRUMENTATION_CONTEXT_ATTRIBUTE, ctx)
        except Exception as exc:
            internal_error(setattr, exc, None)
        return _run_in(ctx, wrapped, args, kwargs)


#: Where a thread started inside a run keeps its :class:`_Serving`.
_SERVING_ATTRIBUTE = "_crew_otel_serving"


class _Serving:
    """A thread started inside a run: the context crew_otel made current on it, and what the
    queue it is taking an item from handed over with the item."""

    __slots__ = ("current", "handed")

    def __init__(self, current: Context) -> None:
        self.current = current
        self.handed: Context | None = None

    def take(self, put_in: Context | None) -> None:
        """The thread took an item put where ``put_in`` was current (``None``: unknown).

        From now until it takes the next one, it works in that context, bound to its run
        (empty when unknown or when that run is over); what it carried before lets go. A
        context the thread's own code made current (a span around the loop, ``Context.run``)
        is left alone: the switch happens where crew_otel's context is the current one.
        """
        previous = self.current
        if otel_context.get_current() is not previous:
            return
        self.current = Context() if put_in is None else _bound_to(put_in)
        if isinstance(previous, RunBoundContext):
            previous.release()
        # Replaced at the next item; the thread's ``run`` hook restores what was before it.
        otel_context.attach(self.current)


def _bound_to(ctx: Context) -> Context:
    run = innermost_run(ctx)
    if run is not None and run.ended:
        return Context()
    return RunBoundContext(ctx, run)


class _Taking(threading.local):
    """Per thread: the :class:`_Serving` of a thread started inside a run while it is in
    ``Queue.get`` (where ``Queue._get`` hands it what it took), else ``None``."""

    serving: _Serving | None = None


_TAKING = _Taking()


def _failed(exc: Exception) -> None:
    """An error in a queue hook: reported (raised in strict mode); the queue works on."""
    safe_call(_raise, exc, default=None)


def _raise(exc: Exception) -> None:
    raise exc


def _current_to_hand_over() -> Context | None:
    """What is current here, to hand over with an item put into a queue."""
    ctx = otel_context.get_current()
    return ctx.snapshot() if isinstance(ctx, RunBoundContext) else ctx


#: Where a ``queue.Queue`` keeps its :class:`_QueueItems`.
_ITEMS_ATTRIBUTE = "_crew_otel_items"


class _QueueItems:
    """What was current where each item of one first-in-first-out queue was put, in order.

    Changed only inside ``_put``/``_get``, which run under the queue's mutex. Items the queue
    held before crew_otel followed it, or that reached it another way (``q.queue.append``), are
    unknown: whenever the counts disagree, every item the queue holds becomes unknown.
    """

    __slots__ = ("following", "follows", "put_in", "unknown")

    def __init__(self, following: QueueHooks, held: int, follows: bool) -> None:
        self.following = following
        #: Whether the queue's class keeps ``queue.Queue``'s order (else nothing is noted).
        self.follows = follows
        self.unknown = held
        self.put_in: collections.deque[Context | None] = collections.deque()

    def in_step(self, held: int) -> _QueueItems:
        """Make the counts agree with the ``held`` items the queue holds."""
        if self.unknown + len(self.put_in) != held:
            self.put_in.clear()
            self.unknown = held
        return self

    def take_first(self) -> Context | None:
        if self.unknown:
            self.unknown -= 1
            return None
        return self.put_in.popleft() if self.put_in else None


def _follows_order(cls: type) -> bool:
    """Whether ``cls`` keeps ``queue.Queue``'s first-in-first-out ``_put``/``_get``."""
    for klass in cls.__mro__:
        if klass is queue.Queue:
            return True
        if "_put" in klass.__dict__ or "_get" in klass.__dict__:
            return False
    return False


class QueueHooks:
    """Around ``queue.Queue``: an item carries what was current where it was put, and a thread
    started inside a run that takes it works for whoever put it.

    ``_put`` and ``_get`` (both called under the queue's mutex) keep, for queues that keep
    their first-in-first-out order, what was current at each ``put`` beside the queue's own
    items. ``get`` (every subclass's) hands what was current where the taken item was put, or
    ``None`` when that is unknown (a ``LifoQueue``, a ``PriorityQueue``, a subclass with its own
    ``_put``/``_get``), to the thread's :class:`_Serving`. Plain functions, not wrapt wrappers,
    because every queue operation pays for them: installed only once a thread started inside a
    run exists, they add well under a microsecond to a ``put`` and ``get``.
    """

    def __init__(self) -> None:
        self.active = True

    def around_put(self, put: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        """``Queue._put``: note what is current beside the item."""

        @functools.wraps(put)
        def _put(q: Any, item: Any) -> None:
            if not self.active:
                return put(q, item)
            try:
                items = self._items_of(q)
                put_in = _current_to_hand_over()
            except Exception as exc:
                _failed(exc)
                return put(q, item)
            put(q, item)
            if items is not None:
                items.put_in.append(put_in)

        return _put

    def around_take(self, take: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``Queue._get``: hand what was noted with the item to a thread started in a run."""

        @functools.wraps(take)
        def _get(q: Any) -> Any:
            if not self.active:
                return take(q)
            try:
                items = self._items_of(q)
            except Exception as exc:
                _failed(exc)
                return take(q)
            item = take(q)
            if items is not None:
                put_in = items.take_first()
                serving = _TAKING.serving
                if serving is not None:
                    serving.handed = put_in
            return item

        return _get

    def around_get(self, get: Callable[..., Any]) -> Callable[..., Any]:
        """``Queue.get``: a thread started inside a run works for whoever put the item."""

        @functools.wraps(get)
        def get_item(q: Any, *args: Any, **kwargs: Any) -> Any:
            serving = threading.current_thread().__dict__.get(_SERVING_ATTRIBUTE)
            if serving is None or not self.active:
                return get(q, *args, **kwargs)
            serving.handed = None
            _TAKING.serving = serving
            try:
                item = get(q, *args, **kwargs)
            finally:
                _TAKING.serving = None
            handed, serving.handed = serving.handed, None
            safe_call(serving.take, handed, default=None)
            return item

        return get_item

    def _items_of(self, q: Any) -> _QueueItems | None:
        """The queue's items, if crew_otel follows its order (looked at on first use)."""
        items = q.__dict__.get(_ITEMS_ATTRIBUTE)
        if items is not None and items.following is self:
            return items.in_step(len(q.queue)) if items.follows else None
        follows = _follows_order(type(q))  # new, or left by an earlier installation
        items = _QueueItems(self, len(q.queue) if follows else 0, follows)
        q.__dict__[_ITEMS_ATTRIBUTE] = items
        return items if follows else None


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


class CopiedContextSubmitHook:
    """Around the threading instrumentation's ``ThreadPoolExecutor.submit`` hook: work that
    runs in a context of its own goes to the pool without it.

    ``asyncio.to_thread`` (and ``loop.run_in_executor`` of a ``contextvars.copy_context().run``)
    submit ``functools.partial(ctx.run, func, ...)``; CrewAI's event bus submits
    ``ctx.run, handler, ...`` itself. Either way ``ctx`` was copied from the submitter's context
    just before, and the call runs in it, whatever context the pool's thread had: the
    instrumentation's attach and detach of the submitter's context around it change nothing the
    call sees. CrewAI submits every agent-executor step the first way (about 60 per kickoff of a
    2-task crew) and every event with a synchronous handler the second (about 20). Other
    submissions go through the instrumentation as before.
    """

    def __init__(self) -> None:
        self.active = True

    def __call__(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        # Inline (no helper call: about 100 submissions per kickoff): is the work
        # ``ctx.run`` of a ``contextvars.Context``, alone or in a ``functools.partial``? Only
        # built-in methods are looked into: no attribute look-up runs the application's code.
        if self.active and args:
            run: Any = args[0]
            if type(run) is functools.partial:
                run = run.func
            if (
                type(run) is _BUILTIN_METHOD
                and type(run.__self__) is contextvars.Context
                and run.__name__ == _CONTEXT_RUN_NAME
            ):
                below = getattr(wrapped, "__wrapped__", None)  # the instrumentation's original
                if below is not None:
                    return below(*args, **kwargs)
        return wrapped(*args, **kwargs)


_CONTEXT_RUN_NAME = contextvars.Context.run.__name__
_BUILTIN_METHOD: Any = types.BuiltinMethodType  # Any: mypy would narrow to object


def _threading_instrumentation_submit() -> Any:
    """``ThreadPoolExecutor.submit`` if it is the threading instrumentation's wrapper, else None."""
    from concurrent.futures import ThreadPoolExecutor

    submit = ThreadPoolExecutor.__dict__.get("submit")
    hook = internals.WRAPT_WRAPPER.read(submit)
    if isinstance(submit, wrapt.FunctionWrapper) and getattr(hook, "__module__", None) == (
        "opentelemetry.instrumentation.threading"
    ):
        return submit
    return None


#: A hook: it passes through once ``active`` is false.
_Hook = ThreadStartHook | PoolSubmitHook | QueueHooks | CopiedContextSubmitHook


class ThreadContextHooks:
    """Installs and removes the hooks of this module, around the threading instrumentation.

    ``instrumentation`` is the threading instrumentation to install first and remove last, or
    ``None`` when the application (or ``opentelemetry-instrument``) owns it.
    """

    def __init__(self, instrumentation: Any = None) -> None:
        self._instrumentation = instrumentation
        #: The functions these hooks replaced (``crew-otel doctor`` lists them).
        self.hook_set = HookSet("threads")
        #: The hooks installed, switched off (``active = False``) at removal.
        self._hooks: list[_Hook] = []
        self._timer_had_start = True
        self._lock = threading.Lock()
        self._active = False
        self._pools_hooked = False
        self._queues_hooked = False

    def install(self, tracer_provider: Any = None) -> None:
        """Install the threading instrumentation (if given), then hook around it.

        Hooked: ``Thread.start``, ``Timer.start`` when the instrumentation gave ``Timer`` one of
        its own (else a ``Timer`` would bypass the ``Thread.start`` hook), the ``ThreadPool``
        submission methods: now if ``multiprocessing.pool`` is imported, else when the first
        pool starts its threads (importing it here would cost every application start-up), and
        ``queue.Queue`` (:class:`QueueHooks`) when the first thread bound to a run starts: an
        application whose runs start no threads pays nothing per queue operation.
        """
        if self._instrumentation is not None:
            self._timer_had_start = "start" in threading.Timer.__dict__
            self._instrumentation.instrument(tracer_provider=tracer_provider)
        self._active = True
        if _threading_instrumentation_submit() is not None:
            from concurrent.futures import ThreadPoolExecutor

            submit_hook = CopiedContextSubmitHook()
            safe_call(self._wrap, ThreadPoolExecutor, "submit", submit_hook, default=None)
        start_hook = ThreadStartHook(self._hook_pools, self._hook_queues)
        safe_call(self._wrap, threading.Thread, "start", start_hook, default=None)
        if "start" in threading.Timer.__dict__:
            timer_hook = ThreadStartHook(self._hook_pools, self._hook_queues)
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

    def _hook_queues(self) -> None:
        """Hook ``queue.Queue`` (once): a thread bound to a run exists from now on."""
        if self._queues_hooked:
            return
        with self._lock:
            if self._queues_hooked or not self._active:
                return
            self._queues_hooked = True
            hooks = QueueHooks()
            for name, build in (
                ("_put", hooks.around_put),
                ("_get", hooks.around_take),
                ("get", hooks.around_get),
            ):
                safe_call(self._wrap, queue.Queue, name, hooks, build, default=None)

    def _wrap(
        self,
        owner: Any,
        name: str,
        hook: _Hook,
        build: Callable[[Any], Callable[..., Any]] | None = None,
    ) -> None:
        """Replace ``owner.name`` with ``build(original)``, by default a wrapt wrapper calling
        ``hook``; either passes through once ``hook.active`` is false."""
        key = f"{owner.__name__}.{name}"
        if build is None:
            installed = self.hook_set.wrap(owner, name, cast(Callable[..., Any], hook), key=key)
        else:
            installed = self.hook_set.replace(owner, name, build, key=key)
        if installed is None:
            _logger.debug("crew_otel: %s not found or already hooked; not hooked", key)
            return
        self._hooks.append(hook)

    def uninstall(self) -> None:
        """Restore every original; a hook someone wrapped on top of stays, passing through.

        Ours go first: the instrumentation's ``unwrap`` takes off whatever wrapper is outermost.
        """
        with self._lock:
            self._active = False
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook.active = False
        self.hook_set.remove_all()
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
