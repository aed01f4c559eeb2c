"""Which globals tool code writes, read from its bytecode (the ``global`` kind of shared state)."""

from __future__ import annotations

import json
import types
from typing import Any

from crew_otel.diagnosis.mutations import Mutation, global_writes, scan_code

COUNTS: dict[str, int] = {"n": 0}
CACHE: dict[str, Any] = {}
ITEMS: list[Any] = []
CONFIG = {"limit": 3}
LAST = None


class Registry:
    entries: list[Any] = []


class Settings:
    verbose = False


SETTINGS = Settings()


def writes_everything(key: str, value: Any) -> None:
    global LAST  # noqa: PLW0603 - the pattern under test
    COUNTS["n"] += 1
    CACHE[key] = value
    ITEMS.append(value)
    LAST = value
    Registry.entries.append(value)
    SETTINGS.verbose = True
    del CACHE[key]


def only_reads(key: str) -> Any:
    local: dict[str, Any] = {}
    local[key] = CONFIG["limit"]
    local.update(CONFIG)
    found = CACHE.get(key)
    print(len(ITEMS), Registry.entries, SETTINGS.verbose, json.dumps(CONFIG))
    return [item for item in ITEMS if item], found


def make_per_request_tool() -> Any:
    state = {"n": 0}
    items: list[Any] = []

    def tool(value: Any) -> None:
        state["n"] += 1
        items.append(value)

    return tool


def _helper(value: Any) -> None:
    CACHE["helper"] = value


def _deeper(value: Any) -> None:
    _helper(value)


def calls_helpers(value: Any) -> str:
    _deeper(value)
    return json.dumps(value)  # a library function: not followed


def nested_function_writes() -> Any:
    return lambda v: ITEMS.append(v)  # noqa: PLW0108 - a nested code object


class LedgerTool:
    def _run(self, value: Any) -> None:
        self.seen = value  # the instance's own state
        self._save(value)

    def _save(self, value: Any) -> None:
        COUNTS[value] = 1


def paths(writes: list) -> set[str]:
    return {w.label.rsplit(".", 1)[-1] if "." in w.label else w.label for w in writes}


def test_every_write_pattern_is_found() -> None:
    found = scan_code(writes_everything.__code__).mutations
    assert found == {
        Mutation(("COUNTS",), False),
        Mutation(("CACHE",), False),
        Mutation(("ITEMS",), False),
        Mutation(("LAST",), True),
        Mutation(("Registry", "entries"), False),
        Mutation(("SETTINGS",), False),
    }


def test_reads_and_closures_are_not_writes() -> None:
    assert scan_code(only_reads.__code__).mutations == frozenset()
    assert scan_code(make_per_request_tool().__code__).mutations == frozenset()


def test_labels_and_targets_resolve_to_the_objects() -> None:
    writes = {w.label: w for w in global_writes(writes_everything)}
    assert set(writes) == {
        f"{__name__}.{name}"
        for name in ("COUNTS", "CACHE", "ITEMS", "LAST", "Registry.entries", "SETTINGS")
    }
    assert writes[f"{__name__}.COUNTS"].target() is COUNTS
    assert writes[f"{__name__}.Registry.entries"].target() is Registry.entries
    assert writes[f"{__name__}.LAST"].rebinds


def test_the_users_own_calls_are_followed_to_a_bounded_depth() -> None:
    assert {w.label for w in global_writes(calls_helpers)} == {f"{__name__}.CACHE"}
    assert global_writes(calls_helpers, depth=1) == []  # _deeper is 1 call, _helper 2
    assert {w.label for w in global_writes(LedgerTool._run, LedgerTool)} == {f"{__name__}.COUNTS"}
    assert {w.label for w in global_writes(nested_function_writes)} == {f"{__name__}.ITEMS"}


def test_library_code_is_not_the_applications() -> None:
    assert global_writes(json.dumps) == []


def test_never_raises_on_odd_code() -> None:
    odd = types.FunctionType(compile("x = 1\ndel x", "<odd>", "exec"), {})
    assert scan_code(odd.__code__).mutations == frozenset()
    assert global_writes(len) == []  # a builtin has no bytecode
    assert global_writes(object()) == []  # type: ignore[arg-type]
