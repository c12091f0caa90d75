"""Issue 15 #1 and #9 over a real socket: slow or idle clients cannot take the request threads, their
connections are closed after the read deadlines, and a chunked body over SDFC_MAX_BODY_BYTES is refused (413),
never cut short."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from .live_server import PASSWORD, USER, start_server

LIMIT_BODY = 64 * 1024
HEADER_TIMEOUT, BODY_TIMEOUT, IDLE_TIMEOUT = 4, 5, 2
SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 1}
AUTH_HEADER = "Authorization: Basic " + __import__("base64").b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("hardening-server"),
                       env={"SDFC_MAX_BODY_BYTES": str(LIMIT_BODY), "SDFC_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT),
                            "SDFC_BODY_TIMEOUT_S": str(BODY_TIMEOUT), "SDFC_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT)},
                       args=("--threads", "4"))
    yield srv
    srv.stop()


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Dripper(threading.Thread):
    """A client that sends `head` at once and then one byte of `tail` every `every` seconds, until stopped or
    the server closes the connection (noted in `closed_after`)."""

    def __init__(self, server, head: bytes, tail: bytes, every: float = 0.25):
        super().__init__(daemon=True)
        self.sock, self.head, self.tail, self.every = connect(server), head, tail, every
        self.stop_event = threading.Event()
        self.closed_after: float | None = None

    def run(self):
        started = time.monotonic()
        try:
            self.sock.sendall(self.head)
            for byte in self.tail:
                if self.stop_event.wait(self.every):
                    return
                self.sock.sendall(bytes([byte]))
        except OSError:  # the server closed the connection
            self.closed_after = time.monotonic() - started
        finally:
            self.sock.close()


def header_dripper(server) -> Dripper:
    return Dripper(server, b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\n",
                   b"X-Slow: " + b"a" * 400 + b"\r\n\r\n")


def body_dripper(server) -> Dripper:
    body = b'{"prompt": "' + b"b" * 400 + b'"}'
    head = (f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\n{AUTH_HEADER}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return Dripper(server, head, body)


def closed_within(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the server closes `sock` (EOF or reset), None if still open after `limit`."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < limit:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - started
    return None


def test_slow_header_and_body_clients_do_not_hold_the_request_threads(server):
    # Twice as many dripping connections as there are request threads (4): headers and bodies.
    drippers = [header_dripper(server) for _ in range(4)] + [body_dripper(server) for _ in range(4)]
    for d in drippers:
        d.start()
    try:
        time.sleep(0.5)  # every dripper has sent its first bytes
        started = time.monotonic()
        r = requests.get(server.url + "/sdapi/v1/progress", auth=(USER, PASSWORD), timeout=5)
        assert r.status_code == 200 and time.monotonic() - started < 2
        assert all(d.is_alive() for d in drippers), "served while every dripper was still dripping"
        r = requests.post(server.url + "/sdapi/v1/txt2img", json=SMALL, auth=(USER, PASSWORD), timeout=20)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        r = requests.get(server.url + "/sdapi/v1/options", auth=(USER, PASSWORD), timeout=5)
        assert r.status_code == 200
    finally:
        for d in drippers:
            d.stop_event.set()
        for d in drippers:
            d.join(5)


def test_dripping_connections_are_closed_at_the_header_and_body_deadlines(server):
    # One byte every 0.25 s keeps each connection busy (an idle timeout would never fire); the deadline does.
    header, body = header_dripper(server), body_dripper(server)
    header.start(), body.start()
    header.join(HEADER_TIMEOUT + 4), body.join(BODY_TIMEOUT + 4)
    assert header.closed_after is not None and HEADER_TIMEOUT - 0.5 <= header.closed_after <= HEADER_TIMEOUT + 2.5
    assert body.closed_after is not None and BODY_TIMEOUT - 0.5 <= body.closed_after <= BODY_TIMEOUT + 2.5


def test_a_silent_new_connection_is_closed(server):
    # It owes a request's headers (header deadline) and is idle (idle timeout): whichever comes first.
    first = min(HEADER_TIMEOUT, IDLE_TIMEOUT)
    with connect(server) as sock:
        closed = closed_within(sock, first + 4)
    assert closed is not None and first - 0.5 <= closed <= first + 2.5


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(server):
    with connect(server) as sock:
        sock.sendall(f"GET /sdapi/v1/progress HTTP/1.1\r\nHost: x\r\n{AUTH_HEADER}\r\n\r\n".encode())
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        closed = closed_within(sock, IDLE_TIMEOUT + 4)
    assert closed is not None and closed >= IDLE_TIMEOUT - 0.5


def chunked_request(path: str, body: bytes, chunk: int = 4096) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\n{AUTH_HEADER}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + chunk]), body[i:i + chunk]) for i in range(0, len(body), chunk)]
    return head + b"".join(parts) + b"0\r\n\r\n"


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"closed before a response: {data!r}"
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        piece = sock.recv(65536)
        assert piece, "closed mid-body"
        body += piece
    return int(lines[0].split()[1]), headers, body[:length]


def test_a_chunked_body_over_the_limit_is_413_not_cut(server):
    import json
    payload = json.dumps({**SMALL, "prompt": "x" * (LIMIT_BODY + 100)}).encode()
    with connect(server) as sock:
        sock.sendall(chunked_request("/sdapi/v1/txt2img", payload))
        status, headers, body = read_response(sock)
        assert status == 413, body
        answer = json.loads(body)
        assert set(answer) == {"error", "detail", "body", "errors"} and "SDFC_MAX_BODY_BYTES" in answer["detail"]
        # A chunked body within the limit still goes through, on the same connection.
        sock.sendall(chunked_request("/sdapi/v1/txt2img", json.dumps(SMALL).encode(), chunk=7))
        status, _, body = read_response(sock)
        assert status == 200 and len(json.loads(body)["images"]) == 1


def test_a_body_far_over_the_limit_is_not_read_on_and_gets_413(server):
    import json
    # Far beyond what the server buffers: it stops reading and answers at once, in the same shape.
    with connect(server) as sock:
        payload = b'{"prompt": "' + b"y" * (LIMIT_BODY + 2 * 1024 * 1024) + b'"}'
        request = chunked_request("/sdapi/v1/txt2img", payload, chunk=64 * 1024)
        # Send only up to a little past the I/O loop's cut-off, then wait: everything sent is read.
        sock.sendall(request[:LIMIT_BODY + 1024 * 1024 + 200 * 1024])
        status, headers, body = read_response(sock)
    assert status == 413 and "SDFC_MAX_BODY_BYTES" in json.loads(body)["detail"]
    assert headers.get("connection", "").lower() == "close"
    assert requests.get(server.url + "/sdapi/v1/progress", auth=(USER, PASSWORD), timeout=5).status_code == 200
