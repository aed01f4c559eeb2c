"""Callgrind client requests from Python, without a compiler or a Python binding.

A Valgrind client request is a fixed x86-64 instruction sequence (four ``rol`` of ``%rdi``
that add up to a no-op, then ``xchg %rbx,%rbx``) with ``%rax`` pointing at the request and
its arguments; outside Valgrind it does nothing and returns the default (0). The sequence is
copied into an executable page and called through ``ctypes``. Request numbers are those of
``valgrind.h`` and ``callgrind.h``.

Only x86-64 Linux is supported; elsewhere :func:`running_on_valgrind` returns 0 and the
requests do nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from collections.abc import Callable

#: mov %rdi,%rax; xor %edx,%edx; rol $3,$13,$61,$51 %rdi; xchg %rbx,%rbx; mov %rdx,%rax; ret
_CODE = bytes.fromhex(
    "4889f8"  # mov %rdi,%rax: the request block
    "31d2"  # xor %edx,%edx: the default result
    "48c1c703"  # rol $3,%rdi
    "48c1c70d"  # rol $13,%rdi
    "48c1c73d"  # rol $61,%rdi
    "48c1c733"  # rol $51,%rdi
    "4887db"  # xchg %rbx,%rbx: the client request
    "4889d0"  # mov %rdx,%rax
    "c3"  # ret
)
RUNNING_ON_VALGRIND = 0x1001
_CALLGRIND_BASE = (ord("C") << 24) | (ord("T") << 16)
DUMP_STATS = _CALLGRIND_BASE
ZERO_STATS = _CALLGRIND_BASE + 1
TOGGLE_COLLECT = _CALLGRIND_BASE + 2
DUMP_STATS_AT = _CALLGRIND_BASE + 3
START_INSTRUMENTATION = _CALLGRIND_BASE + 4
STOP_INSTRUMENTATION = _CALLGRIND_BASE + 5

_Request = ctypes.Array[ctypes.c_uint64]
_call: Callable[[_Request], int] | None = None
_page: mmap.mmap | None = None  # kept alive: the code lives there


def _request_function() -> Callable[[_Request], int] | None:
    global _call, _page
    if _call is not None or platform.machine() not in ("x86_64", "AMD64"):
        return _call
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    prototype = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64))
    _page, _call = page, prototype(address)
    return _call


def request(code: int, *arguments: int) -> int:
    """Make client request ``code`` with up to five integer arguments; 0 outside Valgrind."""
    call = _request_function()
    if call is None:
        return 0
    block = (ctypes.c_uint64 * 6)(code, *arguments)
    return int(call(block))


def running_on_valgrind() -> int:
    """How many Valgrinds this process runs under (0: none)."""
    return request(RUNNING_ON_VALGRIND)


def dump_stats_at(label: str) -> None:
    """Write a profile dump of the costs since the last dump or zeroing, named ``label``."""
    text = ctypes.create_string_buffer(label.encode("ascii", "replace"))
    request(DUMP_STATS_AT, ctypes.addressof(text))


def zero_stats() -> None:
    request(ZERO_STATS)


def start_instrumentation() -> None:
    request(START_INSTRUMENTATION)


def stop_instrumentation() -> None:
    request(STOP_INSTRUMENTATION)
