"""OTLP/JSON for traces: write it (an exporter) and read it back (for ``crew-otel report``).

The file format is the one the OpenTelemetry Collector's ``file`` exporter writes: one
``ExportTraceServiceRequest`` JSON object per line (``{"resourceSpans": [...]}``), trace and span
IDs as hex strings, times as strings of Unix nanoseconds, attributes as typed ``AnyValue``s. The
reader also accepts a whole file holding one such object (pretty-printed) and base64 IDs (what
a protobuf-to-JSON conversion without the OTLP rules produces).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import itertools
import json
import logging
import os
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode

try:
    import fcntl
except ImportError:  # Windows: O_APPEND alone
    fcntl = None  # type: ignore[assignment]

_logger = logging.getLogger("crew_otel")

_KIND = {
    SpanKind.INTERNAL: 1,
    SpanKind.SERVER: 2,
    SpanKind.CLIENT: 3,
    SpanKind.PRODUCER: 4,
    SpanKind.CONSUMER: 5,
}
_KIND_NAMES = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {StatusCode.UNSET: 0, StatusCode.OK: 1, StatusCode.ERROR: 2}
_STATUS_NAMES = {0: "UNSET", 1: "OK", 2: "ERROR"}


class OtlpJsonError(ValueError):
    """The input is not readable OTLP/JSON trace data (the message says why, in one line)."""


# --- writing ---------------------------------------------------------------------------------


def _any_value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, (list, tuple)):
        return {"arrayValue": {"values": [_any_value(v) for v in value]}}
    return {"stringValue": str(value)}


def _attributes(attributes: Any) -> list[dict[str, Any]]:
    return [{"key": k, "value": _any_value(v)} for k, v in (attributes or {}).items()]


def _span(span: ReadableSpan) -> dict[str, Any]:
    context = span.context
    encoded: dict[str, Any] = {
        "traceId": f"{context.trace_id:032x}",
        "spanId": f"{context.span_id:016x}",
        "name": span.name,
        "kind": _KIND.get(span.kind, 1),
        "startTimeUnixNano": str(span.start_time or 0),
        "endTimeUnixNano": str(span.end_time or 0),
        "attributes": _attributes(span.attributes),
        "events": [
            {
                "timeUnixNano": str(event.timestamp),
                "name": event.name,
                "attributes": _attributes(event.attributes),
            }
            for event in span.events
        ],
        "status": {"code": _STATUS[span.status.status_code]},
    }
    if span.parent is not None:
        encoded["parentSpanId"] = f"{span.parent.span_id:016x}"
    if span.status.description:
        encoded["status"]["message"] = span.status.description
    return encoded


def encode(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """An ``ExportTraceServiceRequest`` as OTLP/JSON, grouped by resource and scope."""
    by_resource: dict[int, tuple[Any, dict[tuple[str, str], list[ReadableSpan]]]] = {}
    for span in spans:
        entry = by_resource.setdefault(id(span.resource), (span.resource, {}))
        scope = span.instrumentation_scope
        key = (scope.name if scope else "", (scope.version or "") if scope else "")
        entry[1].setdefault(key, []).append(span)
    resource_spans = []
    for resource, scopes in by_resource.values():
        resource_spans.append(
            {
                "resource": {"attributes": _attributes(resource.attributes if resource else {})},
                "scopeSpans": [
                    {
                        "scope": {"name": name, "version": version},
                        "spans": [_span(s) for s in scope_spans],
                    }
                    for (name, version), scope_spans in scopes.items()
                ],
            }
        )
    return {"resourceSpans": resource_spans}


#: Where :class:`OTLPJsonFileExporter` writes when no path is given (``OTEL_TRACES_EXPORTER=
#: crew_otel_file`` under ``opentelemetry-instrument`` or ``configure()``).
TRACES_FILE_ENV = "CREW_OTEL_TRACES_FILE"
DEFAULT_TRACES_FILE = "crew-otel-traces.jsonl"


class OTLPJsonFileExporter(SpanExporter):
    """Appends each exported batch to a file as one OTLP/JSON line (Collector file format).

    Several processes (web server workers) may append to one file: each line is written with
    one ``write`` on a file opened with ``O_APPEND``, under an exclusive ``flock`` where the
    platform has it, so lines never interleave. Without ``path`` the file is
    ``$CREW_OTEL_TRACES_FILE``, else ``crew-otel-traces.jsonl`` in the working directory.

    Missing parent directories are created. A file that still cannot be opened (the path is a
    directory, has a regular file as a directory part, or is in a read-only directory) never
    raises: it is one error log line naming ``setting`` (what the user set, e.g.
    ``trace_file``) and the path, and the exporter drops every batch, so the application and
    its other exporters go on.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, setting: str | None = None
    ) -> None:
        configured = os.environ.get(TRACES_FILE_ENV) if path is None else path
        self._path = Path(configured or DEFAULT_TRACES_FILE)
        self._lock = threading.Lock()
        self._write_failed = False
        self._fd: int | None = _open_for_append(self._path, setting or _setting(path))

    @property
    def path(self) -> Path:
        """The file the spans go to."""
        return self._path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._fd is None:  # the file could not be opened (logged once) or is closed
            return SpanExportResult.FAILURE
        line = (json.dumps(encode(spans), separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            if self._fd is None:
                return SpanExportResult.FAILURE
            try:
                _append(self._fd, line)
            except OSError as exc:
                self._report_write_failure(exc)
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _report_write_failure(self, exc: OSError) -> None:
        if not self._write_failed:
            self._write_failed = True
            _logger.error(
                "crew_otel: writing the trace file %s failed (%s); the spans of every failed "
                "write are dropped (logged once)",
                self._path,
                exc.strerror or type(exc).__name__,
            )

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _setting(path: str | os.PathLike[str] | None) -> str:
    """What the user set to name the trace file, for the error line."""
    if path is not None:
        return "OTLPJsonFileExporter(path)"
    if os.environ.get(TRACES_FILE_ENV):
        return TRACES_FILE_ENV
    return f"no {TRACES_FILE_ENV}: the default in the working directory"


_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


def _open_for_append(path: Path, setting: str) -> int | None:
    """``path`` opened for appending, its missing parent directories created; None (after one
    error line naming ``setting`` and the path) when that fails."""
    try:
        return os.open(path, _APPEND_FLAGS, 0o644)
    except FileNotFoundError:
        pass  # a missing directory: create it below
    except OSError as exc:
        _report_unwritable(path, setting, _reason(exc))
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, _APPEND_FLAGS, 0o644)
    except OSError as exc:
        _report_unwritable(path, setting, f"cannot create its directory: {_reason(exc)}")
        return None


def _reason(exc: OSError) -> str:
    if isinstance(exc, IsADirectoryError):
        return "it is a directory"
    if isinstance(exc, NotADirectoryError):
        return "a part of its path is a file, not a directory"
    return exc.strerror or type(exc).__name__


def _report_unwritable(path: Path, setting: str, reason: str) -> None:
    _logger.error(
        "crew_otel: cannot write the trace file %s (%s): %s; no spans are written to it, "
        "the application and the other exporters go on",
        path,
        setting,
        reason,
    )


def _append(fd: int, data: bytes) -> None:
    """Append ``data`` as one record: one ``write`` under an exclusive lock where available."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        view = memoryview(data)
        while view:  # a regular file takes it in one write; loop only on a short write
            view = view[os.write(fd, view) :]
    finally:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)


# --- reading ---------------------------------------------------------------------------------


@dataclasses.dataclass
class SpanRecord:
    """One span read from OTLP/JSON (the report's input)."""

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: str
    start: int
    end: int
    status: str
    attributes: dict[str, Any]
    events: list[tuple[str, int, dict[str, Any]]]
    service: str
    #: The process that made the span (resource ``service.instance.id``, else ``process.pid``;
    #: empty when the resource does not say).
    process: str = ""


def _id(raw: object, length: int) -> str:
    what = "trace" if length == 32 else "span"
    if not isinstance(raw, str) or not raw:
        raise OtlpJsonError(f"missing {what} ID")
    text = raw.lower()
    if len(text) == length and all(c in "0123456789abcdef" for c in text):
        return text
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise OtlpJsonError(f"invalid {what} ID") from None
    if len(decoded) * 2 != length:
        raise OtlpJsonError(f"invalid {what} ID")
    return decoded.hex()


def _value(value: Any) -> Any:
    if not isinstance(value, dict) or not value:
        return None
    (kind, raw), *_ = value.items()
    if kind == "intValue":
        return int(raw)
    if kind == "doubleValue":
        return float(raw)
    if kind == "arrayValue":
        return tuple(_value(v) for v in (raw or {}).get("values", []))
    if kind == "kvlistValue":
        return {kv.get("key"): _value(kv.get("value")) for kv in (raw or {}).get("values", [])}
    return raw


def _attrs(items: Any) -> dict[str, Any]:
    if not isinstance(items, list):
        return {}
    return {
        item["key"]: _value(item.get("value"))
        for item in items
        if isinstance(item, dict) and "key" in item
    }


def _kind(raw: Any) -> str:
    if isinstance(raw, int):
        return _KIND_NAMES.get(raw, "INTERNAL")
    if isinstance(raw, str):
        return raw.removeprefix("SPAN_KIND_") or "INTERNAL"
    return "INTERNAL"


def _status(raw: Any) -> str:
    code = raw.get("code", 0) if isinstance(raw, dict) else 0
    if isinstance(code, int):
        return _STATUS_NAMES.get(code, "UNSET")
    return str(code).removeprefix("STATUS_CODE_") or "UNSET"


def _records(request: Any) -> list[SpanRecord]:
    """The spans of one ``ExportTraceServiceRequest``, all or none.

    Raises:
        OtlpJsonError: why the request is not usable (a reason, never the input's content).
    """
    if not isinstance(request, dict) or "resourceSpans" not in request:
        raise OtlpJsonError("not OTLP trace data (no resourceSpans)")
    resource_spans = request["resourceSpans"]
    if not isinstance(resource_spans, list):
        raise OtlpJsonError("resourceSpans is not a list")
    try:
        return list(_spans(resource_spans))
    except OtlpJsonError:
        raise
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        raise OtlpJsonError(f"malformed OTLP span data ({type(exc).__name__})") from None


def _spans(resource_spans: list[Any]) -> Iterator[SpanRecord]:
    for resource_span in resource_spans:
        resource = _attrs((resource_span.get("resource") or {}).get("attributes"))
        service = sys.intern(str(resource.get("service.name", "unknown_service")))
        process = sys.intern(
            str(resource.get("service.instance.id") or resource.get("process.pid") or "")
        )
        for scope_span in (
            resource_span.get("scopeSpans")
            or resource_span.get("instrumentationLibrarySpans")
            or []
        ):
            for span in scope_span.get("spans") or []:
                try:
                    start = int(span.get("startTimeUnixNano", 0))
                    end = int(span.get("endTimeUnixNano", 0))
                except (TypeError, ValueError):
                    raise OtlpJsonError("invalid span times") from None
                parent = span.get("parentSpanId")
                yield SpanRecord(
                    trace_id=_id(span.get("traceId"), 32),
                    span_id=_id(span.get("spanId"), 16),
                    parent_id=_id(parent, 16) if parent else None,
                    name=sys.intern(str(span.get("name", ""))),
                    kind=_kind(span.get("kind")),
                    start=start,
                    end=end,
                    status=_status(span.get("status")),
                    attributes=_attrs(span.get("attributes")),
                    events=[
                        (
                            str(e.get("name", "")),
                            int(e.get("timeUnixNano", 0)),
                            _attrs(e.get("attributes")),
                        )
                        for e in span.get("events") or []
                    ],
                    service=service,
                    process=process,
                )


#: How many skipped lines a message names by number (the rest are counted).
MAX_NAMED_LINES = 10
#: A file whose first non-blank line is exactly this is one pretty-printed document.
_DOCUMENT_START = b"{"
#: A JSON-lines file none of whose lines parsed is tried as one document up to this size.
MAX_DOCUMENT_BYTES = 256 * 1024 * 1024
_NOT_JSON = "not valid JSON (truncated or corrupt?)"
_BINARY = "binary data, not UTF-8 text"


@dataclasses.dataclass
class ReadLog:
    """What reading a trace file kept and what it skipped (filled in while reading).

    A line (one ``ExportTraceServiceRequest``) is used whole or skipped whole: a line cut off
    by a crash, a full disk or a copy of a file being written, or any other unreadable line.
    Messages name a skipped line by number and reason, never by content.
    """

    source: str
    lines: int = 0
    """Non-blank lines (documents) read."""
    spans: int = 0
    skipped: int = 0
    named: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    """(line number, reason) of the first :data:`MAX_NAMED_LINES` skipped lines."""

    def skip(self, line_number: int, reason: str) -> None:
        self.skipped += 1
        if len(self.named) < MAX_NAMED_LINES:
            self.named.append((line_number, reason))

    def skipped_lines(self) -> str:
        """``not valid JSON (...) at lines 3, 884; and 2 more lines``: reasons with the numbers
        of the lines they apply to (the first :data:`MAX_NAMED_LINES` skipped lines)."""
        by_reason: dict[str, list[int]] = {}
        for number, reason in self.named:
            by_reason.setdefault(reason, []).append(number)
        parts = [
            f"{reason} at line{'s' if len(numbers) > 1 else ''} "
            + ", ".join(str(n) for n in numbers)
            for reason, numbers in by_reason.items()
        ]
        more = self.skipped - len(self.named)
        if more:
            parts.append(f"and {more} more line{'' if more == 1 else 's'}")
        return "; ".join(parts)

    def warning(self) -> str | None:
        """The one-line warning when lines were skipped but spans were read, else ``None``."""
        if not self.skipped or not self.spans:
            return None
        return (
            f"{self.source}: skipped {self.skipped} of {self.lines} lines, the report covers "
            f"the rest: {self.skipped_lines()}"
        )

    def unusable(self) -> OtlpJsonError | None:
        """The error when nothing usable was read, else ``None``."""
        if self.spans:
            return None
        if not self.lines:
            return OtlpJsonError(f"{self.source}: empty file, no spans")
        if not self.skipped:
            return OtlpJsonError(f"{self.source}: no spans in the file")
        if self.skipped == self.lines and {reason for _, reason in self.named} == {_BINARY}:
            return OtlpJsonError(f"{self.source}: not a text file")
        return OtlpJsonError(
            f"{self.source}: no usable spans, skipped {self.skipped} of {self.lines} lines: "
            f"{self.skipped_lines()}"
        )


def _decode(raw: bytes | str) -> Any:
    """One JSON value from one line (raises OtlpJsonError with a reason)."""
    if isinstance(raw, bytes) and b"\0" in raw:
        raise OtlpJsonError(_BINARY)
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise OtlpJsonError(_BINARY) from None
    except (json.JSONDecodeError, RecursionError):
        raise OtlpJsonError(_NOT_JSON) from None


def iter_lines(lines: Iterable[bytes | str], log: ReadLog) -> Iterator[SpanRecord]:
    """The spans of OTLP/JSON lines, one ``ExportTraceServiceRequest`` per line, streamed.

    An unusable line is skipped (counted in ``log``); blank lines are ignored. A pretty-printed
    document (first non-blank line ``{``), or a file none of whose lines is JSON, is read as one
    document. Nothing is kept once yielded, so memory does not grow with the input.

    Raises:
        OtlpJsonError: the SDK's console exporter output (not OTLP/JSON).
    """
    numbered = ((n, line) for n, line in enumerate(lines, 1) if line.strip())
    head: list[tuple[int, bytes | str]] = list(itertools.islice(numbered, _CONSOLE_HEAD_LINES))
    texts = [
        line.decode("utf-8", "replace") if isinstance(line, bytes) else line for _, line in head
    ]
    if _is_console_output(texts):
        raise OtlpJsonError(f"{log.source}: {_CONSOLE_OUTPUT}")
    if texts and texts[0].strip() == _DOCUMENT_START.decode():
        yield from _document([line for _, line in head], numbered, log)
        return
    for number, line in itertools.chain(head, numbered):
        log.lines += 1
        try:
            records = _records(_decode(line))
        except OtlpJsonError as exc:
            log.skip(number, str(exc))
            continue
        log.spans += len(records)
        yield from records


def _document(
    head: list[bytes | str], rest: Iterator[tuple[int, bytes | str]], log: ReadLog
) -> Iterator[SpanRecord]:
    """The spans of one pretty-printed document (read whole: such files are small)."""
    parts = [*head, *(line for _, line in rest)]
    text = b"".join(p if isinstance(p, bytes) else p.encode() for p in parts)
    log.lines = 1
    if b"\0" in text:
        raise OtlpJsonError(f"{log.source}: not a text file")
    try:
        document = json.loads(text)
    except UnicodeDecodeError:
        raise OtlpJsonError(f"{log.source}: not a text file") from None
    except json.JSONDecodeError as exc:
        raise OtlpJsonError(f"{log.source}: {_NOT_JSON} at line {exc.lineno}") from None
    except RecursionError:
        raise OtlpJsonError(f"{log.source}: {_NOT_JSON}") from None
    try:
        records = _records(document)
    except OtlpJsonError as exc:
        raise OtlpJsonError(f"{log.source}: {exc}") from None
    log.spans = len(records)
    yield from records


_CONSOLE_HEAD_LINES = 12
_CONSOLE_OUTPUT = (
    "this is the SDK's console exporter output (OTEL_TRACES_EXPORTER=console), "
    "not OTLP/JSON; write a trace file with OTEL_TRACES_EXPORTER=crew_otel_file "
    f"(file: ${TRACES_FILE_ENV}) or crew_otel.configure(trace_file=...), "
    "or use the Collector's file exporter"
)


def _is_console_output(text_lines: Sequence[str]) -> bool:
    """``ConsoleSpanExporter`` prints each span as a pretty-printed JSON object with a
    ``"context"`` holding ``0x``-prefixed IDs (``ReadableSpan.to_json()``)."""
    head = "".join(text_lines[:_CONSOLE_HEAD_LINES])
    return head.lstrip().startswith("{") and '"context": {' in head and '"trace_id": "0x' in head


def _as_document(path: Path, log: ReadLog) -> list[SpanRecord]:
    """A file none of whose lines is JSON, parsed as one document when it is one (a
    pretty-printer that does not put ``{`` alone on the first line); else nothing."""
    if log.spans or not log.skipped or log.skipped != log.lines:
        return []
    if any(reason != _NOT_JSON for _, reason in log.named):
        return []
    if path.stat().st_size > MAX_DOCUMENT_BYTES:
        return []
    try:
        records = _records(json.loads(path.read_bytes()))
    except (OtlpJsonError, ValueError, RecursionError):
        return []
    log.lines, log.skipped, log.named, log.spans = 1, 0, [], len(records)
    return records


def iter_file(path: str | Path, log: ReadLog | None = None) -> Iterator[SpanRecord]:
    """Stream the spans of an OTLP/JSON trace file (see :func:`iter_lines`), skipping and
    counting unusable lines in ``log``; check ``log.unusable()`` once it is consumed.

    Raises:
        OtlpJsonError: the file cannot be opened or read, or is console exporter output.
    """
    file_path = Path(path)
    log = log if log is not None else ReadLog(str(file_path))
    try:
        with file_path.open("rb") as handle:
            yield from iter_lines(handle, log)
        yield from _as_document(file_path, log)
    except OSError as exc:
        raise OtlpJsonError(f"{file_path}: {exc.strerror or exc}") from None


def read_requests(lines: Iterable[bytes | str], source: str) -> list[SpanRecord]:
    """Parse OTLP/JSON (JSON lines, or one pretty-printed document) into span records,
    skipping unusable lines.

    Raises:
        OtlpJsonError: nothing usable: empty input, no spans, or no readable line.
    """
    log = ReadLog(source)
    records = list(iter_lines(lines, log))
    error = log.unusable()
    if error is not None:
        raise error
    return records


def read_file(path: str | Path, log: ReadLog | None = None) -> list[SpanRecord]:
    """Read an OTLP/JSON trace file into a list (see :func:`iter_file`); unusable lines are
    skipped and counted in ``log``.

    Raises:
        OtlpJsonError: the file cannot be read, or holds no usable span.
    """
    log = log if log is not None else ReadLog(str(path))
    records = list(iter_file(path, log))
    error = log.unusable()
    if error is not None:
        raise error
    return records
