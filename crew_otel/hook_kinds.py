"""What a row of the plan is: the layer a hook belongs to, where the row comes from (which
installer applies it) and what ``instrument()`` did with it.

``str`` enums: their values are what ``crew-otel doctor`` prints and what tests and reports
compare against, and a member equals its value.
"""

from __future__ import annotations

import enum

__all__ = ["Layer", "Source", "Status"]


class _Named(str, enum.Enum):
    def __str__(self) -> str:
        return str(self.value)


class Layer(_Named):
    """The part of a run a hook observes."""

    KICKOFF = "kickoff"
    TASK = "task"
    AGENT = "agent"
    STEP = "step"
    TOOL = "tool"
    LLM = "llm"
    FLOW = "flow"
    MEMORY = "memory"
    PLAN = "plan"
    WAIT = "wait"
    HTTP = "http"
    CONTEXT = "context"
    PRIVACY = "privacy"
    DIAGNOSIS = "diagnosis"


class Source(_Named):
    """Where a row comes from, and so which installer applies it."""

    TARGET = "target"
    LLM_CLASS = "llm class"
    HTTP_CLIENT = "http client"
    HTTP_POOL = "http pool"
    THREADING = "threading"
    BAGGAGE = "baggage"
    SHARED_STATE = "shared state"


class Status(_Named):
    """What ``instrument()`` does (did) with a row."""

    INSTALLED = "installed"
    SKIPPED = "skipped"
    #: Installs when its module is first imported (a post-import hook).
    PENDING = "pending"
    #: Installing raised: the row was skipped and nothing of it is left installed.
    FAILED = "failed"
