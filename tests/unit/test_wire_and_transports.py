"""The KV wire format and the tcp transport, with real sockets on loopback."""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kv_transport.transport.base import Publication, RateLimiter, TransferError
from kv_transport.transport.collective import CollectiveTransport
from kv_transport.transport.control import ControlRequest, FetchRequest
from kv_transport.transport.nixl import NixlTransport
from kv_transport.transport.tcp import TcpTransport
from kv_transport.wire import (
    CHUNK_PREFIX,
    BufferInfo,
    ChecksumMismatch,
    StreamTrailer,
    TransferHeader,
    WireFormatError,
    checksum,
    split_payload,
    verify,
)
from tests.unit.kv_port import eventually, raw_request


def _header(buffers: list[bytes], transfer_id: str = "t1") -> TransferHeader:
    return TransferHeader(
        transfer_id=transfer_id,
        fingerprint="model:layout",
        dtype="bfloat16",
        block_size=128,
        num_tokens=300,
        num_blocks=3,
        buffers=[BufferInfo(f"layer.{i}", len(b), len(b), [len(b)]) for i, b in enumerate(buffers)],
        checksum=checksum(buffers),
    )


def test_header_round_trip_and_views():
    buffers = [os.urandom(n) for n in (10, 0, 4096)]
    header = _header(buffers)
    frame = header.encode()
    length = TransferHeader.parse_prefix(frame[:8])
    again = TransferHeader.decode(frame[8 : 8 + length])
    assert again == header
    views = split_payload(again, memoryview(b"".join(buffers)))
    assert [bytes(v) for v in views] == buffers
    verify(again, views)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: b"XXXX" + f[4:],  # foreign magic
        lambda f: f[:8] + b"{not json" + f[17:],  # corrupt header
        lambda f: f[:6],  # truncated prefix
    ],
)
def test_corrupt_frames_raise_clean_errors(mutate):
    frame = _header([b"abc"]).encode()
    with pytest.raises(WireFormatError):
        bad = mutate(frame)
        length = TransferHeader.parse_prefix(bad[:8])
        TransferHeader.decode(bad[8 : 8 + length])


def test_hostile_sizes_are_rejected_before_allocation():
    header = _header([b"abc"])
    header.buffers[0].nbytes = 1 << 50
    frame = header.encode()
    with pytest.raises(WireFormatError, match="exceeds"):
        TransferHeader.decode(frame[8:])
    with pytest.raises(WireFormatError):
        TransferHeader.parse_prefix(b"TKV1" + (2**31).to_bytes(4, "little"))


def test_checksum_detects_a_flipped_byte():
    buffers = [bytearray(os.urandom(1000))]
    header = _header([bytes(buffers[0])])
    buffers[0][500] ^= 0x01
    with pytest.raises(ChecksumMismatch):
        verify(header, buffers)


def _fetch(transport, address, transfer_id, *, limiter=None, into=None, landed=None, **request):
    return transport.fetch(address, FetchRequest(transfer_id, **request), limiter=limiter, into=into, landed=landed)


def _transport(kind: str):
    if kind == "tcp":
        return TcpTransport()
    if kind == "nixl":
        return NixlTransport()
    return CollectiveTransport(backend="gloo", timeout_s=20)


@pytest.fixture(params=["tcp", "nixl", "gloo"])
def transports(request):
    server, client = _transport(request.param), _transport(request.param)
    yield server, client
    server.close()
    client.close()


def _publish(server: TcpTransport, transfer_id: str, buffers: list[bytes], ttl_s: float = 30.0):
    done: list[tuple[str, bool]] = []
    header = _header(buffers, transfer_id)
    views = [memoryview(b) for b in buffers]
    server.publish(Publication(transfer_id, lambda _skip=0: (header, views), lambda t, ok: done.append((t, ok)), ttl_s))
    return done


def test_a_puller_that_holds_leading_blocks_gets_only_the_rest(transports):
    """The decode side's own prefix-cache hit stays off the link: the publisher builds the
    frame from the requested first block on."""
    server, client = transports
    layers = [os.urandom(8 * 1024) for _ in range(3)]  # 3 layers x 8 blocks of 1 KiB
    done: list = []

    def materialize(context):
        skip_blocks = context.skip_blocks
        assert context.puller == "decode-7:5555"
        views = [memoryview(layer)[skip_blocks * 1024 :] for layer in layers]
        header = _header([bytes(v) for v in views], "ranged")
        header.num_blocks, header.first_block = 8 - skip_blocks, skip_blocks
        return header, views

    server.publish(Publication("ranged", materialize, lambda t, ok: done.append(ok)))
    header, received = _fetch(client, server.address, "ranged", skip_blocks=5, puller="decode-7:5555")
    assert (header.first_block, header.num_blocks, header.payload_nbytes) == (5, 3, 3 * 3 * 1024)
    views = split_payload(header, received[0])
    verify(header, views)
    assert [bytes(v) for v in views] == [layer[5 * 1024 :] for layer in layers]
    assert eventually(lambda: done == ["pulled"])


def test_a_bad_skip_is_refused_and_the_publication_survives():
    server, client = TcpTransport(), TcpTransport()
    try:
        done = _publish(server, "kept", [b"x" * 100])
        with pytest.raises(ValueError):
            FetchRequest("kept", skip_blocks=-1)  # the puller cannot even ask for it
        body = ControlRequest(op="pull", transfer_id="kept").fields() | {"skip_blocks": -1}
        assert raw_request(server.address, body)["code"] == "bad_request"  # nor a hand-made request
        header, _ = _fetch(client, server.address, "kept")  # still there for a proper pull
        assert header.payload_nbytes == 100
        assert eventually(lambda: done == [("kept", "pulled")])
    finally:
        server.close()
        client.close()


@pytest.mark.parametrize("sizes", [[1], [1 << 20, 3, 0, 12345], [64 << 20, 64 << 20, 64 << 20, 64 << 20]],
                         ids=["tiny", "mixed", "256MiB"])
def test_round_trip_multi_buffer_payloads(transports, sizes):
    server, client = transports
    buffers = [os.urandom(n) if n < (1 << 20) else bytes(range(256)) * (n // 256) for n in sizes]
    done = _publish(server, "big", buffers)
    header, received = _fetch(client, server.address, "big")
    views = split_payload(header, received[0])
    verify(header, views)
    assert [len(v) for v in views] == sizes
    assert bytes(views[-1][:256]) == buffers[-1][:256]
    assert eventually(lambda: done == [("big", "pulled")])


def test_each_buffer_is_reported_as_it_lands(transports):
    """`landed` hears of every buffer, in order, with its bytes; over tcp each one while
    the next is still on the (here rate-limited) wire, elsewhere all after the payload."""
    server, client = transports
    buffers = [os.urandom(n) for n in (300_000, 5, 0, 200_000)]
    _publish(server, "landing", buffers)
    reports: list[tuple[int, bytes, float]] = []

    def landed(header, index, view):
        reports.append((index, bytes(view), time.monotonic()))

    header, received = _fetch(client, server.address, "landing", limiter=RateLimiter(2 << 20, 64 << 10),
                                    landed=landed)
    fetched_at = time.monotonic()
    assert [(i, b) for i, b, _ in reports] == list(enumerate(buffers))
    verify(header, split_payload(header, received[0]))
    if isinstance(client, (NixlTransport, CollectiveTransport)):
        return
    # ~0.25 s at 2 MiB/s: the first buffer was reported well before the last byte arrived.
    assert fetched_at - reports[0][2] > 0.05


def test_a_landed_callback_that_refuses_ends_the_pull(transports):
    server, client = transports
    done = _publish(server, "refused", [os.urandom(1000), os.urandom(1000)])

    def landed(header, index, view):
        raise ValueError("not for this cache")

    with pytest.raises(ValueError):
        _fetch(client, server.address, "refused", landed=landed)
    assert eventually(lambda: len(done) == 1)


def test_transfers_are_single_use_and_unknown_ids_fail_cleanly(transports):
    server, client = transports
    _publish(server, "once", [b"kv"])
    _fetch(client, server.address, "once")
    with pytest.raises(TransferError) as err:
        _fetch(client, server.address, "once", wait_s=0.1)
    assert err.value.code == "unknown_transfer"
    # The failed pull left the pooled connection usable.
    _publish(server, "again", [b"kv2"])
    assert bytes(_fetch(client, server.address, "again")[1][0]) == b"kv2"


def test_pull_waits_for_a_late_publication(transports):
    server, client = transports
    timer = threading.Timer(0.3, lambda: _publish(server, "late", [b"x" * 100]))
    timer.start()
    header, received = _fetch(client, server.address, "late", wait_s=5)
    assert header.payload_nbytes == len(received[0]) == 100


def test_release_frees_a_publication_early(transports):
    server, client = transports
    done = _publish(server, "unwanted", [b"x" * 10], ttl_s=60)
    client.release(server.address, "unwanted")
    assert eventually(lambda: done == [("unwanted", "released")])
    with pytest.raises(TransferError):
        client.release(server.address, "unwanted", timeout_s=1)  # single use


def test_ttl_expiry_reports_undelivered(transports):
    server, _ = transports
    done = _publish(server, "never", [b"x"], ttl_s=0.2)
    assert eventually(lambda: done == [("never", "expired")])
    assert len(server.store) == 0


def test_concurrent_and_many_small_transfers(transports):
    server, client = transports
    payloads = {f"t{i}": [os.urandom(1000 + i), os.urandom(i)] for i in range(200)}
    for tid, bufs in payloads.items():
        _publish(server, tid, bufs)

    def pull(tid):
        header, received = _fetch(client, server.address, tid)
        verify(header, split_payload(header, received[0]))
        return bytes(received[0]) == b"".join(payloads[tid])

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(pull, payloads))


def test_scatter_receive_into_caller_buffers(transports):
    server, client = transports
    buffers = [os.urandom(5000), os.urandom(3000)]
    _publish(server, "scatter", buffers)
    destination = [memoryview(bytearray(1000)), memoryview(bytearray(7000))]
    header, received = _fetch(client, server.address, "scatter", into=lambda h: destination)
    assert received[0].obj is destination[0].obj  # landed where the caller asked
    verify(header, received)
    assert b"".join(bytes(v) for v in destination) == b"".join(buffers)
    _publish(server, "mismatch", buffers)
    with pytest.raises(TransferError):
        _fetch(client, server.address, "mismatch", into=lambda h: [memoryview(bytearray(10))])


def test_peer_gone_is_a_transfer_error(transports):
    _, client = transports
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TransferError):
        _fetch(client, {"host": "127.0.0.1", "port": port}, "x", timeout_s=2)


def test_truncated_stream_is_a_transfer_error(transports):
    # A server that announces a large payload and dies half way.
    _, client = transports
    listener = socket.create_server(("127.0.0.1", 0))
    header = _header([b"a" * 10_000])

    def serve_half():
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(header.encode() + b"a" * 5000)
        conn.close()

    threading.Thread(target=serve_half, daemon=True).start()
    with pytest.raises(TransferError):
        _fetch(client, {"host": "127.0.0.1", "port": listener.getsockname()[1]}, "t1", timeout_s=5)
    listener.close()


def _streamed_header(raw_sizes: list[int], transfer_id: str) -> TransferHeader:
    """A compressed transfer's header as the connector sends it: raw sizes known, sizes on
    the wire and checksum only after each layer is encoded."""
    header = _header([b""] * len(raw_sizes), transfer_id)
    header.buffers = [BufferInfo(f"layer.{i}", 0, raw, [3]) for i, raw in enumerate(raw_sizes)]
    header.checksum, header.streamed = "", True
    header.codec.id = "zstd3"
    return header


def test_a_streamed_publication_arrives_whole_on_every_transport(transports):
    """Layers made one at a time (an encode per layer) reach the puller with their sizes,
    checksum and encode time; over tcp each layer is on its way before the next is made."""
    server, client = transports
    buffers = [os.urandom(n) for n in (200_000, 7, 0, 150_000)]
    made_at: list[float] = []

    def encode_each():
        for buffer in buffers:
            time.sleep(0.05)  # the encode of one layer
            made_at.append(time.monotonic())
            yield memoryview(buffer)

    done: list = []
    header = _streamed_header([2 * len(b) for b in buffers], "streamed")
    server.publish(Publication("streamed", lambda _ctx: (header, encode_each()), lambda t, o: done.append(o)))
    landed_at: list[tuple[int, bytes, float]] = []
    received_header, received = _fetch(client, 
        server.address, "streamed", landed=lambda h, i, view: landed_at.append((i, bytes(view), time.monotonic()))
    )
    assert [(i, b) for i, b, _ in landed_at] == list(enumerate(buffers))
    assert [b.nbytes for b in received_header.buffers] == [len(b) for b in buffers]
    verify(received_header, received)
    assert received_header.codec.params["encode_s"] >= 0.15
    assert eventually(lambda: done == ["pulled"])
    if isinstance(client, (NixlTransport, CollectiveTransport)):
        assert not received_header.streamed  # made whole before sending
        return
    assert received_header.streamed and received_header.measured_wire_s is not None
    # The first layer landed before the last one was even encoded.
    assert landed_at[0][2] < made_at[-1]


def test_a_publisher_failing_mid_stream_tells_the_puller():
    server, client = TcpTransport(), TcpTransport()
    try:
        def encode_then_fail():
            yield memoryview(b"first layer")
            raise RuntimeError("codec exploded")

        done: list = []
        header = _streamed_header([100, 100], "half")
        server.publish(Publication("half", lambda _ctx: (header, encode_then_fail()), lambda t, o: done.append(o)))
        with pytest.raises(TransferError, match="codec exploded") as err:
            _fetch(client, server.address, "half")
        assert err.value.code == "publish_failed"
        assert eventually(lambda: done == ["send_failed"])
        # The link still serves the next transfer.
        _publish(server, "next", [b"kv"])
        assert bytes(_fetch(client, server.address, "next")[1][0]) == b"kv"
    finally:
        server.close()
        client.close()


def test_a_stream_ends_after_the_announced_layers_and_reports_sizes_as_they_land():
    """The sender takes exactly the announced layers (a generator failing after its last
    layer does not turn into an abort where the trailer belongs), and `landed` sees each
    layer's size filled in."""
    server, client = TcpTransport(), TcpTransport()
    try:
        def two_then_fail():
            yield memoryview(b"layer zero")
            yield memoryview(b"layer one!!")
            raise RuntimeError("never asked for")

        server.publish(Publication("exact", lambda _ctx: (_streamed_header([100, 100], "exact"), two_then_fail()),
                                   lambda t, o: None))
        sizes: list[tuple[int, int]] = []
        header, received = _fetch(client, 
            server.address, "exact", landed=lambda h, i, view: sizes.append((h.buffers[i].nbytes, len(view)))
        )
        assert sizes == [(10, 10), (11, 11)]
        verify(header, received)
    finally:
        server.close()
        client.close()


def test_a_header_that_cannot_be_sent_is_reported_to_the_puller():
    server, client = TcpTransport(), TcpTransport()
    try:
        huge = _header([b"kv"], "huge")
        huge.buffers = [BufferInfo(f"model.layers.{i}.self_attn.attn", 0, 0, [1]) for i in range(40_000)]
        server.publish(Publication("huge", lambda _ctx: (huge, []), lambda t, o: None))
        with pytest.raises(TransferError, match="header too large") as err:
            _fetch(client, server.address, "huge")
        assert err.value.code == "publish_failed"
    finally:
        server.close()
        client.close()


@pytest.mark.parametrize(
    "after_header",
    [
        CHUNK_PREFIX.pack(1 << 40),  # a chunk far beyond what its layer encodes to
        CHUNK_PREFIX.pack(3) + b"abc" + b"TKVX" + (2).to_bytes(4, "little") + b"{}",  # foreign trailer
        CHUNK_PREFIX.pack(3) + b"abc" + b"TKVT" + (9).to_bytes(4, "little") + b"{not json",  # corrupt trailer
    ],
)
def test_a_hostile_streamed_frame_is_refused_before_allocation(after_header):
    client = TcpTransport()
    listener = socket.create_server(("127.0.0.1", 0))
    header = _streamed_header([1000], "hostile")

    def serve():
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(header.encode() + after_header)
        time.sleep(0.5)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(WireFormatError):
            _fetch(client, {"host": "127.0.0.1", "port": listener.getsockname()[1]}, "hostile", timeout_s=5)
    finally:
        listener.close()
        client.close()


def test_a_trailer_with_the_wrong_checksum_fails_verification():
    header = _streamed_header([10, 10], "t")
    header.complete_stream([3, 3], StreamTrailer.decode(StreamTrailer(checksum([b"abc", b"abd"]), 0.01).encode()[8:]))
    with pytest.raises(ChecksumMismatch):
        verify(header, [b"abc", b"abc"])


@pytest.mark.parametrize("encode_s", ["NaN", "Infinity", "true", '"fast"'])
def test_a_trailer_with_a_non_finite_or_foreign_encode_time_is_refused(encode_s):
    body = ('{"checksum": "00", "encode_s": ' + encode_s + "}").encode()
    with pytest.raises(WireFormatError):
        StreamTrailer.decode(body)


def test_a_whole_frame_stays_readable_by_pullers_that_predate_streaming():
    frame = _header([b"abc"]).encode()
    assert b"streamed" not in frame  # an older TransferHeader has no such field
    assert b'"streamed":true' in _streamed_header([10], "s").encode()


def test_the_receive_side_measurement_never_comes_from_the_wire():
    header = _streamed_header([10], "t")
    header.measured_wire_s = 0.5
    assert "measured_wire_s" not in header.encode().decode(errors="replace")
    assert TransferHeader.decode(header.encode()[8:]).measured_wire_s is None
    forged = header.encode()[8:].replace(b'"streamed":true', b'"streamed":true,"measured_wire_s":9')
    assert TransferHeader.decode(forged).measured_wire_s is None


def test_rate_limiter_paces_a_link():
    limiter = RateLimiter(bytes_per_s=10 << 20, burst_bytes=64 << 10)
    started = time.monotonic()
    for _ in range(20):
        limiter.consume(256 << 10)  # 5 MiB in total
    assert time.monotonic() - started >= 0.4  # ~0.5 s at 10 MiB/s


@pytest.mark.parametrize("kind", ["tcp", "nixl"])
def test_requests_without_the_cluster_secret_get_nothing(kind):
    """With a KV secret, every request carries an HMAC of what it asks for: a stranger who
    reaches the port (no secret, or a wrong one) is refused and the transfer stays
    available to its real puller."""
    server, stranger, wrong, peer = (_transport(kind) for _ in range(4))
    try:
        server.set_secret(b"cluster-secret")
        wrong.set_secret(b"not-the-secret")
        peer.set_secret(b"cluster-secret")
        done = _publish(server, "guarded", [os.urandom(4096)])
        for client in (stranger, wrong):
            with pytest.raises(TransferError) as err:
                _fetch(client, server.address, "guarded", timeout_s=5, wait_s=0)
            assert err.value.code == "unauthorized"
        header, _ = _fetch(peer, server.address, "guarded")
        assert header.payload_nbytes == 4096
        assert eventually(lambda: done == [("guarded", "pulled")])
    finally:
        for transport in (server, stranger, wrong, peer):
            transport.close()
