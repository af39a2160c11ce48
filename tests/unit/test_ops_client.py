"""The admin API client (``ops/client.py``) against peers that do not answer as HTTP servers:
every way the answer can break is one ``OpsError`` line (what ``pop3coexist-admin`` prints and
the console shows), never another exception (the console turned it into a 500 page)."""

from __future__ import annotations

import socket
import threading

import pytest

from pop3coexist.ops.client import ApiClient
from pop3coexist.ops.context import OpsError


def _peer(answer: bytes) -> tuple[str, threading.Thread]:
    """A one-connection server on a loopback port the OS picks: reads the request, writes
    ``answer``, closes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                got = b""
                while b"\r\n\r\n" not in got:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    got += chunk
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", thread


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\"",
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 200 + b"\r\n{}",
    b"",
], ids=["cut-short", "not-http", "too-many-headers", "closed-at-once"])
def test_a_broken_answer_is_one_ops_error_line(answer: bytes) -> None:
    """A body shorter than its Content-Length, a status line that is not HTTP, more header
    lines than http.client takes, or a close before any answer: OpsError naming the URL, on
    one line, without the bytes the peer sent."""
    url, thread = _peer(answer)
    with pytest.raises(OpsError) as caught:
        ApiClient(url, token="t0ken-never-shown").call("stat", {})
    thread.join(5)
    text = str(caught.value)
    assert url in text and "\n" not in text
    assert "t0ken-never-shown" not in text and "OpenSSH" not in text
