"""Free TCP ports on 127.0.0.1 for servers that another process binds later.

A port the kernel hands out for ``bind(("127.0.0.1", 0))`` comes from the ephemeral range,
the same range every outgoing connection on the machine takes its local port from: between
choosing the port and the server binding it, a busy machine (a load test next door) may use
it for a connection. :func:`free_port` picks from below that range instead, where only
explicit binds land, and checks the port is bindable now.
"""

from __future__ import annotations

import random
import socket

#: Lowest port :func:`free_port` picks (above the well-known and common service ports).
LOWEST_PORT = 20000
_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


def _first_ephemeral_port() -> int:
    try:
        with open(_EPHEMERAL_RANGE, encoding="ascii") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS and others start at 49152


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now, outside the ephemeral range when it can be."""
    upper = _first_ephemeral_port()
    choose = random.SystemRandom()
    if upper - LOWEST_PORT >= 1000:
        for _ in range(50):
            port = choose.randrange(LOWEST_PORT, upper)
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
