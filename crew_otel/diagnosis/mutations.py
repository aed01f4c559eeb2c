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
import threading
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
    """What one code object does with state outside its frame: its writes, and the names it
    loads that may lead to the user's own functions (followed as calls)."""

    mutations: frozenset[Mutation]
    """Writes rooted at a global name (``("COUNTS",)``, ``("Registry", "items")``)."""
    loaded_globals: frozenset[str]
    self_attributes: frozenset[str]
    self_mutations: frozenset[tuple[str, ...]] = frozenset()
    """Writes through the first argument (``self.rows.append`` is ``("rows",)``; ``()`` is
    ``self`` itself)."""
    cell_mutations: frozenset[tuple[str, ...]] = frozenset()
    """Writes through a closure variable (``items.append`` is ``("items",)``)."""
    loaded_attributes: frozenset[tuple[str, str]] = frozenset()
    """``(global, attribute)`` pairs loaded: ``helpers.save``, ``STORE.record``."""


_EMPTY_SCAN = Scan(frozenset(), frozenset(), frozenset())
_scans: weakref.WeakKeyDictionary[types.CodeType, Scan] = weakref.WeakKeyDictionary()

#: Where a stack slot's value came from: ``(root, *path)`` with root a global name, ``_SELF``
#: (the first argument) or ``_CELL`` followed by a closure variable's name; None: elsewhere.
_Origin = tuple[str, ...] | None
_SELF = "<self>"
_CELL = "<cell>"
#: Functions that change their first argument (by their last dotted name).
MUTATING_FUNCTIONS = frozenset(
    {
        "heappush",
        "heappop",
        "heapify",
        "heapreplace",
        "heappushpop",
        "insort",
        "insort_left",
        "insort_right",
        "shuffle",
        "setattr",
        "delattr",
    }
)
_CALLS = frozenset(
    {"CALL", "CALL_FUNCTION", "CALL_METHOD", "PRECALL", "CALL_KW", "CALL_FUNCTION_KW"}
)


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


class _Found:
    """What the walker collects for one code object."""

    def __init__(self) -> None:
        self.mutations: set[Mutation] = set()
        self.loaded: set[str] = set()
        self.self_attributes: set[str] = set()
        self.self_mutations: set[tuple[str, ...]] = set()
        self.cell_mutations: set[tuple[str, ...]] = set()
        self.loaded_attributes: set[tuple[str, str]] = set()

    def mutate(self, origin: _Origin, rebinds: bool = False) -> None:
        if not origin:
            return
        path = _strip_items(origin)
        if path[0] == _SELF:
            self.self_mutations.add(path[1:])
        elif path[0] == _CELL:
            if len(path) > 1:
                self.cell_mutations.add(path[1:])
        else:
            self.mutations.add(Mutation(path, rebinds))


def _scan(code: types.CodeType) -> Scan:
    found = _Found()
    _walk(code, found)
    mutations, loaded = set(found.mutations), set(found.loaded)
    attributes = set(found.loaded_attributes)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            inner = scan_code(const)
            mutations |= inner.mutations
            loaded |= inner.loaded_globals
            attributes |= inner.loaded_attributes
    return Scan(
        frozenset(mutations),
        frozenset(loaded),
        frozenset(found.self_attributes),
        frozenset(found.self_mutations),
        frozenset(found.cell_mutations),
        frozenset(attributes),
    )


def _walk(code: types.CodeType, found: _Found) -> None:
    stack: list[_Origin] = []
    self_name = code.co_varnames[0] if code.co_argcount else None
    local_origins: dict[str, _Origin] = {}
    previous = ""

    def pop(n: int) -> list[_Origin]:
        taken = stack[-n:] if n else []
        del stack[len(stack) - len(taken) :]
        return [None] * (n - len(taken)) + taken

    def peek(depth: int) -> _Origin:
        return stack[-depth] if len(stack) >= depth else None

    def load_local(local: str) -> _Origin:
        if local == self_name:
            return (_SELF,)
        return local_origins.get(local)

    def store_local(local: str, origin: _Origin) -> None:
        if local == self_name:
            return
        local_origins[local] = origin

    for ins in dis.get_instructions(code):
        name = ins.opname
        if name in ("LOAD_GLOBAL", "LOAD_NAME"):
            found.loaded.add(ins.argval)
            _push(stack, ins, (ins.argval,))
        elif name in ("STORE_GLOBAL", "DELETE_GLOBAL"):
            found.mutate((ins.argval,), rebinds=True)
            _apply_effect(stack, ins)
        elif name in ("LOAD_ATTR", "LOAD_METHOD"):
            origin = peek(1)
            attr = ins.argval
            if origin == (_SELF,):
                found.self_attributes.add(attr)
            elif origin and len(origin) == 1 and origin[0] not in (_SELF, _CELL):
                found.loaded_attributes.add((origin[0], attr))
            if attr in MUTATING_METHODS:
                found.mutate(origin)
            pop(1)
            _push(stack, ins, (*origin, attr) if origin else None)
        elif name in ("LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_AND_CLEAR"):
            _push(stack, ins, load_local(ins.argval))
        elif name == "LOAD_FAST_LOAD_FAST":
            first, second = ins.argval
            stack.extend([load_local(first), load_local(second)])
        elif name in ("STORE_FAST", "DELETE_FAST"):
            store_local(ins.argval, pop(1)[0] if name == "STORE_FAST" else None)
        elif name == "STORE_FAST_STORE_FAST":
            first, second = ins.argval
            store_local(first, pop(1)[0])
            store_local(second, pop(1)[0])
        elif name == "STORE_FAST_LOAD_FAST":
            first, second = ins.argval
            store_local(first, pop(1)[0])
            stack.append(load_local(second))
        elif name in ("LOAD_DEREF", "LOAD_CLASSDEREF"):
            cell = ins.argval
            _push(stack, ins, (_SELF,) if cell == self_name else (_CELL, cell))
        elif name in ("STORE_SUBSCR", "DELETE_SUBSCR"):
            found.mutate(peek(2))
            _apply_effect(stack, ins)
        elif name == "STORE_SLICE":
            found.mutate(peek(3))
            _apply_effect(stack, ins)
        elif name in ("STORE_ATTR", "DELETE_ATTR"):
            found.mutate(peek(1))
            _apply_effect(stack, ins)
        elif name == "BINARY_SUBSCR":
            container = pop(2)[0]
            stack.append((*container, _ITEM) if container else None)
        elif name in _CALLS:
            if not (name == "CALL" and previous == "PRECALL"):
                _note_mutating_call(stack, ins, found)
            _apply_effect(stack, ins)
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
        previous = name


def _note_mutating_call(stack: list[_Origin], ins: dis.Instruction, found: _Found) -> None:
    """``heapq.heappush(HEAP, x)``, ``setattr(CONFIG, "mode", v)``: the first argument of a
    function known to change it is written (the callable sits just below the arguments)."""
    argc = ins.arg or 0
    top = 1 if ins.opname.endswith("_KW") else 0  # the keyword names' tuple
    if argc < 1 or len(stack) < argc + top + 1:
        return
    first = stack[-(argc + top)]
    callables = stack[-(argc + top + 2) : -(argc + top)]
    if any(c and c[-1] in MUTATING_FUNCTIONS for c in callables):
        found.mutate(first)


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
#: Where a write's path starts: a global of the function's module, a class-level attribute of
#: the tool's class reached through ``self``, or a closure variable of the function.
ROOT_GLOBAL = "global"
ROOT_TOOL_CLASS = "tool_class"
ROOT_CELL = "cell"


class GlobalWrite(NamedTuple):
    """A global that tool code writes (or, in :attr:`ToolGlobals.loads`, uses), resolvable at
    call time to the object it changes."""

    label: str
    """``module.NAME`` (and ``.attr`` for a class-level or module-object attribute)."""
    namespace: dict[str, Any]
    """The globals of the function that writes (where ``path[0]`` is looked up)."""
    path: tuple[str, ...]
    rebinds: bool
    root: str = ROOT_GLOBAL
    cell: types.CellType | None = None
    """The closure cell ``path[0]`` names (``root == ROOT_CELL``)."""

    def target(self, tool: object = None) -> object | None:
        """The identity that decides sharing right now: the mutated object, or for a
        rebinding the binding itself (its namespace); ``None`` if it does not resolve without
        running the application's code, or is per thread (``threading.local``).
        ``tool`` is the tool instance (for class-level state written through ``self``)."""
        if self.rebinds:
            return self.namespace
        obj: object
        if self.root == ROOT_CELL:
            try:
                obj = self.cell.cell_contents if self.cell is not None else _MISSING
            except ValueError:  # an empty cell
                return None
        elif self.root == ROOT_TOOL_CLASS:
            obj = _class_level(tool, self.path[0])
        else:
            obj = self.namespace.get(self.path[0], _MISSING)
        for attr in self.path[1:]:
            if obj is _MISSING or isinstance(obj, threading.local):
                return None
            obj = static_attribute(obj, attr)
        if obj is _MISSING or isinstance(obj, threading.local):
            return None
        return obj


def _class_level(tool: object, name: str) -> object:
    """``tool.name`` if it is the class's attribute (shared by every instance), else _MISSING
    (the instance's own attribute is per request when the tool is)."""
    shared = _class_attribute(type(tool), name)
    if shared is None:
        return _MISSING
    return shared if static_attribute(tool, name) is shared else _MISSING


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
    if not isinstance(
        value, (types.FunctionType, types.BuiltinFunctionType, staticmethod, classmethod)
    ) and hasattr(type(value), "__get__"):
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


#: Top-level packages that are never the application's: CrewAI and crew_otel themselves.
_NEVER_APPLICATION = frozenset({"crewai", "crewai_tools", "crew_otel", "opentelemetry"})


def top_package(module: object) -> str:
    """``app`` for ``app.tools.search`` ('' for a name that is not a string)."""
    return module.partition(".")[0] if isinstance(module, str) else ""


def application_package(module: object) -> str | None:
    """The top-level package of ``module`` if it may be the application's (not the standard
    library, CrewAI or crew_otel): the package that defines a tool is the application's
    wherever it is installed."""
    top = top_package(module)
    if not top or top in sys.stdlib_module_names or top in _NEVER_APPLICATION:
        return None
    return top


def is_user_code(
    code: types.CodeType, module: str = "", apps: frozenset[str] = frozenset()
) -> bool:
    """Code of the application: in one of the application packages ``apps`` (wherever they
    are installed), or anywhere but the standard library and installed packages."""
    top = top_package(module)
    if top in _NEVER_APPLICATION or top in sys.stdlib_module_names:
        return False
    if top and top in apps:
        return True
    filename = code.co_filename
    if not filename or filename.startswith("<"):
        return False
    return not filename.startswith(_library_paths())


class ToolGlobals(NamedTuple):
    """What tool code does with state outside its calls: the objects it mutates, and the
    globals it loads that hold an object (not a module, class or function), each resolvable at
    call time (a shared connection or open file is used through method calls, not writes)."""

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

#: What ``self`` stands for in a function reached from tool code: the tool instance (its
#: class-level attributes are shared state), a module-level object (``STORE.record(x)``:
#: ``(namespace, path)`` of the global), or nothing known.
_Binding = tuple[str, Any, tuple[str, ...]] | None


def tool_globals(
    function: Callable[..., Any],
    owner: type | None = None,
    depth: int = DEFAULT_DEPTH,
    app_packages: frozenset[str] = frozenset(),
) -> ToolGlobals:
    """The global writes and object loads of ``function`` and of the user's own functions and
    methods it calls, followed ``depth`` calls deep. ``owner`` is the tool's class (``self``
    in ``function``). The package that defines ``function`` (or ``owner``) is the
    application's, as are ``app_packages``, wherever they are installed."""
    apps = set(app_packages)
    for defined_in in (getattr(function, "__module__", None), getattr(owner, "__module__", None)):
        package = application_package(defined_in)
        if package is not None:
            apps.add(package)
    binding: _Binding = (ROOT_TOOL_CLASS, owner, ()) if owner is not None else None
    writes: dict[tuple[Any, ...], GlobalWrite] = {}
    loads: dict[tuple[int, str], GlobalWrite] = {}
    seen: set[types.CodeType] = set()
    for fn, fn_binding in _reachable(function, binding, depth, seen, frozenset(apps)):
        for write in _writes_of(fn, fn_binding):
            key = (write.root, id(write.namespace), id(write.cell), write.path, write.rebinds)
            writes.setdefault(key, write)
        namespace = fn.__globals__
        module = namespace.get("__name__", "?")
        for name in scan_code(fn.__code__).loaded_globals:
            value = namespace.get(name, _MISSING)
            if value is _MISSING or isinstance(value, _CODE_OR_NAMESPACE):
                continue
            if (id(namespace), name) not in loads:
                loads[(id(namespace), name)] = GlobalWrite(
                    f"{module}.{name}", namespace, (name,), False
                )
    return ToolGlobals(list(writes.values()), list(loads.values()))


def _writes_of(fn: types.FunctionType, binding: _Binding) -> Iterator[GlobalWrite]:
    namespace = fn.__globals__
    module = namespace.get("__name__", "?")
    scan = scan_code(fn.__code__)
    for mutation in scan.mutations:
        label = f"{module}.{'.'.join(mutation.path)}"
        yield GlobalWrite(label, namespace, mutation.path, mutation.rebinds)
    for path in scan.self_mutations:
        if binding is None:
            continue
        kind, where, base = binding
        if kind == ROOT_TOOL_CLASS:
            if path:  # the instance's own attributes are per request when the tool is
                defining = next((k for k in where.__mro__ if path[0] in k.__dict__), where)
                label = f"{defining.__module__}.{defining.__qualname__}.{'.'.join(path)}"
                yield GlobalWrite(label, namespace, path, False, ROOT_TOOL_CLASS)
        else:
            full = base + path
            label = f"{where.get('__name__', '?')}.{'.'.join(full)}"
            yield GlobalWrite(label, where, full, False)
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=False))
    for path in scan.cell_mutations:
        cell = cells.get(path[0])
        if cell is not None:
            label = _cell_label(fn, path, cell)
            yield GlobalWrite(label, namespace, path, False, ROOT_CELL, cell)


def _cell_label(fn: types.FunctionType, path: tuple[str, ...], cell: types.CellType) -> str:
    """``module.NAME`` of the module global a closure captured, else the closure's name."""
    try:
        value = cell.cell_contents
    except ValueError:
        value = _MISSING
    namespace = fn.__globals__
    module = namespace.get("__name__", "?")
    if value is not _MISSING and not isinstance(value, _IMMUTABLE):
        for name, candidate in list(namespace.items()):
            if candidate is value:
                return ".".join((module, name, *path[1:]))
    return ".".join((module, fn.__qualname__, *path))


_IMMUTABLE = (int, float, complex, str, bytes, tuple, frozenset, bool, type(None))


def global_writes(
    function: Callable[..., Any], owner: type | None = None, depth: int = DEFAULT_DEPTH
) -> list[GlobalWrite]:
    """The global writes of ``function`` and of the user's own functions and methods it
    loads, followed ``depth`` calls deep. ``owner`` is the class for ``self.method`` calls."""
    return tool_globals(function, owner, depth).writes


def _reachable(
    function: Callable[..., Any],
    binding: _Binding,
    depth: int,
    seen: set[types.CodeType],
    apps: frozenset[str],
) -> Iterator[tuple[types.FunctionType, _Binding]]:
    fn = _plain_function(function)
    if fn is None or fn.__code__ in seen:
        return
    if not is_user_code(fn.__code__, fn.__globals__.get("__name__", ""), apps):
        return
    seen.add(fn.__code__)
    yield fn, binding
    if depth <= 0:
        return
    for callee, callee_binding in _callees(fn, binding):
        yield from _reachable(callee, callee_binding, depth - 1, seen, apps)


def _callees(fn: types.FunctionType, binding: _Binding) -> Iterator[tuple[Any, _Binding]]:
    """The functions ``fn`` may call: globals, ``module.function``, methods of module-level
    objects and of ``self``, and what a decorator wraps (``__wrapped__``, closure cells)."""
    scan = scan_code(fn.__code__)
    namespace = fn.__globals__
    for name in scan.loaded_globals:
        value = namespace.get(name)
        if isinstance(value, types.FunctionType):
            yield value, None
    for name, attr in scan.loaded_attributes:
        value = namespace.get(name, _MISSING)
        if value is _MISSING or isinstance(value, (types.FunctionType, types.MethodType)):
            continue
        if isinstance(value, types.ModuleType):
            member = static_attribute(value, attr)
            if isinstance(member, types.FunctionType):
                yield member, None
        elif isinstance(value, type):
            member = _class_attribute(value, attr)
            if isinstance(member, (types.FunctionType, staticmethod, classmethod)):
                yield member, None
        else:
            member = _class_attribute(type(value), attr)
            if isinstance(member, types.FunctionType):
                yield member, (ROOT_GLOBAL, namespace, (name,))
    wrapped = fn.__dict__.get("__wrapped__")
    if wrapped is not None:
        yield wrapped, binding
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, types.FunctionType):
            yield value, binding
    if binding is not None and scan.self_attributes:
        self_type = _bound_type(binding)
        if self_type is not None:
            for name in scan.self_attributes:
                value = _class_attribute(self_type, name)
                if isinstance(value, types.FunctionType):
                    yield value, binding


def _bound_type(binding: _Binding) -> type | None:
    """The class of what ``self`` stands for."""
    if binding is None:
        return None
    kind, where, path = binding
    if kind == ROOT_TOOL_CLASS:
        return where if isinstance(where, type) else None
    obj = where.get(path[0], _MISSING)
    for attr in path[1:]:
        obj = static_attribute(obj, attr)
    return None if obj is _MISSING else type(obj)


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
            wrapped = static_attribute(obj, "__wrapped__")
            if wrapped is _MISSING or wrapped is None:
                return None
            obj = wrapped
    return None
