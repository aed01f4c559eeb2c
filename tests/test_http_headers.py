"""The HTTP instrumentation's header dict is not built while no header is captured.

``opentelemetry-instrumentation-httpx`` turns every request and response header into a dict
(``_normalize_headers``) and hands it only to ``get_custom_header_attributes``, which ignores it
when no header capture is configured. crew_otel replaces that helper on the versions this use
was checked on, while no capture is configured: the attempt spans are the same, the dict is not
built. Header capture the application configures keeps working, and ``uninstrument()`` puts
the helper back.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import crew_otel
from crew_otel import http, internals, internals_check
from crew_otel.testing.crews import make_llm, research_crew
from crew_otel.testing.provider import Fault
from tests.spans import REQUEST_ID, attr

_REQUEST_CAPTURE, _RESPONSE_CAPTURE = http.HEADER_CAPTURE_VARIABLES


def _instrumentation():
    import opentelemetry.instrumentation.httpx as module

    return module


def _kickoffs_at_once(fake_provider, tags: list[str]) -> None:
    """One kickoff per tag, half in threads and half as ``akickoff``s on a loop, all parked in
    their first model call at once before any answers."""
    gate = fake_provider.gate("headers:" + "-".join(tags))
    for tag in tags:
        fake_provider.script(Fault.hold(gate.name), key=tag)

    def kickoff(tag: str) -> None:
        crew = research_crew(lambda: make_llm(fake_provider.base_url))
        with crew_otel.request(tag):
            crew.kickoff(inputs={"topic": f"[[{tag}]]"})

    async def akickoffs(batch: list[str]) -> None:
        async def one(tag: str) -> None:
            crew = research_crew(lambda: make_llm(fake_provider.base_url))
            with crew_otel.request(tag):
                await crew.akickoff(inputs={"topic": f"[[{tag}]]"})

        await asyncio.gather(*(one(tag) for tag in batch))

    threaded, on_loop = tags[: len(tags) // 2], tags[len(tags) // 2 :]
    with ThreadPoolExecutor(max_workers=len(threaded) + 1) as pool:
        try:
            runs = [pool.submit(kickoff, tag) for tag in threaded]
            runs.append(pool.submit(asyncio.run, akickoffs(on_loop)))
            gate.wait_parked(len(tags))  # every run is inside a model call
        finally:
            gate.open()
        for run in runs:
            run.result(timeout=120)


def _attempt_spans(exporter, tags: list[str]) -> dict[str, list]:
    spans = [s for s in exporter.get_finished_spans() if s.name == "POST"]
    return {tag: [s for s in spans if attr(s, REQUEST_ID) == tag] for tag in tags}


def test_the_header_dict_is_not_built_and_the_attempt_spans_stay_the_same(otel, fake_provider):
    module = _instrumentation()
    tags = ["hdr-a", "hdr-b", "hdr-c", "hdr-d"]
    _kickoffs_at_once(fake_provider, tags)

    # replaced where the helper is used as checked (the lowest supported version has none)
    expected = (
        internals_check.check(internals.HEADER_NORMALIZATION).parts[0].resolved
        and internals.HEADER_NORMALIZATION.installed_version_checked()
    )
    replaced = getattr(module, "_normalize_headers", None) is http.skip_header_normalization
    assert replaced is expected
    checked_on = internals.CHECKED_ON[internals.HTTPX_INSTRUMENTATION]
    if internals.installed_version(internals.HTTPX_INSTRUMENTATION) == checked_on[-1]:
        assert replaced, "replaced on the version it was checked on"
    for tag, attempts in _attempt_spans(otel, tags).items():
        assert attempts, f"{tag}: its HTTP attempts were recorded"
        for span in attempts:
            # the stable HTTP conventions' names, or the old ones (the instrumentation's default)
            status = attr(span, "http.response.status_code") or attr(span, "http.status_code")
            url = attr(span, "url.full") or attr(span, "http.url")
            assert status == 200
            assert str(url).startswith(fake_provider.base_url)
            headers = [k for k in span.attributes or {} if ".header." in k]
            assert headers == [], "no header is recorded"
    crew_otel.uninstrument()
    assert getattr(module, "_normalize_headers", None) is not http.skip_header_normalization


def test_header_capture_the_application_configures_keeps_working(
    monkeypatch, otel_tracer_provider, meter_provider, span_exporter, fake_provider
):
    """With a response header to capture, crew_otel leaves the helper alone: the
    instrumentation records the header on every attempt span, of every concurrent run."""
    module = _instrumentation()
    monkeypatch.setenv(_RESPONSE_CAPTURE, "content-type")
    monkeypatch.delenv(_REQUEST_CAPTURE, raising=False)
    assert http.header_normalization_skippable(module) is False
    crew_otel.uninstrument()  # its HTTP instrumentation too: instrumented again, it reads them
    crew_otel.instrument(tracer_provider=otel_tracer_provider, meter_provider=meter_provider)
    try:
        tags = ["cap-a", "cap-b"]
        _kickoffs_at_once(fake_provider, tags)
        assert module._normalize_headers is not http.skip_header_normalization
        for tag, attempts in _attempt_spans(span_exporter, tags).items():
            assert attempts, f"{tag}: its HTTP attempts were recorded"
            for span in attempts:
                assert attr(span, "http.response.header.content_type") == ("application/json",)
    finally:
        crew_otel.uninstrument()
