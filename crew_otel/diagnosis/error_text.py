"""The text recorded for an exception: its message, its stack trace and the span status.

Error texts are not content, but libraries put content into them: pydantic quotes the value
that failed validation (``input_value='<the model's whole answer>'``), so a completion that
fails structured-output parsing would be copied into the status and exception event of every
span the error passes through. With content capture off (the default) such parts are replaced
with ``<omitted>``; the exception type, where it was raised (the stack frames) and the rest of
the message stay. With capture on they are kept. Secrets (API keys, bearer tokens, passwords)
are redacted either way.

Every function here takes hostile exceptions: a ``__str__`` that raises gives an empty message,
never an error.
"""

from __future__ import annotations

import re
import traceback

from crew_otel.content import redact

#: Longest exception message / stack trace recorded (the end of a long trace is kept).
MAX_EXCEPTION_TEXT = 16384
MAX_STATUS_DESCRIPTION = 256
#: How many chained exceptions (``__cause__``/``__context__``) a stack trace shows.
MAX_CHAIN = 32
OMITTED = "<omitted>"

# pydantic (v2) always writes ``input_value=<repr>, input_type=<type>``; the repr may contain
# anything, including commas and brackets, so the value runs up to ``, input_type=``.
_PYDANTIC_INPUT = re.compile(r"input_value=.*?(?=, input_type=)", re.DOTALL)
# pydantic v1 / other validators: ``(type=value_error; input=...)`` style is rarer; the v2 form
# above is what CrewAI's structured outputs, tool arguments and guardrails produce.
_CONTENT_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (_PYDANTIC_INPUT, f"input_value={OMITTED}"),
)

_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, or ``""`` when its ``__str__`` raises."""
    try:
        text = str(exc)
    except Exception:
        return ""
    return text if isinstance(text, str) else ""


def strip_content(text: str) -> str:
    """Replace the parts of an error text that quote inputs or outputs (see module doc)."""
    for pattern, replacement in _CONTENT_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def clean(text: str, capture_content: bool) -> str:
    """Redact secrets, and (unless ``capture_content``) strip content."""
    return redact(text if capture_content else strip_content(text))


def type_name(exc: BaseException) -> str:
    """The exception's class, qualified by its module unless it is a builtin."""
    cls = type(exc)
    module = getattr(cls, "__module__", None)
    name = getattr(cls, "__qualname__", None) or cls.__name__
    return name if module in (None, "builtins", "__main__") else f"{module}.{name}"


def message(exc: BaseException, capture_content: bool) -> str:
    """The exception's message as recorded."""
    return clean(safe_str(exc)[:MAX_EXCEPTION_TEXT], capture_content)


def status_description(exc: BaseException, capture_content: bool) -> str:
    """Short span status description: ``"ClassName: message"`` (cut)."""
    return describe(exc, message(exc, capture_content))


def describe(exc: BaseException, text: str) -> str:
    """``"ClassName: text"`` cut for a span status (``text``: the message as recorded)."""
    name = type(exc).__qualname__
    described = f"{name}: {text}" if text else name
    return described[:MAX_STATUS_DESCRIPTION]


def stacktrace(exc: BaseException, capture_content: bool) -> str:
    """The whole chain's stack trace as Python prints it, messages cleaned (the end is kept)."""
    if capture_content:
        try:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        except Exception:
            text = _format_chain(exc, capture_content)
    else:
        text = _format_chain(exc, capture_content)
    return redact(text[-MAX_EXCEPTION_TEXT:])


def _chain(exc: BaseException) -> list[tuple[BaseException, str]]:
    """The exceptions Python prints for ``exc``, oldest first, each with the line after it."""
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen and len(chain) < MAX_CHAIN:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    chain.reverse()
    return chain


def _format_chain(exc: BaseException, capture_content: bool) -> str:
    parts: list[str] = []
    for current, link_after in _chain(exc):
        tb = current.__traceback__
        if tb is not None:
            parts.append("Traceback (most recent call last):\n")
            try:
                parts.extend(traceback.format_tb(tb))
            except Exception:
                parts.append("  <stack frames unavailable>\n")
        text = strip_content(safe_str(current)) if not capture_content else safe_str(current)
        name = type_name(current)
        parts.append(f"{name}: {text}\n" if text else f"{name}\n")
        parts.append(link_after)
    return "".join(parts)
