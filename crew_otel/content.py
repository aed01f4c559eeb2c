"""Turning user content (prompts, inputs, tool arguments and results) into safe attribute text.

Only used when content capture is on. Three pure steps, in this order:

1. :func:`to_text` renders any object with bounded work: strings as they are, bytes as a size,
   everything else with :mod:`reprlib` (bounded depth and width, so cyclic, huge or hostile
   objects - a ``__repr__`` that raises - cannot hang or break the call).
2. :func:`redact` replaces API keys, bearer tokens, passwords and credential-looking values.
3. :func:`truncate` cuts the result to the configured limit.

:func:`render` runs all three; redaction runs before truncation so a secret cannot be cut into a
shorter, unrecognised prefix.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable

REDACTED = "[REDACTED]"
TRUNCATION_MARK = "...[truncated]"

# Work window for redaction: a little more than the limit, so a secret straddling the cut is
# still matched whole before the final truncation removes the tail.
_REDACTION_MARGIN = 512

_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # OpenAI (sk-..., sk-proj-...), Anthropic (sk-ant-...) and similar "sk-" keys.
    (re.compile(r"(?<![A-Za-z])sk-[A-Za-z0-9_\-]{12,}"), REDACTED),
    # Google API keys, AWS access key IDs, GitHub and Slack tokens.
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{30,}"), REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"), REDACTED),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9\-]{10,}"), REDACTED),
    # JSON Web Tokens.
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"), REDACTED),
    # Bearer / Basic credentials, wherever they appear.
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{6,}"), r"\1 " + REDACTED),
    # Credentials in URLs: scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]+):[^\s@/]+@"), r"\1:" + REDACTED + "@"),
    # key=value / "key": "value" pairs whose key names a secret (Authorization, api-key, ...).
    (
        re.compile(
            r"(?i)([\"']?\b(?:authorization|proxy-authorization|x-api-key|api[-_ ]?key|apikey"
            r"|access[-_]?token|refresh[-_]?token|auth[-_]?token|token|secret|client[-_]?secret"
            r"|password|passwd|pwd|passphrase)\b[\"']?\s*[:=]\s*[\"']?)"
            r"(?!\[REDACTED\])([^\s\"',;&}]+)"
        ),
        r"\1" + REDACTED,
    ),
)

_repr = reprlib.Repr()
_repr.maxlevel = 4
_repr.maxdict = 32
_repr.maxlist = 32
_repr.maxtuple = 32
_repr.maxset = 32
_repr.maxfrozenset = 32
_repr.maxdeque = 32
_repr.maxarray = 32
_repr.maxlong = 64


def to_text(value: object, limit: int) -> str:
    """Render ``value`` as text with work bounded by ``limit`` (never raises for user objects)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if value is None or isinstance(value, (bool, int, float)):
        return str(value)
    _repr.maxstring = max(limit, 16)
    _repr.maxother = max(limit, 16)
    try:
        return _repr.repr(value)
    except Exception:  # reprlib guards instances, but not every container subclass
        return f"<unrepresentable {type(value).__name__}>"


def redact(text: str) -> str:
    """Replace API keys, bearer tokens, passwords and credential values with ``[REDACTED]``."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters, marking the cut."""
    if len(text) <= limit:
        return text
    keep = max(limit - len(TRUNCATION_MARK), 0)
    return text[:keep] + TRUNCATION_MARK[: limit - keep]


def render(value: object, limit: int, extra_redact: Callable[[str], str] | None = None) -> str:
    """:func:`to_text`, then :func:`redact` (and ``extra_redact``), then :func:`truncate`."""
    text = to_text(value, limit)
    was_cut = len(text) > limit + _REDACTION_MARGIN
    text = redact(text[: limit + _REDACTION_MARGIN])
    if extra_redact is not None:
        text = extra_redact(text)
    if was_cut and len(text) <= limit:
        # Redaction shortened a text whose tail was already dropped: still mark the cut.
        text = text[: max(limit - len(TRUNCATION_MARK), 0)] + TRUNCATION_MARK
    return truncate(text, limit)
