"""Living next to other instrumentations of the same calls: one span per thing.

Two kinds of neighbours record what crew_otel records:

* **Provider SDK instrumentations** (``opentelemetry-instrumentation-openai-v2``,
  OpenLLMetry's ``opentelemetry-instrumentation-openai``, OpenInference's
  ``openinference-instrumentation-openai``) make an inference span for each SDK call, and the
  first two record ``gen_ai.client.*`` metrics. The GenAI conventions leave inference spans to
  them. :class:`ProviderInstrumentations` finds out, at each model call, whether one of them
  hooks the SDK the call goes through; the model-call wrapper then keeps its span (it parents
  the SDK calls and the HTTP attempts and carries the retries and error origins) as
  ``crewai.llm.call {model}`` without ``gen_ai.*`` attributes, and leaves the ``gen_ai.client.*``
  points to the provider instrumentation when it records them. An embeddings call through
  the SDK (the OpenAI embedding function CrewAI builds for memory and knowledge) is treated
  alike when one of them hooks the SDK's embeddings call: crew_otel's span is
  ``crewai.embeddings {model}``, the embeddings span and its points theirs.
  ``CREW_OTEL_DEFER_TO_PROVIDER_INSTRUMENTATION=false`` keeps crew_otel's ``chat`` and
  ``embeddings`` spans and points beside the provider's.
* **Other CrewAI instrumentations** (OpenInference's ``openinference-instrumentation-crewai``)
  wrap the same CrewAI methods (``BaseTool.run``/``Tool.run``, ``Crew.kickoff``) with spans of
  their own, between crew_otel's dispatcher span and crew_otel's hook on the tool.
  :func:`crew_otel.wrappers.base.innermost_own_span_is` looks through them: only crew_otel's own
  calls count.

Detection reads the wrapper chain of the SDK methods the instrumentations hook (what is actually
installed, whenever and by whomever), not the instrumentors' flags: OpenLLMetry's
``uninstrument()`` leaves its wrappers in place (and recording) while its flag says it is off.
The result is cached against the identity of the hooked attributes, so a call costs a few dict
lookups, and an instrumentation installed or removed after crew_otel is seen at the next call.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from opentelemetry.util.types import AttributeValue

from crew_otel import attributes as a
from crew_otel import internals

#: How deep a wrapper chain is followed (each instrumentation adds one level).
_MAX_CHAIN = 16


def _openllmetry_records_metrics() -> bool:
    # OpenLLMetry creates its gen_ai.client.* instruments unless this is set to false.
    return (os.environ.get("TRACELOOP_METRICS_ENABLED") or "true").lower() == "true"


@dataclasses.dataclass(frozen=True)
class KnownInstrumentation:
    """A provider SDK instrumentation crew_otel steps aside for."""

    #: The distribution name (what the user installed; recorded on crew_otel's span).
    name: str
    #: The package its wrappers are defined in.
    package: str
    #: Whether it records gen_ai.client.* points (``None``: as OpenLLMetry's
    #: ``TRACELOOP_METRICS_ENABLED`` says).
    records_metrics: bool | None

    def owns(self, module: str) -> bool:
        return module == self.package or module.startswith(self.package + ".")

    def metrics(self) -> bool:
        flag = self.records_metrics
        return _openllmetry_records_metrics() if flag is None else flag


#: The provider instrumentations crew_otel knows (checked in this order).
KNOWN_INSTRUMENTATIONS = (
    KnownInstrumentation(
        "opentelemetry-instrumentation-openai-v2",
        "opentelemetry.instrumentation.openai_v2",
        records_metrics=True,
    ),
    KnownInstrumentation(
        "opentelemetry-instrumentation-openai",
        "opentelemetry.instrumentation.openai",
        records_metrics=None,
    ),
    KnownInstrumentation(
        "openinference-instrumentation-openai",
        "openinference.instrumentation.openai",
        records_metrics=False,
    ),
)

#: Modules of the CrewAI LLM classes that call the openai SDK (the native OpenAI provider and
#: the OpenAI-compatible providers built on it).
OPENAI_LLM_MODULES = ("crewai.llms.providers.openai",)

#: Where those instrumentations hook the openai SDK: (module, class, attribute).
OPENAI_HOOKS = (
    ("openai.resources.chat.completions", "Completions", "create"),
    ("openai.resources.chat.completions", "AsyncCompletions", "create"),
    ("openai.resources.chat.completions", "Completions", "parse"),
    ("openai.resources.chat.completions", "AsyncCompletions", "parse"),
    ("openai.resources.responses", "Responses", "create"),
    ("openai.resources.responses", "AsyncResponses", "create"),
    ("openai", "OpenAI", "request"),  # OpenInference wraps the client's request method
    ("openai", "AsyncOpenAI", "request"),
)

#: Where they hook the openai SDK's embeddings call, as an embedding function makes it (the
#: synchronous client's ``embeddings.create``, which goes through the client's ``request``).
OPENAI_EMBEDDINGS_HOOKS = (
    ("openai.resources.embeddings", "Embeddings", "create"),
    ("openai", "OpenAI", "request"),
)


@dataclasses.dataclass(frozen=True)
class Deferral:
    """Which provider instrumentations make the inference span of a model call."""

    #: Their distribution names, comma-separated (``crew_otel.llm.inference_by``).
    names: str
    #: Whether one of them records gen_ai.client.* points (crew_otel then records none: one
    #: set per call at most; their gaps are theirs, e.g. token points openai-v2 does not
    #: record for raw SDK responses with some opentelemetry-util-genai versions).
    records_metrics: bool


def _wrapper_modules(obj: Any) -> list[str]:
    """Modules of the wrappers stacked on ``obj`` (wrapt proxies and ``__wrapped__`` chains)."""
    modules = []
    for _ in range(_MAX_CHAIN):
        if obj is None:
            break
        wrapper = internals.WRAPT_WRAPPER.read(obj) if hasattr(obj, "__wrapped__") else None
        target = wrapper if wrapper is not None else obj
        module = getattr(target, "__module__", None)
        if isinstance(module, str):
            modules.append(module)
        obj = getattr(obj, "__wrapped__", None)
    return modules


def _hooked_attributes(hooks: tuple[tuple[str, str, str], ...]) -> tuple[Any, ...]:
    """The current objects at ``hooks`` (``None`` where absent)."""
    found: list[Any] = []
    modules = sys.modules
    for module_name, class_name, attribute in hooks:
        module = modules.get(module_name)
        cls = getattr(module, "__dict__", {}).get(class_name) if module is not None else None
        found.append(getattr(cls, "__dict__", {}).get(attribute) if cls is not None else None)
    return tuple(found)


def _inspect(hooked: tuple[Any, ...]) -> Deferral | None:
    present: list[KnownInstrumentation] = []
    for obj in hooked:
        if obj is None:
            continue
        for module in _wrapper_modules(obj):
            for known in KNOWN_INSTRUMENTATIONS:
                # openai_v2's package is not under OpenLLMetry's: the owns() check is exact.
                if known not in present and known.owns(module):
                    present.append(known)
    if not present:
        return None
    return Deferral(
        ",".join(k.name for k in present),
        records_metrics=any(k.metrics() for k in present),
    )


class _HookedPath:
    """The provider instrumentations on one call path of the SDK (a set of hooks), cached
    against the identity of the objects found there."""

    def __init__(self, hooks: tuple[tuple[str, str, str], ...]) -> None:
        self._hooks = hooks
        #: The objects' ids, the objects (kept, so the ids are not reused), the answer.
        self._cache: tuple[tuple[int, ...], tuple[Any, ...], Deferral | None] | None = None

    def deferral(self) -> Deferral | None:
        """The instrumentations hooking the path now, or ``None``."""
        hooked = _hooked_attributes(self._hooks)
        # Compared by identity (the cache holds the objects, so their ids stay theirs).
        identities = tuple(map(id, hooked))
        cached = self._cache
        if cached is not None and cached[0] == identities:
            return cached[2]
        found = _inspect(hooked)
        # one assignment: racing threads store equal results
        self._cache = (identities, hooked, found)
        return found


class ProviderInstrumentations:
    """Finds, per model or embeddings call, the provider instrumentation that makes its GenAI
    span (the inference span, the embeddings span)."""

    def __init__(self) -> None:
        self._chat = _HookedPath(OPENAI_HOOKS)
        self._embeddings = _HookedPath(OPENAI_EMBEDDINGS_HOOKS)
        self._uses_sdk: dict[type, bool] = {}

    def deferral_for(self, llm_class: type) -> Deferral | None:
        """The instrumentations hooking the SDK that ``llm_class`` calls, or ``None``."""
        uses_sdk = self._uses_sdk.get(llm_class)
        if uses_sdk is None:
            uses_sdk = self._uses_sdk[llm_class] = _talks_through_openai(llm_class)
        if not uses_sdk:
            return None
        return self._chat.deferral()

    def embeddings_deferral_for(self, client: object) -> Deferral | None:
        """The instrumentations hooking the embeddings call of ``client`` (an embedding
        function's SDK client), or ``None`` when it is no openai SDK client."""
        if not _is_openai_client(client):
            return None
        return self._embeddings.deferral()


def _talks_through_openai(llm_class: type) -> bool:
    """Whether a CrewAI LLM class (or a class it derives from) calls the openai SDK."""
    for klass in llm_class.__mro__:
        module = getattr(klass, "__module__", "") or ""
        if any(module == p or module.startswith(p + ".") for p in OPENAI_LLM_MODULES):
            return True
    return False


def _is_openai_client(client: object) -> bool:
    """Whether ``client`` is the openai SDK's synchronous client (``OpenAI``, ``AzureOpenAI``
    or a subclass): its embeddings calls take :data:`OPENAI_EMBEDDINGS_HOOKS`."""
    openai = sys.modules.get("openai")
    client_class = getattr(openai, "OpenAI", None) if openai is not None else None
    return isinstance(client_class, type) and isinstance(client, client_class)


def deferred_attributes(
    attrs: dict[str, AttributeValue], deferral: Deferral
) -> dict[str, AttributeValue]:
    """A model-call or embeddings-call span's attributes when the provider instrumentation
    makes the GenAI span: no ``gen_ai.*`` (GenAI-aware backends would count the call twice),
    the model and provider under ``crewai.llm.*``, and who makes the GenAI span."""
    deferred: dict[str, AttributeValue] = {
        k: v for k, v in attrs.items() if not k.startswith(a.GEN_AI_PREFIX)
    }
    if a.GEN_AI_REQUEST_MODEL in attrs:
        deferred[a.CREWAI_LLM_MODEL] = attrs[a.GEN_AI_REQUEST_MODEL]
    if a.GEN_AI_PROVIDER_NAME in attrs:
        deferred[a.CREWAI_LLM_PROVIDER] = attrs[a.GEN_AI_PROVIDER_NAME]
    deferred[a.LLM_INFERENCE_BY] = deferral.names
    return deferred
