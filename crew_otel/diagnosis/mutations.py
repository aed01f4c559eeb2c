"""Which module-level and class-level objects a function mutates, read from its bytecode.

Tool code that mutates a module global (``COUNTS["n"] += 1``, ``CACHE[k] = v``,
``items.append(x)``, ``global x; x = ...``, ``config.flag = True``) shares that state between
every request that runs the tool. This module finds those writes once per code object, by a
small abstract interpretation of the bytecode that follows where each stack slot came from
(a global, an attribute of a global, an item of one), and records a mutation when such a slot is
the target of a store, a delete, or a call of a mutating method. Reads are never mutations.

The analysis is an over-approximation on purpose only where it costs nothing to be right
elsewhere: straight-line code is followed exactly, and at a jump target the stack is kept as it
was (enough for the expressions Python compiles into straight lines, which is where these
writes live). It never raises: code it cannot follow yields no mutation.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import inspect
import sys
import sysconfig
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

#: Method names that change the object they are called on (list, dict, set, deque, bytearray).
MUTATING_METHODS = frozenset(
    {
        "append",
        "appendleft",
        "extend",
        "extendleft",
        "insert",
        "pop",
        "popleft",
        "popitem",
        "remove",
        "clear",
        "update",
        "setdefault",
        "add",
        "discard",
        "sort",
        "reverse",
        "rotate",
        "__setitem__",
        "__delitem__",
        "__iadd__",
        "__ior__",
    }
)

#: How deep calls from tool code into the user's own functions are followed.
DEFAULT_DEPTH = 3

_ITEM = "[]"


class Mutation(NamedTuple):
    """One write found in code: ``path`` starts at a global name (``("COUNTS",)``,
    ``("Registry", "items")``); ``rebinds`` is True for ``global x; x = ...``."""

    path: tuple[str, ...]
    rebinds: bool


class Scan(NamedTuple):
    """What one code object does with globals: its writes, and the global and ``self``
    attribute names it loads (candidates for calls into the user's own functions)."""

    mutations: frozenset[Mutation]
    loaded_globals: frozenset[str]
    self_attributes: frozenset[str]


_EMPTY_SCAN = Scan(frozenset(), frozenset(), frozenset())
_scans: weakref.WeakKeyDictionary[types.CodeType, Scan] = weakref.WeakKeyDictionary()

_Origin = tuple[str, ...] | None


def scan_code(code: types.CodeType) -> Scan:
    """The writes to globals in ``code`` and in the functions, lambdas and comprehensions
    defined inside it (cached per code object; never raises)."""
    cached = _scans.get(code)
    if cached is not None:
        return cached
    try:
        scan = _scan(code)
    except Exception:  # bytecode of a version this walker does not know: see nothing
        scan = _EMPTY_SCAN
    with contextlib.suppress(TypeError):  # a code object without weak references
        _scans[code] = scan
    return scan


def _scan(code: types.CodeType) -> Scan:
    mutations: set[Mutation] = set()
    loaded: set[str] = set()
    self_attributes: set[str] = set()
    _walk(code, mutations, loaded, self_attributes)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            inner = scan_code(const)
            mutations |= inner.mutations
            loaded |= inner.loaded_globals
    return Scan(frozenset(mutations), frozenset(loaded), frozenset(self_attributes))


def _walk(
    code: types.CodeType,
    mutations: set[Mutation],
    loaded: set[str],
    self_attributes: set[str],
) -> None:
    stack: list[_Origin] = []
    self_name = code.co_varnames[0] if code.co_argcount else None

    def pop(n: int) -> list[_Origin]:
        taken = stack[-n:] if n else []
        del stack[len(stack) - len(taken) :]
        return [None] * (n - len(taken)) + taken

    def peek(depth: int) -> _Origin:
        return stack[-depth] if len(stack) >= depth else None

    def mutate(origin: _Origin) -> None:
        if origin:
            mutations.add(Mutation(_strip_items(origin), False))

    for ins in dis.get_instructions(code):
        name = ins.opname
        if name in ("LOAD_GLOBAL", "LOAD_NAME"):
            loaded.add(ins.argval)
            _push(stack, ins, (ins.argval,))
        elif name in ("STORE_GLOBAL", "DELETE_GLOBAL"):
            mutations.add(Mutation((ins.argval,), True))
            _apply_effect(stack, ins)
        elif name in ("LOAD_ATTR", "LOAD_METHOD"):
            origin = peek(1)
            attr = ins.argval
            if stack and stack[-1] == ("<self>",):
                self_attributes.add(attr)
            if attr in MUTATING_METHODS:
                mutate(_global_only(origin))
            pop(1)
            _push(stack, ins, (*origin, attr) if origin and origin != ("<self>",) else None)
        elif name in ("LOAD_FAST", "LOAD_DEREF", "LOAD_FAST_CHECK"):
            _push(stack, ins, ("<self>",) if ins.argval == self_name and self_name else None)
        elif name in ("STORE_SUBSCR", "DELETE_SUBSCR"):
            mutate(_global_only(peek(2)))
            _apply_effect(stack, ins)
        elif name == "STORE_SLICE":
            mutate(_global_only(peek(3)))
            _apply_effect(stack, ins)
        elif name in ("STORE_ATTR", "DELETE_ATTR"):
            mutate(_global_only(peek(1)))
            _apply_effect(stack, ins)
        elif name == "BINARY_SUBSCR":
            container = _global_only(pop(2)[0])
            stack.append((*container, _ITEM) if container else None)
        elif name == "COPY":
            stack.append(peek(ins.arg or 1))
        elif name == "DUP_TOP":
            stack.append(peek(1))
        elif name == "DUP_TOP_TWO":
            stack.extend([peek(2), peek(1)])
        elif name == "SWAP":
            _swap(stack, ins.arg or 2)
        elif name == "ROT_TWO":
            _rotate(stack, 2)
        elif name == "ROT_THREE":
            _rotate(stack, 3)
        elif name == "ROT_FOUR":
            _rotate(stack, 4)
        elif name == "ROT_N":
            _rotate(stack, ins.arg or 2)
        else:
            _apply_effect(stack, ins)


def _global_only(origin: _Origin) -> _Origin:
    return None if origin == ("<self>",) else origin


def _strip_items(path: tuple[str, ...]) -> tuple[str, ...]:
    """``COUNTS[...][...]`` mutates something inside ``COUNTS``: name the global."""
    if _ITEM in path:
        path = path[: path.index(_ITEM)]
    return path


def _push(stack: list[_Origin], ins: dis.Instruction, origin: _Origin) -> None:
    """Push what ``ins`` pushes, all slots marked with ``origin`` (a NULL beside a loaded
    callable is never the target of a store, so marking it too is harmless)."""
    pushed = _effect(ins) + (1 if ins.opname in ("LOAD_ATTR", "LOAD_METHOD") else 0)
    stack.extend([origin] * max(pushed, 0))


def _apply_effect(stack: list[_Origin], ins: dis.Instruction) -> None:
    effect = _effect(ins)
    if effect < 0:
        del stack[max(len(stack) + effect, 0) :]
    else:
        stack.extend([None] * effect)


def _effect(ins: dis.Instruction) -> int:
    if ins.opcode < dis.HAVE_ARGUMENT:
        return dis.stack_effect(ins.opcode)
    return dis.stack_effect(ins.opcode, ins.arg or 0, jump=False)


def _swap(stack: list[_Origin], n: int) -> None:
    if len(stack) >= n:
        stack[-1], stack[-n] = stack[-n], stack[-1]


def _rotate(stack: list[_Origin], n: int) -> None:
    if len(stack) >= n:
        stack[-n:] = [stack[-1], *stack[-n:-1]]


# --- from functions to the objects they mutate ----------------------------------------------
class GlobalWrite(NamedTuple):
    """A global that tool code writes (or, in :attr:`ToolGlobals.loads`, uses), resolvable at
    call time to the object it changes."""

    label: str
    """``module.NAME`` (and ``.attr`` for a class-level or module-object attribute)."""
    namespace: dict[str, Any]
    """The globals of the function that writes (where ``path[0]`` is looked up)."""
    path: tuple[str, ...]
    rebinds: bool

    def target(self) -> object | None:
        """The identity that decides sharing right now: the mutated object, or for a
        rebinding the binding itself (its namespace); ``None`` if it does not resolve."""
        if self.rebinds:
            return self.namespace
        obj: object = self.namespace.get(self.path[0], _MISSING)
        if obj is _MISSING:
            return None
        for attr in self.path[1:]:
            obj = static_attribute(obj, attr)
            if obj is _MISSING:
                return None
        return obj


#: Descriptors implemented in C that read a slot or a field without running Python code.
_PLAIN_DESCRIPTORS = (types.MemberDescriptorType, types.GetSetDescriptorType)


def static_attribute(obj: object, name: str) -> object:
    """``obj.name`` without running the application's code: no property, ``__getattr__`` or
    other descriptor of a class written in Python is evaluated (such an attribute, like a
    missing one, is ``_MISSING``: the write cannot be resolved without running user code)."""
    try:
        value = inspect.getattr_static(obj, name)
    except AttributeError:
        return _MISSING
    if isinstance(value, _PLAIN_DESCRIPTORS):
        try:
            return value.__get__(obj, type(obj))
        except Exception:
            return _MISSING
    if isinstance(value, (property, functools.cached_property)):
        return _MISSING
    if not isinstance(value, (types.FunctionType, types.BuiltinFunctionType)) and hasattr(
        type(value), "__get__"
    ):
        return _MISSING  # a descriptor of the application's: reading it would run its code
    return value


_MISSING = object()


@functools.cache
def _library_paths() -> tuple[str, ...]:
    """Where the standard library and installed packages live (code there is not the app's)."""
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    roots.update(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))
    return tuple(sorted(r for r in roots if r))


def is_user_code(code: types.CodeType) -> bool:
    """Code of the application, not of the standard library or an installed package."""
    filename = code.co_filename
    if not filename or filename.startswith("<"):
        return False
    return not filename.startswith(_library_paths())


class ToolGlobals(NamedTuple):
    """What tool code does with module globals: the objects it mutates, and the globals it
    loads that hold an object (not a module, class or function), each resolvable at call time
    (a shared connection or open file is used through method calls, which are not writes)."""

    writes: list[GlobalWrite]
    loads: list[GlobalWrite]


#: Globals that name code or a namespace, never state a tool holds.
_CODE_OR_NAMESPACE = (
    types.ModuleType,
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    staticmethod,
    classmethod,
)


def tool_globals(
    function: Callable[..., Any], owner: type | None = None, depth: int = DEFAULT_DEPTH
) -> ToolGlobals:
    """The global writes and object loads of ``function`` and of the user's own functions and
    methods it loads, followed ``depth`` calls deep. ``owner`` is the class for
    ``self.method`` calls."""
    writes: dict[tuple[int, tuple[str, ...], bool], GlobalWrite] = {}
    loads: dict[tuple[int, str], GlobalWrite] = {}
    seen: set[types.CodeType] = set()
    for fn in _reachable(function, owner, depth, seen):
        namespace = fn.__globals__
        module = namespace.get("__name__", "?")
        scan = scan_code(fn.__code__)
        for mutation in scan.mutations:
            key = (id(namespace), mutation.path, mutation.rebinds)
            if key not in writes:
                label = f"{module}.{'.'.join(mutation.path)}"
                writes[key] = GlobalWrite(label, namespace, mutation.path, mutation.rebinds)
        for name in scan.loaded_globals:
            value = namespace.get(name, _MISSING)
            if value is _MISSING or isinstance(value, _CODE_OR_NAMESPACE):
                continue
            if (id(namespace), name) not in loads:
                loads[(id(namespace), name)] = GlobalWrite(
                    f"{module}.{name}", namespace, (name,), False
                )
    return ToolGlobals(list(writes.values()), list(loads.values()))


def global_writes(
    function: Callable[..., Any], owner: type | None = None, depth: int = DEFAULT_DEPTH
) -> list[GlobalWrite]:
    """The global writes of ``function`` and of the user's own functions and methods it
    loads, followed ``depth`` calls deep. ``owner`` is the class for ``self.method`` calls."""
    return tool_globals(function, owner, depth).writes


def _reachable(
    function: Callable[..., Any], owner: type | None, depth: int, seen: set[types.CodeType]
) -> Iterator[types.FunctionType]:
    fn = _plain_function(function)
    if fn is None or fn.__code__ in seen or not is_user_code(fn.__code__):
        return
    seen.add(fn.__code__)
    yield fn
    if depth <= 0:
        return
    scan = scan_code(fn.__code__)
    for name in scan.loaded_globals:
        value = fn.__globals__.get(name)
        if isinstance(value, types.FunctionType):
            yield from _reachable(value, None, depth - 1, seen)
    if owner is not None:
        for name in scan.self_attributes:
            value = _class_attribute(owner, name)
            if value is not None:
                yield from _reachable(value, owner, depth - 1, seen)


def _class_attribute(owner: type, name: str) -> Any:
    for klass in owner.__mro__:
        value = klass.__dict__.get(name)
        if value is not None:
            return value
    return None


def _plain_function(obj: Any) -> types.FunctionType | None:
    for _ in range(8):  # unwrap staticmethod/classmethod/functools.wraps chains, bounded
        if isinstance(obj, types.FunctionType):
            return obj
        if isinstance(obj, (types.MethodType, staticmethod, classmethod)):
            obj = obj.__func__
        else:
            wrapped = getattr(obj, "__wrapped__", None)
            if wrapped is None:
                return None
            obj = wrapped
    return None
