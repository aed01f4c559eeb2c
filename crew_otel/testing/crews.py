"""Small crews for tests, benchmarks and the demo, wired to a :class:`FakeOpenAIProvider`.

Everything here imports CrewAI lazily, inside the functions. Crews follow the shape used across
crew_otel's own tests: a researcher with a tool and a writer, two tasks interpolating
``{topic}``; put a ``[[marker]]`` in the topic and the provider echoes it in its answers.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

OFFLINE_ENVIRONMENT = {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_DISABLE_TRACKING": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "CREWAI_TESTING": "true",
    # CrewAI's console output (streaming flows) would otherwise look up its latest version.
    "CREWAI_DISABLE_VERSION_CHECK": "true",
    "OPENAI_API_KEY": "sk-fake-key-for-the-loopback-provider",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}


def prepare_offline_environment(home: str | None = None) -> str:
    """Set the variables that keep CrewAI offline and sandboxed; call before ``import crewai``.

    CrewAI writes a key file under ``$HOME``, a SQLite file under ``$XDG_DATA_HOME`` at import
    and at every kickoff, and memory (LanceDB) under ``$CREWAI_STORAGE_DIR``; all go to ``home``
    (by default a new temporary directory, removed when the process exits). Returns that
    directory.
    """
    if home is None:
        home = tempfile.mkdtemp(prefix="crew-otel-")
        atexit.register(_remove_in_creator, home, os.getpid())
    for key, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    os.environ["HOME"] = home
    os.environ["XDG_DATA_HOME"] = os.path.join(home, "xdg-data")
    # CrewAI's memory takes this as a path (relative: the working directory), the rest as an
    # application name under XDG_DATA_HOME; an absolute path serves both.
    os.environ["CREWAI_STORAGE_DIR"] = os.path.join(home, "crewai")
    os.environ.pop("REDIS_URL", None)
    os.environ.pop("OPENAI_BASE_URL", None)
    return home


def _remove_in_creator(path: str, creator_pid: int) -> None:
    # forked children (gunicorn workers) inherit atexit handlers; only the creator removes
    if os.getpid() == creator_pid:
        shutil.rmtree(path, ignore_errors=True)


def make_llm(base_url: str, model: str = "gpt-4o-mini", **kwargs: Any) -> Any:
    """A CrewAI ``LLM`` (native OpenAI provider) talking to ``base_url``."""
    from crewai import LLM

    kwargs.setdefault("api_key", "sk-fake-key-for-the-loopback-provider")
    return LLM(model=model, base_url=base_url, **kwargs)


def make_lookup_tool(name: str = "lookup_facts") -> Any:
    """A fresh ``@tool`` tool (build one per request, as the fixed pattern does)."""
    from crewai.tools import tool

    def lookup(query: str) -> str:
        """Look up facts about a topic."""
        return f"FACTS about {query}"

    lookup.__name__ = name
    return tool(name)(lookup)


def make_failing_tool(name: str = "flaky_api", message: str = "upstream API failed") -> Any:
    """A ``@tool`` tool that always raises ``RuntimeError(message)``."""
    from crewai.tools import tool

    def flaky(query: str) -> str:
        """Call an upstream API that is down."""
        raise RuntimeError(message)

    flaky.__name__ = name
    return tool(name)(flaky)


def make_agent(llm: Any, role: str, tools: Sequence[Any] = (), **kwargs: Any) -> Any:
    """An Agent with short, code-defined texts."""
    from crewai import Agent

    kwargs.setdefault("verbose", False)
    return Agent(
        role=role,
        goal=f"Do the work of a {role.lower()} on {{topic}}",
        backstory=f"An experienced {role.lower()}.",
        llm=llm,
        tools=list(tools),
        **kwargs,
    )


def research_crew(
    llm_factory: Callable[[], Any],
    *,
    tools: Sequence[Any] | None = None,
    researcher: Any = None,
    writer: Any = None,
    name: str = "research",
    **crew_kwargs: Any,
) -> Any:
    """Researcher (with a lookup tool) + writer, two tasks interpolating ``{topic}``."""
    from crewai import Crew, Task

    if researcher is None:
        researcher = make_agent(
            llm_factory(), "Researcher", tools if tools is not None else [make_lookup_tool()]
        )
    if writer is None:
        writer = make_agent(llm_factory(), "Writer")
    research = Task(
        name="research",
        description="Research {topic} using the lookup tool.",
        expected_output="Facts about {topic}.",
        agent=researcher,
    )
    write = Task(
        name="write",
        description="Write a short report about {topic}.",
        expected_output="A report about {topic}.",
        agent=writer,
        context=[research],
    )
    crew_kwargs.setdefault("verbose", False)
    return Crew(name=name, agents=[researcher, writer], tasks=[research, write], **crew_kwargs)
