"""The pytest plugin, used the way a user's test suite would use it (pytester)."""

from __future__ import annotations

pytest_plugins = ["pytester"]


def test_plugin_fixtures_in_a_user_test_suite(pytester):
    pytester.makeconftest(
        """
        from crew_otel.testing.crews import prepare_offline_environment
        prepare_offline_environment()
        """
    )
    pytester.makepyfile(
        """
        import openai
        import pytest
        from concurrent.futures import ThreadPoolExecutor
        from crew_otel.testing import Fault
        from crew_otel.testing.crews import make_llm, research_crew

        def test_provider_500s_are_traced(fake_provider, span_exporter, instrumented_crewai):
            for i in range(3):
                fake_provider.script(*[Fault.error(500, 0.01)] * 9, key=f"u{i}")

            def run(i):
                crew = research_crew(lambda: make_llm(fake_provider.base_url))
                with pytest.raises(openai.InternalServerError):
                    crew.kickoff(inputs={"topic": f"[[u{i}]]"})

            with ThreadPoolExecutor(3) as pool:
                list(pool.map(run, range(3)))
            origins = [s for s in span_exporter.get_finished_spans()
                       if s.attributes.get("crew_otel.error.origin")]
            assert len(origins) == 27
            assert fake_provider.stats()["by_status"] == {"500": 27}

        def test_exporter_is_emptied_between_tests(span_exporter):
            assert span_exporter.get_finished_spans() == ()
        """
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_a_pytest_run_that_uses_no_fixture_loads_nothing_heavy(pytester):
    """pytest loads the plugin in every run of every project that installs crew-otel: it must
    not import the OpenTelemetry SDK, CrewAI, the loopback provider or the instrumentation."""
    pytester.makepyfile(
        """
        import sys

        HEAVY = ("opentelemetry.sdk", "crewai", "crew_otel.testing.provider",
                 "crew_otel.instrumentor", "http.server")

        def test_nothing_heavy_loaded(request):
            assert request.config.pluginmanager.has_plugin("crew_otel")
            assert [m for m in HEAVY if m in sys.modules] == []
        """
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_offline_home_is_removed_when_its_process_exits_and_not_before():
    """The temporary home outlives a forked child (gunicorn workers fork) and not its creator."""
    import os
    import subprocess
    import sys

    script = """
import os, sys
from crew_otel.testing.crews import prepare_offline_environment
home = prepare_offline_environment()
open(os.path.join(home, "key"), "w").close()
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a worker exiting normally runs the inherited atexit handlers
os.waitpid(pid, 0)
print(home, os.path.exists(os.path.join(home, "key")))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    home, survived_the_child = out[0], out[1]
    assert survived_the_child == "True"
    assert not os.path.exists(home)
