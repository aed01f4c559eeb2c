"""The HTTP instrumentation's work whose result nothing reads is not done.

``opentelemetry-instrumentation-httpx`` turns every request and response header into a dict
(``_normalize_headers``) and hands it only to ``get_custom_header_attributes``, which ignores it
when no header capture is configured; and it parses each request's URL again from its text
(``_extract_parameters``) into a URL equal to the request's own. crew_otel replaces those
helpers on the versions this use was checked on (the first only while no capture is
configured): the attempt spans are the same. Header capture the application configures keeps
working, and ``uninstrument()`` puts the helpers back.
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
    parameters = getattr(module, "_extract_parameters", None)
    parameters_replaced = getattr(parameters, "__qualname__", "").startswith(
        http.parameters_without_reparse.__name__
    )
    assert parameters_replaced is http.request_parameters_replaceable(module)
    checked_on = internals.CHECKED_ON[internals.HTTPX_INSTRUMENTATION]
    if internals.installed_version(internals.HTTPX_INSTRUMENTATION) == checked_on[-1]:
        assert replaced, "replaced on the version it was checked on"
        assert parameters_replaced, "replaced on the version it was checked on"
    for tag, attempts in _attempt_spans(otel, tags).items():
        assert attempts, f"{tag}: its HTTP attempts were recorded"
        for span in attempts:
            # the stable HTTP conventions' names, or the old ones (the instrumentation's default)
            status = attr(span, "http.response.status_code") or attr(span, "http.status_code")
            url = attr(span, "url.full") or attr(span, "http.url")
            assert status == 200
            assert url == fake_provider.base_url + "/chat/completions"
            host, port = fake_provider.base_url.split("/")[2].split(":")
            assert attr(span, "server.address") in (host, None)  # the new conventions' only
            assert attr(span, "server.port") in (int(port), None)
            headers = [k for k in span.attributes or {} if ".header." in k]
            assert headers == [], "no header is recorded"
    crew_otel.uninstrument()
    assert getattr(module, "_normalize_headers", None) is not http.skip_header_normalization
    if parameters_replaced:
        assert module._extract_parameters is not parameters  # the original is back


def test_credentials_in_the_providers_url_never_reach_a_span(otel, fake_provider):
    """Two concurrent kickoffs against a base URL with credentials and a signed query: with
    the request-parameter helper replaced, the instrumentation still redacts both in
    ``url.full`` (it does when it sets the attribute, not in the helper). The lowest supported
    version redacts credentials but not query parameters."""
    from opentelemetry.util import http as http_util

    redacts_queries = hasattr(http_util, "redact_query_parameters")
    base = fake_provider.base_url.replace("http://", "http://svc-user:hunter2@")
    tags = ["cred-a", "cred-b"]
    gate = fake_provider.gate("credentials")
    for tag in tags:
        fake_provider.script(Fault.hold(gate.name), key=tag)

    def kickoff(tag: str) -> None:
        crew = research_crew(lambda: make_llm(base, default_query={"sig": "s3cr3t"}))
        with crew_otel.request(tag):
            crew.kickoff(inputs={"topic": f"[[{tag}]]"})

    with ThreadPoolExecutor(max_workers=2) as pool:
        try:
            runs = [pool.submit(kickoff, tag) for tag in tags]
            gate.wait_parked(len(tags))
        finally:
            gate.open()
        for run in runs:
            run.result(timeout=120)
    for tag, attempts in _attempt_spans(otel, tags).items():
        assert attempts, f"{tag}: its HTTP attempts were recorded"
        for span in attempts:
            url = str(attr(span, "url.full") or attr(span, "http.url"))
            assert "/chat/completions" in url, url
            values = " ".join(str(v) for v in (span.attributes or {}).values())
            assert "hunter2" not in values
            assert "svc-user" not in values
            if redacts_queries:
                assert "s3cr3t" not in values
            else:  # as docs/security.md says
                assert "s3cr3t" in url


def test_the_replaced_request_parameters_are_the_originals():
    """The replacement returns what the instrumentation's own helper returns, for requests
    with credentials, a query, a fragment and an IDNA host, and hands anything else to it."""
    import httpx

    module = _instrumentation()
    original = module._extract_parameters
    if not http.request_parameters_replaceable(module):
        assert (
            internals.installed_version(internals.HTTPX_INSTRUMENTATION)
            != (internals.CHECKED_ON[internals.HTTPX_INSTRUMENTATION][-1])
        )
        return  # a version it is not used on (the lowest supported one)
    replacement = http.parameters_without_reparse(original)
    for url in (
        "http://127.0.0.1:8080/v1/chat/completions",
        "https://user:pa%20ss@api.example.test/v1/chat?x=1&y=%2F#frag",
        "https://bücher.example/v1/a b",
    ):
        request = httpx.Request("POST", url, headers={"X-A": "1"}, content=b"{}")
        theirs = original((request,), {}, httpx)
        ours = replacement((request,), {}, httpx)
        assert ours[0] == theirs[0]
        assert str(ours[1]) == str(theirs[1])
        assert ours[1] == theirs[1]
        assert ours[2:] == theirs[2:]
    raw = (b"POST", (b"http", b"127.0.0.1", 8080, b"/v1"), [(b"x-a", b"1")])
    assert replacement(raw, {}, httpx) == original(raw, {}, httpx)


def test_a_helper_that_changes_the_url_is_not_replaced():
    """The check behind the replacement fails for a helper whose URL is not the request's own
    (as in the lowest supported version, which drops the URL's credentials)."""

    def dropping_credentials(args, kwargs, module):
        request = args[0]
        url = module.URL(str(request.url)).copy_with(username=None, password=None)
        return request.method.encode(), url, request.headers, request.stream, request.extensions

    def same(args, kwargs, module):
        request = args[0]
        return (
            request.method.encode(),
            module.URL(str(request.url)),
            request.headers,
            request.stream,
            request.extensions,
        )

    assert internals_check.request_parameters(same) is True
    assert internals_check.request_parameters(dropping_credentials) is False


def test_header_capture_the_application_configures_keeps_working(
    monkeypatch, otel_tracer_provider, meter_provider, span_exporter, fake_provider
):
    """With a response header to capture, crew_otel leaves the helper alone: the
    instrumentation records the header on every attempt span, of every concurrent run (on
    versions that capture headers: the lowest supported one has neither capture nor helper)."""
    module = _instrumentation()
    captures = callable(getattr(module, "_normalize_headers", None))
    monkeypatch.setenv(_RESPONSE_CAPTURE, "content-type")
    monkeypatch.delenv(_REQUEST_CAPTURE, raising=False)
    assert http.header_normalization_skippable(module) is False
    crew_otel.uninstrument()  # its HTTP instrumentation too: instrumented again, it reads them
    crew_otel.instrument(tracer_provider=otel_tracer_provider, meter_provider=meter_provider)
    try:
        tags = ["cap-a", "cap-b"]
        _kickoffs_at_once(fake_provider, tags)
        assert getattr(module, "_normalize_headers", None) is not http.skip_header_normalization
        for tag, attempts in _attempt_spans(span_exporter, tags).items():
            assert attempts, f"{tag}: its HTTP attempts were recorded"
            for span in attempts:
                expected = ("application/json",) if captures else None
                assert attr(span, "http.response.header.content_type") == expected
    finally:
        crew_otel.uninstrument()
