"""`--address` checked before Ray is asked: Ray's own join retries for over 10 minutes where no head answers; and the
local Ray a run starts without one listens on 127.0.0.1 alone.

A real head (gRPC) is asked in tests/test_job_submit.py and tests/test_faults.py (slow tier); here,
the listeners a user may point at by mistake.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from orchestrator import address
from orchestrator.errors import ClusterUnreachableError
from workers.config import ConfigError


@contextlib.contextmanager
def _serving(reply: bytes | None) -> Iterator[int]:
    """A TCP listener on 127.0.0.1 that sends `reply` to whoever connects and keeps the line open
    (None: sends nothing; b"": closes at once)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    held = []

    def serve() -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while not stop.is_set():
                connection, _ = server.accept()
                if reply:
                    connection.sendall(reply)
                if reply == b"":
                    connection.close()
                else:
                    held.append(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)  # wakes the accept
        server.close()
        for connection in held:
            connection.close()


def test_an_http_server_is_named_as_such_in_seconds():
    """The dashboard's port (8265) is the address `ray job submit` takes; given to `run`, Ray's join retried it for 10 minutes."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(ConfigError, match=r"answers, but not as a Ray head does: an HTTP/1 server, such as the Ray dashboard"):
            address.check_listening(f"127.0.0.1:{server.server_address[1]}")
        assert time.monotonic() - started < 5
    finally:
        server.shutdown()
        server.server_close()


def test_a_listener_that_never_answers_stops_within_the_join_timeout(monkeypatch):
    """Nothing sent back: a head may be starting, so this is the cluster's error (rerun once it is up)."""
    monkeypatch.setattr(address, "JOIN_TIMEOUT_SECONDS", 1.0)
    with _serving(None) as port:
        started = time.monotonic()
        with pytest.raises(ClusterUnreachableError, match=rf"no answer from 127.0.0.1:{port} within 1 s"):
            address.check_listening(f"127.0.0.1:{port}")
        assert time.monotonic() - started < 5


@pytest.mark.parametrize(("reply", "words"), [
    (b"-ERR unknown command 'PRI'\r\n", "it sent b'-ERR unkn"),  # Redis
    (b"", "it closed the connection"),
    (bytes([0x15, 3, 3, 0, 2, 2, 70]), "it speaks TLS; if the cluster does, set RAY_USE_TLS=1"),  # a TLS alert
])
def test_other_servers_are_refused_with_what_they_sent(reply, words):
    with _serving(reply) as port, pytest.raises(ConfigError, match=rf"--address 127.0.0.1:{port} answers, but not as a Ray head does: {words}"):
        address.check_listening(f"127.0.0.1:{port}")


def test_an_http2_server_passes():
    """What a gRPC server (a Ray head, a Ray client server) sends first: its SETTINGS frame (here with one setting)."""
    settings = bytes([0, 0, 6, address.HTTP2_SETTINGS, 0, 0, 0, 0, 0]) + bytes([0, 3, 0, 0, 0, 100])
    with _serving(settings) as port:
        address.check_listening(f"127.0.0.1:{port}")
        address.check_listening(f"ray://127.0.0.1:{port}")


def test_a_dashboard_url_is_refused_with_what_to_give_instead():
    with pytest.raises(ConfigError, match=r"is a dashboard URL.*port 6379 by default.*--address auto"):
        address.check_listening("http://127.0.0.1:8265")


LISTENERS = """
import json, os, psutil, ray
from ray._private import ray_constants
from orchestrator.driver import connect

connect(None, dashboard=True)  # the local cluster `steerscale run` starts
try:
    print(json.dumps([os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), ray_constants.ENABLE_RAY_CLUSTER]))
    @ray.remote(num_cpus=0)
    class Probe:
        def ready(self) -> bool:
            return True

    ray.get(Probe.remote().ready.remote(), timeout=120)  # a worker too
    listening = []
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            listening += [[process.name(), c.laddr.ip, c.laddr.port] for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    print(json.dumps(listening))
finally:
    ray.shutdown()
"""


def test_the_local_ray_a_run_starts_listens_on_loopback_alone():
    """`dashboard_host="127.0.0.1"` moved the dashboard alone: GCS, raylet, the workers, the dashboard's agents and
    three metrics ports (which answer /metrics without Ray's token) listened on every interface."""
    run = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    listening = json.loads(run.stdout.splitlines()[-1])
    assert json.loads(run.stdout.splitlines()[-2]) == [None, True]  # put back: a later `ray start` from here would refuse to join
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names and names & {"ray::Probe", "ray::IDLE"}, listening  # a worker too (titled late)
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, ip, _ in listening), listening
