"""A fault-injecting, OpenAI-compatible model provider on 127.0.0.1.

It is a real HTTP server (standard library, one thread per connection, keep-alive) that speaks
enough of the OpenAI chat-completions API for CrewAI's native OpenAI provider and litellm:
JSON and SSE streaming responses, tool calls, final answers, the ReAct text format, structured
outputs (``response_format`` with a JSON schema: an answer that validates against it), usage,
and scripted or random faults (429/500/any status, timeouts, dropped connections, empty
answers, ``context_length_exceeded``). It also serves ``/v1/embeddings`` (deterministic
vectors, the same faults), so memory and knowledge run offline. Point an LLM or an embedder at
it with ``base_url=provider.base_url``.

Answers are deterministic: a final answer echoes every ``[[marker]]`` found in the request's
messages, so a test can tell which request's inputs a model call actually saw (cross-talk
between requests shows up as a foreign marker).

Example::

    from crew_otel.testing import FakeOpenAIProvider, Fault

    with FakeOpenAIProvider() as provider:
        provider.script(Fault.error(500), Fault.error(500))   # next two requests fail
        llm = LLM(model="gpt-4o-mini", base_url=provider.base_url, api_key="sk-fake")
        ...
        assert provider.stats()["requests"] == 3
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import json
import math
import random
import re
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MARKER = re.compile(r"\[\[([^\[\]\n]{1,64})\]\]")
_REACT_TOOL_NAME = re.compile(r"^Tool Name:\s*(.+?)\s*$", re.MULTILINE)
_CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
_INPUT_TOKENS_PATHS = ("/v1/responses/input_tokens", "/responses/input_tokens")
_EMBEDDINGS_PATHS = ("/v1/embeddings", "/embeddings")
_WORD = re.compile(r"\w+")
#: Dimensions of an embedding when the request names none (OpenAI's text-embedding-3-small).
DEFAULT_EMBEDDING_DIMENSIONS = 1536

OUTCOME_TOOL_CALL = "tool_call"
OUTCOME_FINAL = "final"
OUTCOME_REACT_ACTION = "react_action"
OUTCOME_STRUCTURED = "structured"
ENDPOINT_CHAT = "chat"
ENDPOINT_EMBEDDINGS = "embeddings"
OUTCOME_EMBEDDINGS = "embeddings"


@dataclasses.dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour of the provider."""

    kind: str
    status: int = 0
    seconds: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()
    #: The gate a ``hold`` waits at (:meth:`FakeOpenAIProvider.gate`).
    gate: str = ""

    @classmethod
    def error(cls, status: int, retry_after: float | None = None) -> Fault:
        """Answer with an OpenAI-style JSON error body and this HTTP status (500, 429, ...)."""
        headers = () if retry_after is None else (("retry-after", str(retry_after)),)
        return cls("status", status=status, headers=headers)

    @classmethod
    def timeout(cls, seconds: float = 5.0) -> Fault:
        """Hang for ``seconds`` before answering (longer than the client's timeout)."""
        return cls("timeout", seconds=seconds)

    @classmethod
    def disconnect(cls) -> Fault:
        """Close the connection without answering."""
        return cls("disconnect")

    @classmethod
    def empty(cls) -> Fault:
        """Answer 200 with an empty message (CrewAI rejects it)."""
        return cls("empty")

    @classmethod
    def invalid_json(cls) -> Fault:
        """Answer a structured-output request (``response_format``) in plain text, not JSON."""
        return cls("invalid_json")

    @classmethod
    def context_length_exceeded(cls) -> Fault:
        """Answer 400 ``context_length_exceeded`` (CrewAI summarises or exits)."""
        return cls("context_length", status=400)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Answer normally after ``seconds``."""
        return cls("delay", seconds=seconds)

    @classmethod
    def hold(cls, gate: str, seconds: float = 60.0) -> Fault:
        """Park the request at the gate named ``gate`` until the test opens it (at most
        ``seconds``), then answer normally: overlap as a fact, not a guess about timing."""
        return cls("hold", seconds=seconds, gate=gate)


class Gate:
    """Where held requests wait (:meth:`Fault.hold`): the test waits until N are parked, so
    it knows that their runs are in flight together, and then opens it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._condition = threading.Condition()
        self._parked = 0
        self._open = False
        self._given_up = ""

    @property
    def parked(self) -> int:
        """How many requests have arrived at the gate so far (released ones included)."""
        with self._condition:
            return self._parked

    def wait_parked(self, count: int, timeout: float = 60.0) -> None:
        """Wait until ``count`` requests have arrived; ``TimeoutError`` after ``timeout`` s
        (a bound against a broken test, never a measurement), ``RuntimeError`` at once if
        :meth:`give_up` was called first."""
        with self._condition:
            arrived = self._condition.wait_for(
                lambda: self._parked >= count or bool(self._given_up), timeout
            )
            if self._parked >= count:
                return
            status = f"gate {self.name!r}: {self._parked} of {count} requests arrived"
            if arrived:
                raise RuntimeError(f"{status}; {self._given_up}")
            raise TimeoutError(status)

    def give_up(self, reason: str) -> None:
        """No more requests will arrive (e.g. the run that should have ended without reaching
        the gate): a :meth:`wait_parked` still short of its count raises ``reason`` at once."""
        with self._condition:
            self._given_up = reason or "gave up"
            self._condition.notify_all()

    def open(self) -> None:
        """Release every request parked here, and let later ones through at once."""
        with self._condition:
            self._open = True
            self._condition.notify_all()

    def park(self, timeout: float) -> None:
        """Called by the server for a held request: arrive, wait until open (bounded)."""
        with self._condition:
            self._parked += 1
            self._condition.notify_all()
            self._condition.wait_for(lambda: self._open, timeout)


@dataclasses.dataclass(frozen=True)
class RandomFaults:
    """Random faults per request, reproducible with ``seed``.

    Each rate is the probability that a request gets that fault; ``latency`` is added to every
    answer.
    """

    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    timeout_rate: float = 0.0
    latency: float = 0.0
    timeout_seconds: float = 5.0
    seed: int | None = None


@dataclasses.dataclass
class RecordedRequest:
    """What the provider saw and answered, per HTTP request."""

    path: str
    model: str | None
    retry_count: int
    traceparent: str | None
    baggage: str | None
    markers: tuple[str, ...]
    messages: int
    has_tools: bool
    stream: bool
    outcome: str
    status: int
    started: float
    finished: float = 0.0
    body: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024
    allow_reuse_address = True
    provider: FakeOpenAIProvider


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send_json(
                200, {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]}
            )
        else:
            self._send_json(404, {"error": {"message": "not found", "type": "invalid_request"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._send_json(400, {"error": {"message": "invalid JSON", "type": "invalid_request"}})
            return
        path = self.path.split("?", 1)[0]
        if path in _INPUT_TOKENS_PATHS:
            text = json.dumps(body.get("input", ""))
            self._send_json(
                200, {"object": "response.input_tokens", "input_tokens": len(text) // 4}
            )
            return
        if path in _EMBEDDINGS_PATHS:
            self.server.provider._handle_embeddings(self, body)
            return
        if path not in _CHAT_PATHS:
            self._send_json(
                404, {"error": {"message": f"unknown path {path}", "type": "not_found"}}
            )
            return
        self.server.provider._handle_chat(self, body)

    # --- writing -----------------------------------------------------------------------------
    def _send_json(
        self, status: int, payload: dict[str, Any], headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_sse(self, events: list[dict[str, Any]]) -> None:
        parts = [f"data: {json.dumps(event)}\n\n" for event in events]
        parts.append("data: [DONE]\n\n")
        data = "".join(parts).encode()
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeOpenAIProvider:
    """The loopback provider. Start it with ``with`` (or :meth:`start`/:meth:`stop`).

    Args:
        random_faults: random 500/429/timeouts and latency for requests with no script.
        tool_calls_per_turn: how many tool calls a tool-calling answer contains (CrewAI runs
            several in parallel threads).
        response_models: the model a chat answer names, by the model requested (e.g.
            ``{"gpt-4o-mini": "gpt-4o-mini-2024-07-18"}``, as OpenAI answers with a dated
            snapshot); a model not listed answers with its own name.
        host, port: where to listen (loopback and a free port by default).
    """

    def __init__(
        self,
        *,
        random_faults: RandomFaults | None = None,
        tool_calls_per_turn: int = 1,
        response_models: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fake provider only listens on loopback")
        self._random = random_faults or RandomFaults()
        self._rng = random.Random(self._random.seed)
        self.tool_calls_per_turn = max(1, tool_calls_per_turn)
        self.response_models: dict[str, str] = dict(response_models or {})
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._scripts: dict[tuple[str | None, str | None], collections.deque[Fault | None]] = {}
        self._requests: list[RecordedRequest] = []
        self._gates: dict[str, Gate] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeOpenAIProvider:
        """Start serving in a background thread."""
        if self._server is not None:
            return self
        server = _Server((self._host, self._port), _Handler)
        server.provider = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-openai-provider",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (requests hanging in a timeout fault are abandoned, held ones
        released)."""
        with self._lock:
            gates = list(self._gates.values())
        for gate in gates:
            gate.open()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeOpenAIProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the provider is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1`` - pass as ``LLM(base_url=...)``."""
        return f"http://{self._host}:{self.port}/v1"

    # --- scripting ---------------------------------------------------------------------------
    def script(
        self, *outcomes: Fault | None, key: str | None = None, endpoint: str | None = None
    ) -> None:
        """Queue outcomes for the next requests (``None`` = answer normally).

        With ``key``, only requests whose messages (or embeddings inputs) contain ``[[key]]``
        consume the queue, so concurrent tests can script each run separately. With
        ``endpoint`` (``"chat"`` or ``"embeddings"``), only requests to that endpoint do.
        """
        if endpoint not in (None, ENDPOINT_CHAT, ENDPOINT_EMBEDDINGS):
            raise ValueError(f"endpoint must be None, 'chat' or 'embeddings', not {endpoint!r}")
        with self._lock:
            self._scripts.setdefault((key, endpoint), collections.deque()).extend(outcomes)

    def gate(self, name: str) -> Gate:
        """The gate ``name`` (made on first use) where ``Fault.hold(name)`` parks requests::

        provider.script(Fault.hold("both"), key="a")
        provider.script(Fault.hold("both"), key="b")
        ...start runs a and b...
        gate = provider.gate("both")
        gate.wait_parked(2)     # both runs are in flight, each inside its model call
        gate.open()
        """
        with self._lock:
            gate = self._gates.get(name)
            if gate is None:
                gate = self._gates[name] = Gate(name)
            return gate

    def reset(self) -> None:
        """Forget scripts, recorded requests and gates (opening them: nothing stays parked)."""
        with self._lock:
            self._scripts.clear()
            self._requests.clear()
            gates = list(self._gates.values())
            self._gates.clear()
        for gate in gates:
            gate.open()

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every chat and embeddings request seen so far (a copy; ``path`` tells them apart)."""
        with self._lock:
            return list(self._requests)

    def stats(self) -> dict[str, Any]:
        """Counts by outcome and status."""
        requests = self.requests
        by_status = collections.Counter(str(r.status) for r in requests)
        by_outcome = collections.Counter(r.outcome for r in requests)
        return {
            "requests": len(requests),
            "by_status": dict(by_status),
            "by_outcome": dict(by_outcome),
            "tool_call_responses": by_outcome.get(OUTCOME_TOOL_CALL, 0),
            "final_responses": by_outcome.get(OUTCOME_FINAL, 0),
            "retries": sum(1 for r in requests if r.retry_count > 0),
        }

    def _next_fault(self, markers: tuple[str, ...], endpoint: str) -> tuple[bool, Fault | None]:
        """(scripted?, fault) for a request to ``endpoint`` carrying ``markers``."""
        with self._lock:
            for key in (*markers, None):
                for queue_key in ((key, endpoint), (key, None)):
                    queue = self._scripts.get(queue_key)
                    if queue:
                        return True, queue.popleft()
            roll = self._rng.random()
        rf = self._random
        if roll < rf.error_rate:
            return False, Fault.error(500)
        roll -= rf.error_rate
        if roll < rf.rate_limit_rate:
            return False, Fault.error(429, retry_after=0)
        roll -= rf.rate_limit_rate
        if roll < rf.timeout_rate:
            return False, Fault.timeout(rf.timeout_seconds)
        return False, None

    # --- answering ---------------------------------------------------------------------------
    def _record(
        self, handler: _Handler, body: dict[str, Any], text: str, messages: int
    ) -> RecordedRequest:
        try:
            retry_count = int(handler.headers.get("x-stainless-retry-count") or 0)
        except ValueError:
            retry_count = 0
        record = RecordedRequest(
            path=handler.path,
            model=body.get("model"),
            retry_count=retry_count,
            traceparent=handler.headers.get("traceparent"),
            baggage=handler.headers.get("baggage"),
            markers=tuple(dict.fromkeys(MARKER.findall(text))),
            messages=messages,
            has_tools=bool(body.get("tools")),
            stream=bool(body.get("stream")),
            outcome="",
            status=200,
            started=time.time(),
            body=body,
        )
        with self._lock:
            self._requests.append(record)
        return record

    def _serve(
        self,
        handler: _Handler,
        record: RecordedRequest,
        endpoint: str,
        answer: Callable[[Fault | None], None],
    ) -> None:
        """Pick the request's fault, wait the latency, answer (the fault may pre-empt it)."""
        _, fault = self._next_fault(record.markers, endpoint)
        if fault is not None and fault.kind == "hold":
            self.gate(fault.gate).park(fault.seconds)
            fault = None
        if self._random.latency:
            time.sleep(self._random.latency)
        try:
            if not _apply_fault(handler, fault, record):
                answer(fault)
        except (BrokenPipeError, ConnectionResetError):
            record.outcome = record.outcome or "client_gone"
        finally:
            record.finished = time.time()

    def _handle_chat(self, handler: _Handler, body: dict[str, Any]) -> None:
        messages = body.get("messages") or []
        text = "\n".join(_message_text(m) for m in messages)
        record = self._record(handler, body, text, len(messages))
        self._serve(
            handler,
            record,
            ENDPOINT_CHAT,
            lambda fault: self._answer(handler, body, messages, record.markers, fault, record),
        )

    def _handle_embeddings(self, handler: _Handler, body: dict[str, Any]) -> None:
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) or not isinstance(raw, list) else raw
        if inputs and all(isinstance(i, int) for i in inputs):
            inputs = [inputs]  # one input given as token ids
        texts = [i if isinstance(i, str) else json.dumps(i) for i in inputs]
        record = self._record(handler, body, "\n".join(texts), len(texts))
        self._serve(
            handler,
            record,
            ENDPOINT_EMBEDDINGS,
            lambda fault: _answer_embeddings(handler, body, texts, record),
        )

    def _answer(
        self,
        handler: _Handler,
        body: dict[str, Any],
        messages: list[Any],
        markers: tuple[str, ...],
        fault: Fault | None,
        record: RecordedRequest,
    ) -> None:
        requested = str(body.get("model") or "gpt-4o-mini")
        model = self.response_models.get(requested, requested)
        tools = body.get("tools") or []
        tool_results = [m for m in messages if _role(m) == "tool"]
        tool_calls: list[dict[str, Any]] = []
        schema = _response_schema(body)
        # One tool round per conversation: call a tool first, answer once a result is there.
        if fault is not None and fault.kind == "empty":
            record.outcome = "empty"
            content: str | None = ""
        elif schema is not None and not tools and not (fault and fault.kind == "invalid_json"):
            record.outcome = OUTCOME_STRUCTURED
            content = json.dumps(_instance_of(schema, schema, f"Answer for {_echo(markers)}"))
        elif tools and not tool_results:
            record.outcome = OUTCOME_TOOL_CALL
            tool_calls = [_tool_call(tools[0], markers) for _ in range(self.tool_calls_per_turn)]
            content = None
        elif tool_results:
            record.outcome = OUTCOME_FINAL
            observation = _message_text(tool_results[-1])[:200]
            content = f"Answer for {_echo(markers)} based on {observation}"
        else:
            react_tool = _react_tool(messages)
            if react_tool is not None and "Observation:" not in _message_text(messages[-1]):
                record.outcome = OUTCOME_REACT_ACTION
                content = (
                    "Thought: I should use a tool\n"
                    f"Action: {react_tool}\n"
                    f'Action Input: {{"query": "{_echo(markers)}"}}'
                )
            else:
                record.outcome = OUTCOME_FINAL
                content = (
                    "Thought: I now know the final answer\n"
                    f"Final Answer: Answer for {_echo(markers)}"
                )
        prompt_tokens = max(1, sum(len(_message_text(m)) for m in messages) // 4)
        completion_tokens = max(1, len(content or json.dumps(tool_calls)) // 4)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        finish = "tool_calls" if tool_calls else "stop"
        if body.get("stream"):
            handler._send_sse(
                _stream_events(completion_id, model, content, tool_calls, finish, usage)
            )
            return
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if tool_calls:
            message["tool_calls"] = tool_calls
        handler._send_json(
            200,
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": usage,
            },
        )


def _apply_fault(handler: _Handler, fault: Fault | None, record: RecordedRequest) -> bool:
    """Act out ``fault``; True when it answered the request (nothing more is to be sent)."""
    if fault is None:
        return False
    if fault.kind == "delay":
        time.sleep(fault.seconds)
        return False
    if fault.kind == "timeout":
        record.outcome, record.status = "timeout", 0
        time.sleep(fault.seconds)
        handler.close_connection = True
        return True
    if fault.kind == "disconnect":
        record.outcome, record.status = "disconnect", 0
        handler.close_connection = True
        return True
    if fault.kind in ("status", "context_length"):
        record.outcome, record.status = f"error_{fault.status}", fault.status
        handler._send_json(fault.status, _error_body(fault), fault.headers)
        return True
    return False  # "empty" and "invalid_json" are the answer's business


def _answer_embeddings(
    handler: _Handler, body: dict[str, Any], texts: list[str], record: RecordedRequest
) -> None:
    record.outcome = OUTCOME_EMBEDDINGS
    dimensions = body.get("dimensions")
    if not isinstance(dimensions, int) or not 1 <= dimensions <= 8192:
        dimensions = DEFAULT_EMBEDDING_DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, text in enumerate(texts):
        vector = embedding_of(text, dimensions)
        encoded: Any = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            if as_base64
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = max(1, sum(len(t) for t in texts) // 4)
    handler._send_json(
        200,
        {
            "object": "list",
            "data": data,
            "model": str(body.get("model") or "text-embedding-3-small"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
    )


def embedding_of(text: str, dimensions: int = DEFAULT_EMBEDDING_DIMENSIONS) -> list[float]:
    """The provider's embedding of ``text``: a unit vector from its words (hashed bag of words).

    Deterministic across processes, and texts that share words are close, so a memory or
    knowledge search finds what was saved with similar words.
    """
    vector = [0.0] * dimensions
    for word in _WORD.findall(text.lower()) or [""]:
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "little") % dimensions
        vector[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def _response_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a ``response_format`` asks the answer to follow, if any."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    schema = (fmt.get("json_schema") or {}).get("schema")
    return schema if isinstance(schema, dict) else None


def _instance_of(schema: Any, root: dict[str, Any], text: str, depth: int = 0) -> Any:
    """A value that validates against ``schema`` (its strings are ``text``)."""
    if not isinstance(schema, dict) or depth > 8:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return _instance_of(target, root, text, depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return _instance_of(options[0], root, text, depth + 1)
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        return {name: _instance_of(sub, root, text, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        return [_instance_of(schema.get("items") or {}, root, text, depth + 1)]
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.0
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text


def _role(message: Any) -> str | None:
    return message.get("role") if isinstance(message, dict) else None


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return str(message)
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _echo(markers: tuple[str, ...]) -> str:
    return " ".join(f"[[{m}]]" for m in markers) if markers else "[[none]]"


def _react_tool(messages: list[Any]) -> str | None:
    """The first tool listed in a ReAct-style system prompt, if the prompt has one."""
    for message in messages:
        text = _message_text(message)
        if "Action Input:" in text:
            found = _REACT_TOOL_NAME.search(text)
            if found:
                return found.group(1)
    return None


_COWORKERS = re.compile(r"coworkers:\s*(.+)")


def _tool_call(tool: dict[str, Any], markers: tuple[str, ...]) -> dict[str, Any]:
    function = tool.get("function") or {}
    schema = function.get("parameters") or {}
    arguments: dict[str, Any] = {}
    # CrewAI's delegation tools list the coworkers in their description: pick the first.
    coworkers = _COWORKERS.search(str(function.get("description") or ""))
    for name, sub in (schema.get("properties") or {}).items():
        if name == "coworker" and coworkers:
            arguments[name] = coworkers.group(1).split(",")[0].strip()
        else:
            arguments[name] = _instance_of(sub, schema, _echo(markers))
    return {
        "id": f"call_{uuid.uuid4().hex[:12]}",
        "type": "function",
        "function": {"name": function.get("name", "tool"), "arguments": json.dumps(arguments)},
    }


def _error_body(fault: Fault) -> dict[str, Any]:
    if fault.kind == "context_length":
        return {
            "error": {
                "message": "This model's maximum context length is 128000 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
    kinds = {
        429: ("rate_limit_exceeded", "Rate limit reached"),
        500: ("server_error", "The server had an error while processing your request"),
    }
    code, message = kinds.get(fault.status, ("error", f"HTTP {fault.status}"))
    return {"error": {"message": message, "type": code, "param": None, "code": code}}


def _stream_events(
    completion_id: str,
    model: str,
    content: str | None,
    tool_calls: list[dict[str, Any]],
    finish: str,
    usage: dict[str, int],
) -> list[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    events = [chunk({"role": "assistant", "content": ""})]
    if content:
        step = max(1, len(content) // 3)
        events.extend(
            chunk({"content": content[i : i + step]}) for i in range(0, len(content), step)
        )
    for index, call in enumerate(tool_calls):
        events.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""},
                        }
                    ]
                }
            )
        )
        events.append(
            chunk(
                {
                    "tool_calls": [
                        {"index": index, "function": {"arguments": call["function"]["arguments"]}}
                    ]
                }
            )
        )
    events.append(chunk({}, finish))
    events.append(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [],
            "usage": usage,
        }
    )
    return events
