"""Memory storage contention: which memory span waited, on which storage, and that it is shared.

What CrewAI does (1.12 and 1.15): LanceDB itself never says "database is locked" (it commits
optimistically); CrewAI serialises every write to one storage path with its own lock
(``store_lock``: a file lock in the temp directory, shared by threads and processes, 120 s
timeout) and runs a Memory's saves on one writer thread. So concurrent requests sharing a
memory *wait*: in the save queue (``crewai.memory.queue_wait``) and for the lock
(``crewai.memory.lock_wait``), and the spans name the storage (class and path) and flag it as
shared. Here 4 requests (threads) remember into one Memory while another process holds the
storage's lock, as a second worker process writing the same memory would; it lets go once the
memory's writer thread is waiting for the lock and every request's save is queued behind it.
The spans' waits then cover at least the time the test saw them waiting.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import crew_otel
from crew_otel.testing import Fault
from crew_otel.testing.crews import make_agent, make_llm
from tests.spans import Spans, attr
from tests.support.waiting import wait_for

KEY = "sk-fake-key-for-the-loopback-provider"
N_REQUESTS = 4
#: A bound against a broken test (a state never reached), not a measurement.
WAIT_S = 60.0
SAVE = "upsert_memory"
REQUEST_THREAD = "request"

HOLDER = """
import sys, portalocker
lock = portalocker.Lock(sys.argv[1], timeout=10)
lock.acquire()
print("held", flush=True)
sys.stdin.readline()
lock.release()
"""


def lock_file(storage_path: Path) -> str:
    """The file CrewAI's ``store_lock`` locks for a LanceDB storage at ``storage_path``."""
    name = f"lancedb:{storage_path.resolve()}"
    channel = f"crewai:{hashlib.md5(name.encode(), usedforsecurity=False).hexdigest()}"
    return os.path.join(tempfile.gettempdir(), f"{channel}.lock")


def functions_on_stack(prefix: str) -> list[list[tuple[str, str]]]:
    """(file, function) of every frame, innermost first, of each thread named ``prefix...``."""
    frames = sys._current_frames()
    found = []
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or -1)
        if not thread.name.startswith(prefix) or frame is None:
            continue
        stack = []
        while frame is not None:
            stack.append((frame.f_code.co_filename, frame.f_code.co_name))
            frame = frame.f_back
        found.append(stack)
    return found


def a_save_waits_for_the_lock() -> bool:
    """Whether a thread is inside the storage lock's acquisition (CrewAI's memory writes from
    its writer thread, or from a worker thread of the loop that thread runs)."""
    return any(
        any("portalocker" in file and function == "acquire" for file, function in stack)
        for stack in functions_on_stack("")
    )


def requests_waiting_for_their_save() -> int:
    """Request threads inside ``Memory.remember``, waiting for the writer thread's result."""
    return sum(
        1
        for stack in functions_on_stack(REQUEST_THREAD)
        if any(function == "remember" for _, function in stack)
        and any("concurrent/futures" in file and function == "result" for file, function in stack)
    )


def test_requests_sharing_a_memory_show_their_waits_on_the_shared_storage(
    otel, fake_provider, tmp_path
):
    from crewai.memory.unified_memory import Memory

    path = tmp_path / "memory"
    embedder = {
        "provider": "openai",
        "config": {"api_key": KEY, "api_base": fake_provider.base_url},
    }
    memory = Memory(llm=make_llm(fake_provider.base_url), embedder=embedder, storage=str(path))
    memory.remember("Warm-up: the table exists.")  # outside any request
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, lock_file(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "held"

        # every request's search is in flight at once: each one's embeddings call waits there
        searching = fake_provider.gate("searching")
        for i in range(N_REQUESTS):
            fake_provider.script(Fault.hold(searching.name), key=f"recall{i}")

        def one(i: int) -> Any:
            with crew_otel.request(f"req-{i}"):
                record = memory.remember(f"Fact [[fact{i}]] about refunds.")
                memory.recall(f"refunds [[recall{i}]]", depth="shallow")
                return record

        with ThreadPoolExecutor(N_REQUESTS, thread_name_prefix=REQUEST_THREAD) as pool:
            futures = [pool.submit(one, i) for i in range(N_REQUESTS)]
            wait_for(a_save_waits_for_the_lock, WAIT_S, "a save waiting for the lock", 0.005)
            wait_for(
                lambda: requests_waiting_for_their_save() == N_REQUESTS,
                WAIT_S,
                "every save queued",
                0.005,
            )
            assert a_save_waits_for_the_lock(), "the first save waits for the lock still"
            holder.stdin.write("release\n")
            holder.stdin.flush()
            searching.wait_parked(N_REQUESTS, WAIT_S)
            searching.open()
            records = [f.result() for f in futures]
    finally:
        fake_provider.gate("searching").open()
        holder.stdin.close()
        holder.wait(timeout=30)
    assert all(r is not None for r in records)
    spans = Spans(otel.get_finished_spans())
    saves = [s for s in spans.named(SAVE) if attr(s, "crew_otel.request.id")]
    assert {attr(s, "crew_otel.request.id") for s in saves} == {
        f"req-{i}" for i in range(N_REQUESTS)
    }
    for span in saves:
        assert attr(span, "crewai.memory.storage") == "LanceDBStorage"
        assert attr(span, "crewai.memory.storage.path") == str(path)
        assert isinstance(attr(span, "crewai.memory.lock_wait"), float)
        assert isinstance(attr(span, "crewai.memory.queue_wait"), float)
    # the first save waited for the other process's lock (a wait is recorded; how long is a
    # timing, not asserted); the rest queued behind it
    assert max(attr(s, "crewai.memory.lock_wait") for s in saves) > 0
    queue_waits = sorted(attr(s, "crewai.memory.queue_wait") for s in saves)
    assert all(wait > 0 for wait in queue_waits[1:]), queue_waits
    # saves run one at a time on the memory's writer thread; the searches overlap
    searches = [s for s in spans.named("search_memory") if attr(s, "crew_otel.request.id")]
    assert len(searches) == N_REQUESTS
    flagged = [s for s in saves + searches if attr(s, "crew_otel.shared_instance") is True]
    assert flagged, "the shared memory storage is not named"
    for span in flagged:
        (event,) = [e for e in span.events if e.name == "crew_otel.shared_instance"]
        assert event.attributes["crew_otel.shared_instance.kind"] == "memory"
        assert event.attributes["crew_otel.shared_instance.class"].endswith("LanceDBStorage")


class _Embedder(BaseHTTPRequestHandler):
    """A text-embeddings-inference server on loopback: ``{"inputs": [...]}`` -> vectors."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        vectors = [[float(len(text) % 7 + 1), 1.0, 0.5, 0.25] for text in body["inputs"]]
        data = json.dumps(vectors).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_another_embedder_class_gets_its_embeddings_span(otel, fake_provider, tmp_path):
    from chromadb.utils.embedding_functions.huggingface_embedding_function import (
        HuggingFaceEmbeddingServer,
    )
    from crewai.memory.unified_memory import Memory

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Embedder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/embed"
        memory = Memory(
            llm=make_llm(fake_provider.base_url),
            embedder=HuggingFaceEmbeddingServer(url=url),
            storage=str(tmp_path / "hf"),
        )
        with crew_otel.request("hf"):
            memory.remember("Refunds take 5 days.")
            found = memory.recall("refunds")
    finally:
        server.shutdown()
    assert found
    spans = Spans(otel.get_finished_spans())
    embeddings = spans.named("embeddings")
    assert embeddings
    for span in embeddings:
        assert attr(span, "gen_ai.provider.name") == "huggingface_server"
        assert attr(span, "gen_ai.operation.name") == "embeddings"
        assert attr(span, "crew_otel.request.id") == "hf"
        assert any(
            a.name.split(" ")[0] in ("search_memory", "upsert_memory", "crewai.memory.extract")
            for a in spans.ancestors(span)
        )
        assert [k for k in spans.kids(span) if k.name.split(" ")[0] == "POST"]


def test_an_embedder_class_defined_after_instrument_gets_its_span_from_the_next_kickoff(
    otel, fake_provider, tmp_path
):
    from chromadb.api.types import EmbeddingFunction
    from crewai import Crew, Task
    from crewai.memory.unified_memory import Memory

    class LateEmbedder(EmbeddingFunction):  # type: ignore[type-arg]
        """A user's embedder, defined once the application runs (after ``instrument()``)."""

        def __init__(self) -> None:
            pass

        @staticmethod
        def name() -> str:
            return "late_embedder"

        def __call__(self, input: Any) -> Any:  # chromadb's parameter name
            return [[float(len(text) % 7 + 1), 1.0, 0.5, 0.25] for text in input]

    agent = make_agent(make_llm(fake_provider.base_url), "Clerk")
    task = Task(description="Answer [[late]].", expected_output="an answer", agent=agent)
    Crew(agents=[agent], tasks=[task]).kickoff()  # the application's next run
    memory = Memory(
        llm=make_llm(fake_provider.base_url),
        embedder=LateEmbedder(),
        storage=str(tmp_path / "late"),
    )
    with crew_otel.request("late"):
        memory.remember("Refunds take 5 days.")
        found = memory.recall("refunds", depth="shallow")
    assert found
    spans = Spans(otel.get_finished_spans())
    embeddings = [s for s in spans.named("embeddings") if attr(s, "crew_otel.request.id")]
    assert embeddings
    for span in embeddings:
        assert attr(span, "gen_ai.provider.name") == "late_embedder"
        assert attr(span, "crew_otel.request.id") == "late"
        assert any(
            a.name.split(" ")[0] in ("search_memory", "upsert_memory", "crewai.memory.extract")
            for a in spans.ancestors(span)
        )
