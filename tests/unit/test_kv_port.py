"""The KV port against a hostile network: each test is an attack or a fault, reproduced with
real sockets against a real listener, that the listener must survive without giving away a
transfer, spinning, pinning KV blocks or growing threads."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from typing import Any

import pytest

from kv_transport.transport.base import Publication, TransferError
from kv_transport.transport.channel import ChannelLimits
from kv_transport.transport.collective import CollectiveTransport
from kv_transport.transport.control import ControlRequest, FetchRequest, KVAuth, ProtocolError
from kv_transport.transport.nixl import NixlTransport, _parse_describe
from kv_transport.transport.tcp import TcpTransport
from kv_transport.wire import BufferInfo, TransferHeader, checksum
from tests.unit.kv_port import eventually, frame, raw_request, read_reply

SECRET = b"a-cluster-kv-secret"


def _header(buffers: list[bytes], transfer_id: str) -> TransferHeader:
    return TransferHeader(
        transfer_id=transfer_id, fingerprint="fp", dtype="bfloat16", block_size=16, num_tokens=16,
        num_blocks=1, buffers=[BufferInfo(f"layer.{i}", len(b), len(b), [len(b)]) for i, b in enumerate(buffers)],
        checksum=checksum(buffers),
    )


def _publish(server, transfer_id: str, buffers: list[bytes], ttl_s: float = 30.0) -> list[str]:
    done: list[str] = []
    header = _header(buffers, transfer_id)
    views = [memoryview(b) for b in buffers]
    server.publish(Publication(transfer_id, lambda _ctx: (header, views), lambda t, outcome: done.append(outcome), ttl_s))
    return done


@pytest.fixture()
def pair():
    server, client = TcpTransport(), TcpTransport()
    yield server, client
    server.close()
    client.close()


def _conn_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "tandem-kv-conn")


# ---- numbers and shapes from the wire ------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("wait_s", math.nan), ("wait_s", math.inf), ("wait_s", -1.0), ("wait_s", 1e9), ("timeout_s", math.nan),
     ("timeout_s", -5), ("timeout_s", 0), ("skip_blocks", -1), ("skip_blocks", 1.5), ("skip_blocks", True),
     ("transfer_id", 7), ("puller", "x" * 300), ("store_port", 70_000), ("v", 1)],
)
def test_a_request_with_a_bad_field_is_refused_at_once(pair, field, value):
    """A NaN wait used to make a listener thread spin forever holding the GIL."""
    server, client = pair
    done = _publish(server, "kept", [b"x" * 100])
    body = ControlRequest(op="pull", transfer_id="kept").fields() | {field: value}
    reply = raw_request(server.address, frame(json.dumps(body).encode()))
    assert reply is not None and reply["code"] in ("bad_request", "version")
    # Nothing was taken: the real puller still gets it.
    header, _ = client.fetch(server.address, FetchRequest("kept"))
    assert header.payload_nbytes == 100 and eventually(lambda: done == ["pulled"])


@pytest.mark.parametrize("body", [b"[1, 2]", b'"pull"', b"{not json", b"\xff\xfe", json.dumps({"op": "pull", "extra": 1}).encode()])
def test_a_request_that_is_not_an_object_of_known_fields_is_refused(pair, body):
    server, _ = pair
    reply = raw_request(server.address, frame(body))
    assert reply is not None and reply["code"] == "bad_request"


def test_an_oversize_or_foreign_prefix_is_dropped_without_reading_it(pair):
    server, client = pair
    for data in (frame(b"{}")[:4] + (1 << 30).to_bytes(4, "little"), b"GET / HTTP/1.1\r\n\r\n"):
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(data)
            assert read_reply(sock) is None  # closed, nothing read or allocated for the body
    _publish(server, "after", [b"kv"])
    assert bytes(client.fetch(server.address, FetchRequest("after"))[1][0]) == b"kv"


# ---- authentication --------------------------------------------------------------------------


def _secured() -> tuple[TcpTransport, TcpTransport]:
    server, client = TcpTransport(), TcpTransport()
    server.set_secret(SECRET)
    client.set_secret(SECRET)
    return server, client


def test_the_mac_covers_every_field():
    """A captured, authenticated request cannot be edited: each field it carries changes
    what the publisher does (here: the blocks it skips), so each is under the MAC."""
    server, client = _secured()
    try:
        done = _publish(server, "guarded", [b"x" * 100])
        auth = KVAuth(SECRET)
        signed = json.loads(ControlRequest(op="pull", transfer_id="guarded").encode(auth)[8:])
        for field, value in (("skip_blocks", 3), ("wait_s", 30.0), ("puller", "evil:1"), ("op", "release"),
                             ("timeout_s", 600.0), ("transfer_id", "other")):
            reply = raw_request(server.address, {**signed, field: value})
            assert reply is not None and reply["code"] == "unauthorized", field
        header, _ = client.fetch(server.address, FetchRequest("guarded"))
        assert header.payload_nbytes == 100 and eventually(lambda: done == ["pulled"])
    finally:
        server.close()
        client.close()


def test_a_request_cannot_be_replayed():
    server, _ = _secured()
    try:
        auth = KVAuth(SECRET)
        _publish(server, "first", [b"one"])
        captured = ControlRequest(op="release", transfer_id="first").encode(auth)
        assert raw_request(server.address, captured) == {"released": "first"}
        # The same bytes again, for a transfer published under the same id later: refused.
        done = _publish(server, "first", [b"two"])
        reply = raw_request(server.address, captured)
        assert reply is not None and reply["code"] == "unauthorized"
        stale = ControlRequest(op="release", transfer_id="first", ts=time.time() - 3600).encode(auth)
        reply = raw_request(server.address, stale)
        assert reply is not None and reply["code"] == "unauthorized"
        assert done == []  # still published
    finally:
        server.close()


def _fake_publisher(answer) -> tuple[socket.socket, dict[str, Any]]:
    """A listener that answers one request with ``answer(request_json)``: whoever can answer
    on a publisher's address."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            prefix = conn.recv(8, socket.MSG_WAITALL)
            request = json.loads(conn.recv(int.from_bytes(prefix[4:], "little"), socket.MSG_WAITALL))
            conn.sendall(answer(request))
            time.sleep(1)

    threading.Thread(target=serve, daemon=True).start()
    return listener, {"host": "127.0.0.1", "port": listener.getsockname()[1]}


@pytest.mark.parametrize("forgery", ["no_mac", "wrong_key", "other_request"])
def test_a_reply_that_is_not_authenticated_is_refused_before_it_is_used(forgery):
    """Someone who can answer on a publisher's address cannot inject KV: the header's MAC
    is bound to the cluster secret and to the request it answers."""
    client = TcpTransport()
    client.set_secret(SECRET)
    payload = [b"injected kv"]
    head = _header(payload, "t").encode()

    def answer(request: dict[str, Any]) -> bytes:
        if forgery == "no_mac":
            return head + payload[0]
        key = KVAuth(b"another-secret-entirely" if forgery == "wrong_key" else SECRET)
        nonce = request["nonce"] if forgery == "wrong_key" else "0" * 32
        return head + key.reply_mac(nonce, b"header", head[8:]) + payload[0]

    listener, address = _fake_publisher(answer)
    try:
        with pytest.raises(TransferError) as err:
            client.fetch(address, FetchRequest("t", timeout_s=5))
        assert err.value.code in ("unauthorized", "timeout", "connection")
        if forgery != "no_mac":
            assert err.value.code == "unauthorized"
    finally:
        listener.close()
        client.close()


def test_an_authenticated_streamed_transfer_round_trips():
    server, client = _secured()
    try:
        header = _header([b""], "s")
        header.buffers = [BufferInfo("layer.0", 0, 100, [1]), BufferInfo("layer.1", 0, 100, [1])]
        header.checksum, header.streamed = "", True
        header.codec.id = "zstd3"
        layers = [b"first", b"second"]
        server.publish(Publication("s", lambda _ctx: (header, iter(memoryview(x) for x in layers)),
                                   lambda t, o: None))
        received_header, received = client.fetch(server.address, FetchRequest("s"))
        assert [bytes(v) for v in received] == layers and received_header.checksum == checksum(layers)
    finally:
        server.close()
        client.close()


# ---- resources before authentication ---------------------------------------------------------


def test_idle_strangers_cost_a_bounded_number_of_threads_and_are_cut_off():
    limits = ChannelLimits(max_connections=4, handshake_timeout_s=0.5, idle_timeout_s=5.0, client_idle_s=2.0)
    server, client = TcpTransport(limits=limits), TcpTransport()
    before = _conn_threads()
    strangers = [socket.create_connection((server.host, server.port), timeout=10) for _ in range(50)]
    try:
        # At most max_connections are served at all; the rest are closed at accept.
        assert _conn_threads() - before <= 4
        # Those served are dropped at the pre-authentication deadline.
        closed = 0
        for sock in strangers:
            try:
                closed += sock.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(strangers)
        assert eventually(lambda: _conn_threads() == before)
        _publish(server, "served", [b"kv"])
        assert bytes(client.fetch(server.address, FetchRequest("served"))[1][0]) == b"kv"
    finally:
        for sock in strangers:
            sock.close()
        server.close()
        client.close()


def test_a_stranger_who_starts_a_request_and_stalls_is_cut_off():
    limits = ChannelLimits(handshake_timeout_s=0.5, idle_timeout_s=5.0, client_idle_s=2.0)
    server = TcpTransport(limits=limits)
    try:
        data = frame(json.dumps(ControlRequest(op="pull", transfer_id="x").fields()).encode())
        with socket.create_connection((server.host, server.port), timeout=20) as sock:
            sock.sendall(data[:10])  # the prefix and two bytes of the body, then nothing
            assert sock.recv(1) == b""  # closed by the listener, not left waiting
    finally:
        server.close()


# ---- deadlines -------------------------------------------------------------------------------


def test_a_trickling_publisher_cannot_stretch_a_pull_past_its_deadline():
    """The deadline is for the whole transfer: a byte every 0.2 s never trips a per-read
    timeout of a second, yet the pull ends at its deadline as a timeout."""
    payload = b"x" * 1000
    head = _header([payload], "t").encode()

    listener = socket.create_server(("127.0.0.1", 0))

    def trickle():
        conn, _ = listener.accept()
        with conn:
            prefix = conn.recv(8, socket.MSG_WAITALL)
            conn.recv(int.from_bytes(prefix[4:], "little"), socket.MSG_WAITALL)
            conn.sendall(head)
            for byte in payload:
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.2)

    threading.Thread(target=trickle, daemon=True).start()
    client = TcpTransport()
    try:
        with pytest.raises(TransferError) as err:
            client.fetch({"host": "127.0.0.1", "port": listener.getsockname()[1]},
                         FetchRequest("t", timeout_s=1.0, wait_s=0))
        assert err.value.code == "timeout"
    finally:
        listener.close()
        client.close()


def test_a_puller_that_stops_reading_cannot_pin_the_blocks_past_their_ttl():
    """The publisher sends with a deadline no later than the publication's TTL: the
    transfer is reported failed (its blocks freed) while the puller still holds the
    connection open without reading."""
    server = TcpTransport()
    try:
        done = _publish(server, "big", [bytes(96 << 20)], ttl_s=1.0)
        with socket.create_connection((server.host, server.port), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(ControlRequest(op="pull", transfer_id="big", timeout_s=600.0).encode(None))
            assert eventually(lambda: done == ["send_failed"], timeout_s=30)
    finally:
        server.close()


def test_releases_and_pulls_are_bounded_by_their_own_deadline(pair):
    server, client = pair
    with socket.socket() as sock:  # a publisher that accepts and never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        address = {"host": "127.0.0.1", "port": sock.getsockname()[1]}
        with pytest.raises(TransferError) as err:
            client.release(address, "x", timeout_s=0.5)
        assert err.value.code == "timeout"
        with pytest.raises(TransferError) as err:
            client.fetch(address, FetchRequest("x", timeout_s=0.5, wait_s=0))
        assert err.value.code == "timeout"


def test_fetch_requests_are_checked_where_they_are_made():
    for bad in ({"timeout_s": math.nan}, {"wait_s": -1}, {"skip_blocks": -2}, {"timeout_s": 1e6}):
        with pytest.raises(ProtocolError):
            FetchRequest("t", **bad)
    assert FetchRequest("t", timeout_s=2, wait_s=3).budget_s == 5


# ---- the other transports' metadata ----------------------------------------------------------


def _describe(regions: Any, payload_nbytes: int = 100) -> bytes:
    import base64

    header = _header([b"x" * payload_nbytes], "n")
    return json.dumps({"header": base64.b64encode(header.encode()).decode(),
                       "agent": base64.b64encode(b"agent").decode(), "regions": regions}).encode()


@pytest.mark.parametrize(
    "regions",
    [[[4096, -100], [8192, 200]], [[-1, 100]], [[4096, 50]], [[4096, 100.0]], [[4096, True]], "regions",
     [[1, 2, 3]], [[4096, 50]] * 100_000],
)
def test_nixl_descriptors_are_checked_before_any_is_made(regions):
    with pytest.raises(TransferError):
        _parse_describe(_describe(regions))


def test_nixl_describe_is_authenticated():
    server, stranger = NixlTransport(), NixlTransport()
    server.set_secret(SECRET)
    try:
        done = _publish(server, "n", [os.urandom(1000)])
        with pytest.raises(TransferError) as err:
            stranger.fetch(server.address, FetchRequest("n", timeout_s=5, wait_s=0))
        assert err.value.code == "unauthorized" and done == []
    finally:
        server.close()
        stranger.close()


def test_a_collective_join_cannot_send_the_publisher_elsewhere():
    """A join names the rendezvous store the publisher connects to: only a store on the
    host the request came from is joined."""
    server = CollectiveTransport(backend="gloo", timeout_s=5)
    try:
        join = ControlRequest(op="collective_join", group="g1", store_host="198.18.0.77", store_port=29500)
        reply = raw_request(server.address, json.loads(join.encode(None)[8:]))
        assert reply is not None and reply["code"] == "bad_request"
    finally:
        server.close()


def test_a_puller_from_before_the_versioned_contract_is_told_so(pair):
    server, _ = pair
    _publish(server, "old", [b"kv"])
    reply = raw_request(server.address, {"op": "pull", "transfer_id": "old", "wait_s": 0.0})
    assert reply is not None and reply["code"] == "version"
