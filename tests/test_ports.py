"""Ports for servers started in subprocesses stay out of the ephemeral range, where outgoing
connections of a busy machine take their local ports."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

from crew_otel.testing import ports


def test_free_ports_are_bindable_and_below_the_ephemeral_range():
    first_ephemeral = ports._first_ephemeral_port()
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda _: ports.free_port(), range(64)))
    for port in found:
        assert ports.LOWEST_PORT <= port < first_ephemeral, port
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    # an outgoing connection's local port is in the ephemeral range, never one of these
    with socket.socket() as server, socket.create_connection(_listen(server), timeout=5) as client:
        assert client.getsockname()[1] >= first_ephemeral


def _listen(server: socket.socket) -> tuple[str, int]:
    server.bind(("127.0.0.1", 0))
    server.listen()
    return "127.0.0.1", server.getsockname()[1]


def test_a_demo_service_whose_port_was_taken_starts_on_another(tmp_path, monkeypatch):
    """Ports are chosen free and bound later by the service: another process may take one in
    between (two demos at once); the service starts again on another port."""
    import socket
    import time

    from crew_otel.demo import driver
    from crew_otel.testing import FakeOpenAIProvider

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real_free_port = driver._free_port
    monkeypatch.setattr(driver, "_free_port", lambda: next(ports, None) or real_free_port())
    with taken, FakeOpenAIProvider() as provider:
        service = driver.ServiceProcess("fixed", provider.base_url, tmp_path, None)
        try:
            service.wait_ready(time.monotonic() + driver.STARTUP_TIMEOUT_S)
            assert service.port != taken.getsockname()[1]
            assert "address already in use" in service.log_file.read_text()
        finally:
            service.stop()
