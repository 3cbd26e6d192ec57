"""Free loopback ports for the cluster tests' servers, below the kernel's ephemeral range (32768-60999: there an
outgoing connection may take a port between our probe and the server's bind) and above Ray's worker ports
(10002-19999)."""

from __future__ import annotations

import random
import socket


def free_port(low: int, high: int, host: str = "127.0.0.1") -> int:
    """A port in [low, high) that `host` can bind now."""
    for port in random.sample(range(low, high), min(200, high - low)):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high - 1}")
