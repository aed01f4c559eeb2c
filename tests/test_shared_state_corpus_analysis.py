"""The corpus's bytecode analysis without CrewAI: the part that differs between interpreters.

For every shape of ``tests/shared_state_corpus/shapes.py`` whose shared thing is found in the
code (a ``global`` write, a ``resource`` held in a module global), the analysis of its tool
code finds that name and resolves it to an object without running the application's code; it
never raises on any shape. Runs on any Python the package supports, with only the packages
crew_otel's analysis imports (see ``docs/shared-state.md`` for the command).
"""

from __future__ import annotations

import types

import pytest

from crew_otel.diagnosis.mutations import tool_globals
from tests.shared_state_corpus import shapes
from tests.shared_state_corpus.shapes import SHAPES, Shape

#: Shapes named from the environment's contents at run time, not by a label in the code.
_RUNTIME_NAMED = {"os.environ write"}


def analysed(shape: Shape) -> tuple[set[str], set[str]]:
    """(labels of the writes that resolve to an object, labels of the globals loaded)."""
    if shape.tool_class is not None:
        found = tool_globals(shape.tool_class._run, shape.tool_class)
        instance = object.__new__(shape.tool_class)
    else:
        function = shape.make(0)
        assert isinstance(function, types.FunctionType)
        found = tool_globals(function)
        instance = None
    writes = {w.label for w in found.writes if w.target(instance) is not None}
    return writes, {load.label for load in found.loads}


@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_analysis_finds_each_shapes_name(shape: Shape) -> None:
    writes, loads = analysed(shape)
    if shape.kind == "global" and shape.id not in _RUNTIME_NAMED:
        assert shape.expected_name() in writes, sorted(writes)
    elif shape.kind == "global":
        assert f"{shapes.M}.os.environ" in writes, sorted(writes)  # named by variable later
    elif shape.kind == "resource" and shape.tool_class is None:
        holder = str(shape.expected_name()).split(" at ", 1)[1]
        assert holder in loads, sorted(loads)


def test_correct_shapes_yield_no_write_to_module_state_they_only_read() -> None:
    writes, _ = analysed(next(s for s in SHAPES if s.id == "read-only config"))
    assert writes == set()
    writes, _ = analysed(next(s for s in SHAPES if s.id == "reads module list"))
    assert writes == set()
    assert shapes.M == "tests.shared_state_corpus.shapes"
