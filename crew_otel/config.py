"""Configuration: argument > ``CREW_OTEL_*`` env > ``OTEL_*`` env > default, resolved once.

The resolved :class:`CrewOtelConfig` is frozen and handed to every wrapper when
:func:`crew_otel.instrument` runs; nothing reads the environment on the hot path.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})

DEFAULT_MAX_ATTRIBUTE_LENGTH = 4096


@dataclasses.dataclass(frozen=True)
class CrewOtelConfig:
    """Every option of :func:`crew_otel.instrument`, resolved.

    Attributes:
        capture_content: record prompts, completions, task text, inputs, tool arguments and
            results (truncated and redacted). Off by default. Env:
            ``CREW_OTEL_CAPTURE_CONTENT``, then
            ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``.
        max_attribute_length: longest string recorded in a content attribute. Env:
            ``CREW_OTEL_MAX_ATTRIBUTE_LENGTH``.
        http: instrument httpx and httpx2 (each HTTP attempt to the model provider becomes a
            span under its model call). Env: ``CREW_OTEL_HTTP``.
        threading: carry the OpenTelemetry context into threads started without copying it.
            Env: ``CREW_OTEL_THREADING``.
        strip_crewai_baggage: keep CrewAI's baggage entries (``crew_context``,
            ``flow_inputs``, ``flow_input_files``) out of outgoing ``baggage`` headers. Env:
            ``CREW_OTEL_STRIP_CREWAI_BAGGAGE``.
        propagate_request_id: carry the request ID to other processes (a Celery worker, another
            service) as the W3C baggage entry ``crew_otel.request.id``, and adopt it from
            incoming requests and tasks. Never sent from inside a CrewAI run, so model
            providers do not see it. Off by default. Env: ``CREW_OTEL_PROPAGATE_REQUEST_ID``.
        detect_shared_instances: flag Crew/Agent/Task/tool/LLM objects used by two requests at
            once. Env: ``CREW_OTEL_DETECT_SHARED_INSTANCES``.
        detect_crosstalk: flag runs that received another in-flight request's data (its
            identifiers, kept only as in-memory hashes while it runs) in a tool result, a
            model request or the output. Env: ``CREW_OTEL_DETECT_CROSSTALK``.
        defer_to_provider_instrumentation: when a provider SDK instrumentation
            (``opentelemetry-instrumentation-openai-v2``, OpenLLMetry's or OpenInference's
            openai instrumentation) hooks the SDK a model call goes through, leave the
            inference span and the ``gen_ai.client.*`` points to it: crew_otel's model-call span
            becomes ``crewai.llm.call {model}`` (still the parent of the SDK calls and HTTP
            attempts, with the retries and error origins) without ``gen_ai.*`` attributes. On by
            default; off keeps crew_otel's ``chat`` span and points beside the provider's. Env:
            ``CREW_OTEL_DEFER_TO_PROVIDER_INSTRUMENTATION``.
        shared_state_ignore: names or globs (``fnmatch``) of shared state known to be safe:
            a global (``app.tools.CACHE``), a file path (``/var/log/app/*.log``), a database
            path, a resource (``sqlite3.Connection at app.db.POOL``), ``os.environ['X']``.
            Only those are silenced; CrewAI-object sharing and everything else stay on. Env:
            ``CREW_OTEL_SHARED_STATE_IGNORE`` (comma-separated).
        app_packages: top-level packages whose code the shared-state detector reads as the
            application's, wherever they are installed (the package that defines each tool
            always is; the standard library, CrewAI and other installed packages are not).
            Env: ``CREW_OTEL_APP_PACKAGES`` (comma-separated).
        redact: extra redaction applied after the built-in one to captured content.
    """

    capture_content: bool = False
    max_attribute_length: int = DEFAULT_MAX_ATTRIBUTE_LENGTH
    http: bool = True
    threading: bool = True
    strip_crewai_baggage: bool = True
    propagate_request_id: bool = False
    detect_shared_instances: bool = True
    detect_crosstalk: bool = True
    defer_to_provider_instrumentation: bool = True
    shared_state_ignore: tuple[str, ...] = ()
    app_packages: tuple[str, ...] = ()
    redact: Callable[[str], str] | None = None

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """Names accepted as keyword options by ``instrument()``."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def resolve(
        cls, options: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> CrewOtelConfig:
        """Resolve options with the precedence argument > CREW_OTEL_* > OTEL_* > default.

        Raises:
            TypeError: for an unknown option name.
            ValueError: for a value of the wrong kind (in an argument or an env variable).
        """
        env = os.environ if environ is None else environ
        unknown = set(options) - cls.option_names()
        if unknown:
            raise TypeError(
                f"crew_otel.instrument() got unknown option(s) {sorted(unknown)}; "
                f"valid options: {sorted(cls.option_names())}"
            )

        def flag(name: str, *env_names: str, default: bool) -> bool:
            if options.get(name) is not None:
                value = options[name]
                if not isinstance(value, bool):
                    raise ValueError(f"crew_otel option {name!r} must be a bool, got {value!r}")
                return value
            for env_name in env_names:
                raw = env.get(env_name)
                if raw is None:
                    continue
                text = raw.strip().lower()
                if text in _TRUE:
                    return True
                if text in _FALSE:
                    return False
                raise ValueError(f"{env_name}={raw!r} is not a boolean (use true or false)")
            return default

        max_len: Any = options.get("max_attribute_length")
        if max_len is None and env.get("CREW_OTEL_MAX_ATTRIBUTE_LENGTH"):
            raw = env["CREW_OTEL_MAX_ATTRIBUTE_LENGTH"]
            try:
                max_len = int(raw)
            except ValueError:
                raise ValueError(
                    f"CREW_OTEL_MAX_ATTRIBUTE_LENGTH={raw!r} is not an integer"
                ) from None
        if max_len is None:
            max_len = DEFAULT_MAX_ATTRIBUTE_LENGTH
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 16:
            raise ValueError(f"max_attribute_length must be an int >= 16, got {max_len!r}")

        redact = options.get("redact")
        if redact is not None and not callable(redact):
            raise ValueError("crew_otel option 'redact' must be a callable str -> str")

        def names(name: str, env_name: str) -> tuple[str, ...]:
            value = options.get(name)
            if value is None:
                raw = env.get(env_name, "")
                return tuple(part.strip() for part in raw.split(",") if part.strip())
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple, set, frozenset)) or not all(
                isinstance(item, str) for item in value
            ):
                raise ValueError(f"crew_otel option {name!r} must be a list of strings")
            return tuple(value)

        return cls(
            shared_state_ignore=names("shared_state_ignore", "CREW_OTEL_SHARED_STATE_IGNORE"),
            app_packages=names("app_packages", "CREW_OTEL_APP_PACKAGES"),
            capture_content=flag(
                "capture_content",
                "CREW_OTEL_CAPTURE_CONTENT",
                "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
                default=False,
            ),
            max_attribute_length=max_len,
            http=flag("http", "CREW_OTEL_HTTP", default=True),
            threading=flag("threading", "CREW_OTEL_THREADING", default=True),
            strip_crewai_baggage=flag(
                "strip_crewai_baggage", "CREW_OTEL_STRIP_CREWAI_BAGGAGE", default=True
            ),
            propagate_request_id=flag(
                "propagate_request_id", "CREW_OTEL_PROPAGATE_REQUEST_ID", default=False
            ),
            detect_shared_instances=flag(
                "detect_shared_instances", "CREW_OTEL_DETECT_SHARED_INSTANCES", default=True
            ),
            detect_crosstalk=flag("detect_crosstalk", "CREW_OTEL_DETECT_CROSSTALK", default=True),
            defer_to_provider_instrumentation=flag(
                "defer_to_provider_instrumentation",
                "CREW_OTEL_DEFER_TO_PROVIDER_INSTRUMENTATION",
                default=True,
            ),
            redact=redact,
        )
