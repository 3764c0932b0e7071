"""Whether `--address` names a Ray head, asked in seconds before `ray.init` is.

Ray's own join retries an address for over 10 minutes, printing only warnings, both where nothing
listens and where something other than Ray does — the dashboard's port (8265), which `ray job submit`
takes and which users pass here as often as the head's. A Ray head (GCS, port 6379 by default) and a
Ray client server (`ray://`, 10001) are gRPC servers: HTTP/2, whose server sends a SETTINGS frame as
soon as a client has sent the connection preface. That one exchange tells them from an HTTP/1 server,
Redis or a silent listener. Written here, not taken from Ray: Ray has no public call that answers
"is a head there" without its own long retries.
"""

from __future__ import annotations

import os
import socket

from workers.config import ConfigError

from orchestrator.errors import ClusterUnreachableError

# How long --address host:port may take to accept a TCP connection, and then to answer the HTTP/2
# preface, before the run stops: a head that is up answers both in well under a second; 10 s still
# allows three lost SYNs (Linux resends at 1, 3 and 7 s).
JOIN_TIMEOUT_SECONDS = 10.0
RAY_ADDRESS_WORDS = ("auto", "local")  # what ray.init takes besides an address: find the running cluster / start one
# RFC 9113 §3.4: the client's connection preface, then its (empty) SETTINGS frame: length 0, type 4, no flags, stream 0.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4  # a frame header's type byte (its 4th) for SETTINGS


def check_listening(address: str) -> None:
    """Stop within seconds unless a gRPC server answers at a "host:port" or "ray://host:port" address:
    ClusterUnreachableError (exit 3: rerun once it is up) where nothing answers, ConfigError (exit 2:
    a wrong address) where something else does.

    "auto" and "local" are left to Ray: they name no port to try. A dashboard URL (http://…) and any
    other form are refused with what to give instead (Ray's ValueError traceback otherwise).
    """
    if address in RAY_ADDRESS_WORDS:
        return
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address} is a dashboard URL, the address `ray job submit` takes; a driver joins "
                          "the cluster at the head's host:port (as `ray start --head` prints it, port 6379 by default), "
                          "or with `--address auto` on a node of the cluster — e.g. inside `ray job submit`")  # fmt: skip
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address}: give the head's host:port (as `ray start --head` prints it), "
                          f"ray://host:port for a Ray client server, or {' / '.join(RAY_ADDRESS_WORDS)}")  # fmt: skip
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=JOIN_TIMEOUT_SECONDS) as connection:
            if _tls():  # a head that takes TLS only would close on the plain preface: the port's answer is enough
                return
            try:
                connection.sendall(HTTP2_PREFACE)
                reply = _first_bytes(connection, 4)  # a frame header's type is its 4th byte
            except (ConnectionResetError, BrokenPipeError):  # it closed on us while the preface was on its way
                reply = b""
    except TimeoutError as err:
        raise unreachable(address, f"no answer from {host}:{port} within {JOIN_TIMEOUT_SECONDS:g} s") from err
    except OSError as err:  # refused, or a host name that does not resolve
        raise unreachable(address, err) from err
    if len(reply) < 4 or reply[3] != HTTP2_SETTINGS:  # something is up there, but not a head: waiting will not help
        raise ConfigError(f"--address {address} answers, but not as a Ray head does: {_describe(reply)}. Give the "
                          "address `ray start --head` printed (the head's GCS port, 6379 by default). Nothing ran")  # fmt: skip


def unreachable(address: str, reason: object) -> ClusterUnreachableError:
    return ClusterUnreachableError(
        f"no Ray cluster to join at --address {address} ({reason}); start one (`ray start --head`), or leave "
        "--address out to run on a private local Ray. Nothing ran; rerun the same command once it is up"
    )


def _tls() -> bool:
    """Whether Ray is set to speak TLS (RAY_USE_TLS, as Ray reads it)."""
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def _first_bytes(connection: socket.socket, at_least: int) -> bytes:
    """What the server sends first, read until `at_least` bytes have come (fewer where it closes)."""
    reply = b""
    while len(reply) < at_least:
        chunk = connection.recv(64)
        if not chunk:
            break
        reply += chunk
    return reply


def _describe(reply: bytes) -> str:
    """What answered, in words a user can act on."""
    if reply.startswith((b"HTTP/", b"<")):  # a status line, or straight to an HTML error page (Python's http.server)
        return ("an HTTP/1 server, such as the Ray dashboard (port 8265 by default), which `ray job submit` takes; "
                "a driver joins at the head's GCS port, 6379 by default")  # fmt: skip
    if not reply:
        return "it closed the connection without a word"
    if reply[0] in (0x15, 0x16):  # a TLS record: an alert, or a handshake
        return "it speaks TLS; if the cluster does, set RAY_USE_TLS=1 and Ray's certificate variables here too"
    return f"it sent {reply[:9]!r}"
