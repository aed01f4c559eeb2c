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
import json
import os
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
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._path = Path(
            path if path is not None else os.environ.get(TRACES_FILE_ENV) or DEFAULT_TRACES_FILE
        )
        self._lock = threading.Lock()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self._fd: int | None = os.open(self._path, flags, 0o644)

    @property
    def path(self) -> Path:
        """The file the spans go to."""
        return self._path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        line = (json.dumps(encode(spans), separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            if self._fd is None:
                return SpanExportResult.FAILURE
            try:
                _append(self._fd, line)
            except OSError:
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


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

    @property
    def duration_s(self) -> float:
        return max(self.end - self.start, 0) / 1e9


def _id(raw: object, length: int, where: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise OtlpJsonError(f"{where}: missing {'trace' if length == 32 else 'span'} ID")
    text = raw.lower()
    if len(text) == length and all(c in "0123456789abcdef" for c in text):
        return text
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise OtlpJsonError(f"{where}: invalid ID {raw!r}") from None
    if len(decoded) * 2 != length:
        raise OtlpJsonError(f"{where}: invalid ID {raw!r}")
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


def _records(request: Any, where: str) -> Iterator[SpanRecord]:
    if not isinstance(request, dict) or "resourceSpans" not in request:
        raise OtlpJsonError(f"{where}: not OTLP trace data (no resourceSpans)")
    resource_spans = request["resourceSpans"]
    if not isinstance(resource_spans, list):
        raise OtlpJsonError(f"{where}: resourceSpans is not a list")
    for resource_span in resource_spans:
        resource = _attrs((resource_span.get("resource") or {}).get("attributes"))
        service = str(resource.get("service.name", "unknown_service"))
        process = str(resource.get("service.instance.id") or resource.get("process.pid") or "")
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
                    raise OtlpJsonError(f"{where}: invalid span times") from None
                parent = span.get("parentSpanId")
                yield SpanRecord(
                    trace_id=_id(span.get("traceId"), 32, where),
                    span_id=_id(span.get("spanId"), 16, where),
                    parent_id=_id(parent, 16, where) if parent else None,
                    name=str(span.get("name", "")),
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


def read_requests(lines: Iterable[str], source: str) -> list[SpanRecord]:
    """Parse OTLP/JSON (JSON lines, or one JSON document) into span records.

    Raises:
        OtlpJsonError: empty input, a truncated or invalid line, or JSON that is not OTLP.
    """
    text_lines = [line for line in lines if line.strip()]
    if not text_lines:
        raise OtlpJsonError(f"{source}: empty file, no spans")
    if _is_console_output(text_lines):
        raise OtlpJsonError(
            f"{source}: this is the SDK's console exporter output (OTEL_TRACES_EXPORTER=console), "
            "not OTLP/JSON; write a trace file with OTEL_TRACES_EXPORTER=crew_otel_file "
            f"(file: ${TRACES_FILE_ENV}) or crew_otel.configure(trace_file=...), "
            "or use the Collector's file exporter"
        )
    records: list[SpanRecord] = []
    try:
        documents = [(f"{source}:{n}", json.loads(line)) for n, line in enumerate(text_lines, 1)]
    except json.JSONDecodeError:
        try:  # one pretty-printed document
            documents = [(source, json.loads("".join(text_lines)))]
        except json.JSONDecodeError as exc:
            raise OtlpJsonError(
                f"{source}: not valid JSON (truncated or corrupt?) at line {exc.lineno}"
            ) from None
    for where, document in documents:
        try:
            records.extend(_records(document, where))
        except OtlpJsonError:
            raise
        except (AttributeError, TypeError, KeyError, ValueError) as exc:
            raise OtlpJsonError(
                f"{where}: malformed OTLP span data ({type(exc).__name__})"
            ) from None
    if not records:
        raise OtlpJsonError(f"{source}: no spans in the file")
    return records


def _is_console_output(text_lines: Sequence[str]) -> bool:
    """``ConsoleSpanExporter`` prints each span as a pretty-printed JSON object with a
    ``"context"`` holding ``0x``-prefixed IDs (``ReadableSpan.to_json()``)."""
    head = "".join(text_lines[:12])
    return head.lstrip().startswith("{") and '"context": {' in head and '"trace_id": "0x' in head


def read_file(path: str | Path) -> list[SpanRecord]:
    """Read an OTLP/JSON trace file (see :func:`read_requests`)."""
    file_path = Path(path)
    try:
        with file_path.open(encoding="utf-8") as handle:
            return read_requests(handle, str(file_path))
    except OSError as exc:
        raise OtlpJsonError(f"{file_path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise OtlpJsonError(f"{file_path}: not a text file") from None
