"""Whether crew_otel's accessors of private internals (:mod:`crew_otel.internals`) still resolve
on the installed versions: ``crew-otel doctor`` and the tests, never the instrumentation's hot
path.

Checking imports the modules it inspects (CrewAI, the SDK), reads their source (a message text is
still there, an attribute is still assigned on ``self``) and builds real sample objects (an event
loop, a batch span processor, a wrapt wrapper) to read private attribute chains from.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import importlib
import importlib.machinery
import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from crew_otel.internals import (
    REGISTRY,
    AttributePath,
    CallerFunction,
    ClassNames,
    Internal,
    MessageText,
    Parameters,
    Part,
    PrivateAttribute,
    PrivateFunction,
    ReplacedFunction,
    TracerScope,
    installed_version,
    load,
)

__all__ = [
    "SAME_RESULT",
    "SAMPLES",
    "InternalStatus",
    "PartStatus",
    "check",
    "declares",
    "source_of",
    "statuses",
]

_logger = logging.getLogger("crew_otel.internals")


class PartStatus:
    """Whether one part resolves on the installed version, and whether it is declared absent."""

    __slots__ = ("declared_missing", "resolved", "where")

    def __init__(self, where: str, resolved: bool, declared_missing: bool) -> None:
        self.where = where
        self.resolved = resolved
        self.declared_missing = declared_missing

    def __repr__(self) -> str:
        return (
            f"PartStatus({self.where!r}, resolved={self.resolved}, "
            f"declared_missing={self.declared_missing})"
        )

    @property
    def as_declared(self) -> bool:
        """The part is present exactly when it is not declared missing in this version."""
        return self.resolved != self.declared_missing


class InternalStatus:
    """The result of :meth:`Internal.check`."""

    __slots__ = ("checked_on", "distribution", "name", "parts", "version", "what")

    def __init__(
        self,
        name: str,
        what: str,
        distribution: str,
        version: str | None,
        checked_on: tuple[str, ...],
        parts: tuple[PartStatus, ...],
    ) -> None:
        self.name = name
        self.what = what
        self.distribution = distribution
        #: The installed version of ``distribution`` (None: not installed).
        self.version = version
        self.checked_on = checked_on
        self.parts = parts

    def __repr__(self) -> str:
        return f"InternalStatus({self.name!r}, ok={self.ok}, parts={self.parts!r})"

    @property
    def ok(self) -> bool:
        """Every part expected in this version resolves (an internal whose parts are all
        declared missing in this version is fine: the diagnosis does not exist here)."""
        return all(p.resolved for p in self.parts if not p.declared_missing)

    @property
    def detail(self) -> str:
        """The parts that do not resolve, or those resolving against their declaration."""
        missing = [p.where for p in self.parts if not p.resolved and not p.declared_missing]
        if missing:
            return "not found: " + ", ".join(missing)
        surprising = [p.where for p in self.parts if not p.as_declared]
        if surprising:
            return "declared missing here but present: " + ", ".join(surprising)
        if not any(p.resolved for p in self.parts):
            return "not in this version (declared)"
        return ", ".join(p.where for p in self.parts if p.resolved)


@functools.singledispatch
def resolves(internal: Internal, part: Part) -> bool:
    """Whether ``part`` of ``internal`` exists on the installed versions (may import, raise)."""
    raise NotImplementedError(f"no check for {type(internal).__name__}")


@resolves.register
def _(internal: PrivateAttribute, part: Part) -> bool:
    cls = load(part.where)
    return isinstance(cls, type) and declares(cls, internal.attribute)


@resolves.register
def _(internal: AttributePath, part: Part) -> bool:
    with SAMPLES[internal.sample]() as obj:
        return internal.read(obj) is not None


@resolves.register
def _(internal: MessageText, part: Part) -> bool:
    return internal.text in source_of(part.where)


@resolves.register
def _(internal: ClassNames, part: Part) -> bool:
    return isinstance(load(part.where), type)


@resolves.register
def _(internal: TracerScope, part: Part) -> bool:
    # Its tracer is named after the instrumentation module.
    return re.search(r"get_tracer\(\s*__name__", source_of(part.where)) is not None


@resolves.register
def _(internal: PrivateFunction, part: Part) -> bool:
    return callable(load(part.where))


@resolves.register
def _(internal: ReplacedFunction, part: Part) -> bool:
    function = load(part.where)
    if not callable(function):
        return False
    if internal.same_result is not None:
        return SAME_RESULT[internal.same_result](function)
    if internal.consumer is None:
        return False
    # Every call (not the definition) hands the result straight to the consumer.
    source = source_of(internal.module)
    calls = len(re.findall(rf"(?<!def ){re.escape(internal.function)}\(", source))
    consumed = len(
        re.findall(rf"{re.escape(internal.consumer)}\(\s*{re.escape(internal.function)}\(", source)
    )
    return calls > 0 and calls == consumed


@resolves.register
def _(internal: CallerFunction, part: Part) -> bool:
    importlib.import_module(part.where.partition(":")[0])
    return internal.code() is not None


@resolves.register
def _(internal: Parameters, part: Part) -> bool:
    return part.where in internal.signature().parameters


def check(internal: Internal) -> InternalStatus:
    """Whether each part of ``internal`` resolves on the installed versions; never raises."""
    version = installed_version(internal.distribution)
    parts = []
    for part in internal.parts:
        try:
            resolved = bool(resolves(internal, part))
        except Exception:  # an import error, a changed class: it does not resolve
            _logger.debug("internal %s: %s does not resolve", internal.name, part, exc_info=True)
            resolved = False
        parts.append(PartStatus(part.where, resolved, version in part.missing_in))
    return InternalStatus(
        internal.name,
        internal.what,
        internal.distribution,
        version,
        internal.checked_on,
        tuple(parts),
    )


def statuses(registry: tuple[Internal, ...] = REGISTRY) -> list[InternalStatus]:
    """:func:`check` of every internal (imports CrewAI and the SDK)."""
    return [check(internal) for internal in registry]


def source_of(module: str) -> str:
    """The source text of ``module``, found on its package's path (CrewAI rewrites the
    ``__name__``/``__spec__`` of some modules, so ``sys.modules`` may point elsewhere)."""
    parent, _, leaf = module.rpartition(".")
    if parent:
        path = getattr(importlib.import_module(parent), "__path__", None)
        spec = importlib.machinery.PathFinder.find_spec(leaf, path) if path else None
    else:
        spec = importlib.machinery.PathFinder.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return ""
    with open(spec.origin, encoding="utf-8") as handle:
        return handle.read()


def declares(cls: type, attribute: str) -> bool:
    """Whether ``cls`` declares ``attribute``: a pydantic private attribute or field, a class
    attribute, an annotation, a slot, or an assignment ``self.<attribute> =`` in its source."""
    if attribute in (getattr(cls, "__private_attributes__", None) or {}):
        return True
    if attribute in (getattr(cls, "model_fields", None) or {}):
        return True
    for klass in cls.__mro__:
        if klass is object:
            continue
        if attribute in vars(klass) or attribute in getattr(klass, "__annotations__", {}):
            return True
        if attribute in (getattr(klass, "__slots__", None) or ()):
            return True
        try:
            source = source_of(klass.__module__)
        except (ImportError, OSError, ValueError):  # a base class without readable source
            continue
        if _assigned_on_self(source, klass.__name__, attribute):
            return True
    return False


def _assigned_on_self(source: str, class_name: str, attribute: str) -> bool:
    """Whether a method of ``class_name`` in ``source`` assigns ``self.<attribute>``."""
    if attribute not in source:
        return False
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return any(
                isinstance(target, ast.Attribute)
                and isinstance(target.ctx, ast.Store)
                and isinstance(target.value, ast.Name)
                and target.value.id == "self"
                and target.attr == attribute
                for target in ast.walk(node)
            )
    return False


@contextmanager
def loop_with_default_executor() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(executor)
    try:
        yield loop
    finally:
        executor.shutdown(wait=False)
        loop.close()


@contextmanager
def batch_span_processor() -> Iterator[Any]:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    processor = BatchSpanProcessor(InMemorySpanExporter())
    try:
        yield processor
    finally:
        processor.shutdown()  # type: ignore[no-untyped-call]


@contextmanager
def function_wrapper() -> Iterator[Any]:
    import wrapt

    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        return wrapped(*args, **kwargs)

    yield wrapt.FunctionWrapper(len, wrapper)


def request_parameters(extract: Callable[..., Any]) -> bool:
    """``_extract_parameters`` of the httpx instrumentation returns, for a request, its own
    method (encoded), headers, stream and extensions and a URL equal to its own (parsed again
    from its text, credentials kept): what crew_otel's replacement returns without the parse."""
    httpx: Any = None
    for name in ("httpx", "httpx2"):
        try:
            httpx = importlib.import_module(name)
            break
        except ImportError:
            continue
    if httpx is None:
        return False
    request = httpx.Request(
        "POST",
        "http://user:secret@127.0.0.1:8080/v1/chat/completions?a=1&b=%20#part",
        headers={"X-Sample": "1"},
        content=b"{}",
    )
    method, url, headers, stream, extensions = extract((request,), {}, httpx)
    return bool(
        method == request.method.encode()
        and isinstance(url, httpx.URL)
        and str(url) == str(request.url)
        and headers is request.headers
        and stream is request.stream
        and extensions is request.extensions
    )


#: The checkers :class:`~crew_otel.internals.ReplacedFunction` accessors name (``same_result``):
#: each calls the installed function on a sample and compares with what the replacement returns.
SAME_RESULT: dict[str, Callable[[Callable[..., Any]], bool]] = {
    "request_parameters": request_parameters,
}


#: The sample builders :class:`~crew_otel.internals.AttributePath` accessors name.
SAMPLES: dict[str, Callable[[], AbstractContextManager[Any]]] = {
    "loop_with_default_executor": loop_with_default_executor,
    "batch_span_processor": batch_span_processor,
    "function_wrapper": function_wrapper,
}
