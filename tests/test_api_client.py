"""The benches' and simulate's API client: whatever a port answers, an ApiError, never another
exception that a caller waiting for a healthy coordinator would not catch."""

import socket
import threading

import pytest

from skipfleet.coordinator_process import ApiClient, ApiError


def serve_once(answer: bytes) -> tuple[int, threading.Thread]:
    """A port whose first connection gets `answer` (not HTTP) and is closed."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer_and_close() -> None:
        with server:
            connection, _ = server.accept()
            with connection:
                connection.recv(4096)
                connection.sendall(answer)

    thread = threading.Thread(target=answer_and_close, daemon=True)
    thread.start()
    return port, thread


def test_a_port_answering_something_not_http_is_an_api_error():
    port, thread = serve_once(b"SSH-2.0-OpenSSH_9.2\r\n")
    with pytest.raises(ApiError, match=r"GET http://127\.0\.0\.1"):
        ApiClient(f"http://127.0.0.1:{port}", timeout_s=5).get("/health")
    thread.join(5)


def test_a_port_that_closes_without_answering_is_an_api_error():
    port, thread = serve_once(b"")
    with pytest.raises(ApiError):
        ApiClient(f"http://127.0.0.1:{port}", timeout_s=5).get("/health")
    thread.join(5)
