"""The connector's worker side without vLLM: a prefill worker publishes a request's blocks,
a decode worker pulls them into blocks of its own cache, over real transports on loopback.
Caches are CPU tensors in vLLM's CPU layout, registered as vLLM registers them.

Also what a decode worker does with a publisher it cannot trust: a header for more than it
asked for is refused before anything is allocated for it (and before a block is written),
and with a secret an answer nobody signed is refused unread.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from kv_transport import codecs
from kv_transport.connector import (
    ConnectorConfig,
    RecvSpec,
    SendSpec,
    TandemConnectorMetadata,
    TandemConnectorWorker,
    TransferDescription,
)
from kv_transport.contract import AUTH_SECRET_ENV
from kv_transport.transport.control import SMALL
from kv_transport.transport.nixl import nixl_available
from kv_transport.wire import CHUNK_PREFIX, BufferInfo, CodecSpec, TransferHeader

BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM, LAYERS = 12, 2, 16, 32, 3
MODEL = "model"
SEND_IDS = [3, 7, 1, 9]  # the prefill's blocks of one request, the last one partial
RECV_IDS = [0, 5, 11, 2]  # the decode's blocks for the same request
NUM_TOKENS = 3 * BLOCK_SIZE + 5
GIB = 1 << 30
# Far beyond anything the transfers here need: what a refused header must never cost.
HUGE = 60 * GIB
# Generous: only bounds a hang, never measures anything.
WAIT_S = 30.0

TRANSPORTS = [
    "tcp",
    pytest.param("nixl", marks=pytest.mark.skipif(not nixl_available(), reason="NIXL not available")),
]


@pytest.fixture(autouse=True)
def _no_ambient_secret(monkeypatch):
    """Each test chooses its secrets; one in the environment would change every worker."""
    monkeypatch.delenv(AUTH_SECRET_ENV, raising=False)


def _caches(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.self_attn.attn": torch.randn(
            BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM, generator=generator
        ).to(torch.bfloat16)
        for i in range(LAYERS)
    }


class _Worker:
    """A registered worker and its cache."""

    def __init__(self, seed: int, model: str = MODEL, **config: Any):
        settings = dict(telemetry_sinks=[], port=0, pull_timeout_s=10.0, wait_for_publication_s=5.0) | config
        self.caches = _caches(seed)
        self.worker = TandemConnectorWorker(
            ConnectorConfig(**settings), block_size=BLOCK_SIZE, model=model, num_blocks=BLOCKS
        )
        self.worker.register(self.caches)
        self.finished_sending: set[str] = set()
        self.finished_recving: set[str] = set()
        self.failed_recving: set[str] = set()

    @property
    def address(self) -> dict[str, Any]:
        return self.worker.transport.address

    def blocks(self, block_ids: list[int]) -> list[torch.Tensor]:
        return [tensor[block_ids].clone() for _, tensor in sorted(self.caches.items())]

    def collect(self) -> None:
        results = self.worker.transfer_results()
        self.finished_sending |= results.finished_sending
        self.finished_recving |= results.finished_recving or set()
        self.failed_recving |= results.failed_recving or set()

    def wait_for(self, done: Callable[[_Worker], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while True:
            self.collect()
            if done(self):
                return
            if time.monotonic() > deadline:
                raise AssertionError("the worker never reported")
            time.sleep(0.02)

    def pulled(self, request_id: str) -> None:
        self.wait_for(lambda w: request_id in w.finished_recving)

    def sent(self, request_id: str) -> None:
        self.wait_for(lambda w: request_id in w.finished_sending)

    def records(self) -> list[dict[str, Any]]:
        stats = self.worker.take_stats()
        return [] if stats is None else list(stats.data["records"])


@pytest.fixture()
def make_worker() -> Iterator[Callable[..., _Worker]]:
    workers: list[_Worker] = []

    def make(seed: int, **kwargs: Any) -> _Worker:
        workers.append(_Worker(seed, **kwargs))
        return workers[-1]

    yield make
    for made in workers:
        made.worker.shutdown()


def _description(address: dict[str, Any], transfer_id: str, num_blocks: int = len(SEND_IDS)) -> TransferDescription:
    # Through from_params, as the decode side gets it from the ingress.
    return TransferDescription.from_params(
        {"transfer_id": transfer_id, "address": dict(address), "num_tokens": NUM_TOKENS,
         "num_blocks": num_blocks, "block_size": BLOCK_SIZE}
    )


def _publish(prefill: _Worker, request_id: str, transfer_id: str, profile: str = "") -> TransferDescription:
    prefill.worker.start(TandemConnectorMetadata(
        sends={request_id: SendSpec(transfer_id, list(SEND_IDS), NUM_TOKENS, profile=profile)}
    ))
    return _description(prefill.address, transfer_id)


def _pull(decode: _Worker, request_id: str, transfer: TransferDescription, skip: int = 0) -> None:
    decode.worker.start(TandemConnectorMetadata(
        recvs={request_id: RecvSpec(transfer, RECV_IDS[skip:], skip)}
    ))
    decode.pulled(request_id)


def _tokens(blocks: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    return codecs.blocks_to_kv(blocks, "cpu", num_tokens)


# -- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("skip", [0, 1], ids=["whole", "prefix-hit"])
def test_decode_pulls_the_published_blocks_into_its_own(make_worker, transport, skip):
    prefill, decode = make_worker(1, transport=transport), make_worker(2, transport=transport)
    untouched = [b for b in range(BLOCKS) if b not in RECV_IDS[skip:]]
    before = decode.blocks(untouched)

    transfer = _publish(prefill, "p", "ab" * 16)
    _pull(decode, "d", transfer, skip)

    assert "d" not in decode.failed_recving
    for got, want in zip(decode.blocks(RECV_IDS[skip:]), prefill.blocks(SEND_IDS[skip:]), strict=True):
        assert torch.equal(got, want)  # bit-exact, the last block's padding included
    for got, want in zip(decode.blocks(untouched), before, strict=True):
        assert torch.equal(got, want)  # the prefix-hit block and every other block as they were
    [record] = decode.records()
    assert record["ok"] and record["codec"] == "identity" and record["transport"] == transport
    block_nbytes = decode.worker.layout.block_nbytes
    assert record["wire_bytes"] == record["raw_bytes"] == (len(SEND_IDS) - skip) * block_nbytes
    assert record["saved_bytes"] == skip * block_nbytes
    prefill.sent("p")  # pulled: the prefill may free the blocks
    assert len(prefill.worker.transport.store) == 0


@pytest.mark.parametrize("skip", [0, 2], ids=["whole", "prefix-hit"])
@pytest.mark.parametrize("how", ["static", "pinned"])
def test_a_compressed_transfer_decodes_into_the_decode_blocks(make_worker, skip, how):
    """zstd3 is lossless: the request's tokens arrive bit-exact (the padding of its last block
    is not carried)."""
    if how == "static":
        prefill = make_worker(1, compression_mode="static", compression_profile="zstd3")
        transfer = _publish(prefill, "p", "cd" * 16)
    else:  # the request pinned the profile; compression is off otherwise
        prefill = make_worker(1)
        transfer = _publish(prefill, "p", "cd" * 16, profile="zstd3")
    decode = make_worker(2)
    untouched = [b for b in range(BLOCKS) if b not in RECV_IDS[skip:]]
    before = decode.blocks(untouched)

    _pull(decode, "d", transfer, skip)

    assert "d" not in decode.failed_recving
    carried = NUM_TOKENS - skip * BLOCK_SIZE
    for got, want in zip(decode.blocks(RECV_IDS[skip:]), prefill.blocks(SEND_IDS[skip:]), strict=True):
        for got_part, want_part in zip(_tokens(got, carried), _tokens(want, carried), strict=True):
            assert torch.equal(got_part, want_part)
    for got, want in zip(decode.blocks(untouched), before, strict=True):
        assert torch.equal(got, want)
    [record] = decode.records()
    assert record["ok"] and record["codec"] != "identity"
    assert record["raw_bytes"] == (len(SEND_IDS) - skip) * decode.worker.layout.block_nbytes
    prefill.sent("p")


def test_another_models_kv_is_refused_and_the_blocks_stay_as_they_were(make_worker):
    prefill, decode = make_worker(1, model="other-model"), make_worker(2)
    before = decode.blocks(list(range(BLOCKS)))
    _pull(decode, "d", _publish(prefill, "p", "ef" * 16))
    assert "d" in decode.failed_recving
    [record] = decode.records()
    assert not record["ok"] and "fingerprint" in record["error"]
    for got, want in zip(decode.blocks(list(range(BLOCKS))), before, strict=True):
        assert torch.equal(got, want)


def test_a_transfer_never_published_fails_once_the_wait_is_over(make_worker):
    prefill, decode = make_worker(1), make_worker(2, wait_for_publication_s=0.2)
    _pull(decode, "d", _description(prefill.address, "never-published"))
    assert "d" in decode.failed_recving
    [record] = decode.records()
    assert not record["ok"] and "unknown or expired" in record["error"]


# -- a publisher the decode side cannot trust ---------------------------------------------


@contextlib.contextmanager
def _hostile_publisher(answer: bytes) -> Iterator[dict[str, Any]]:
    """A listener that speaks just enough of the tcp transport: it reads one request and
    answers with ``answer``, then holds the connection until the puller drops it (or the
    block ends)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT_S)
    requests: list[dict[str, Any]] = []
    connections: list[socket.socket] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        connections.append(conn)
        with conn:
            conn.settimeout(WAIT_S)
            try:
                magic, length = SMALL.unpack(conn.recv(SMALL.size, socket.MSG_WAITALL))
                requests.append({"magic": magic, "body": conn.recv(length, socket.MSG_WAITALL)})
                conn.sendall(answer)
                while conn.recv(1 << 16):
                    pass
            except OSError:
                pass

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield {"transport": "tcp", "host": "127.0.0.1", "port": listener.getsockname()[1], "requests": requests}
    finally:
        listener.close()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # a puller that pooled the connection
        server.join(timeout=WAIT_S)


@contextlib.contextmanager
def _no_huge_allocation() -> Iterator[None]:
    """While inside, an allocation of gigabytes fails (MemoryError) instead of taking the
    host down; and the peak resident size must not grow by more than 256 MiB."""
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mapped + 4 * GIB
    if soft != resource.RLIM_INFINITY and soft < cap:
        cap = soft  # already tighter than ours
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown < 256 << 10, f"peak RSS grew by {grown} KiB"


def _hostile_header(decode: _Worker, transfer_id: str, **changes: Any) -> TransferHeader:
    """What an honest publisher would send for SEND_IDS, with ``changes`` applied."""
    layout = decode.worker.layout
    per_layer = len(SEND_IDS) * _block_nbytes_per_layer(decode)
    header = TransferHeader(
        transfer_id=transfer_id, fingerprint=layout.fingerprint, dtype=layout.dtype, block_size=BLOCK_SIZE,
        num_tokens=NUM_TOKENS, num_blocks=len(SEND_IDS),
        buffers=[BufferInfo(layer.name, per_layer, per_layer, [len(SEND_IDS)]) for layer in layout.layers],
        checksum="0" * 16,
    )
    for name, value in changes.items():
        setattr(header, name, value)
    return header


def _sizes(layers: int, nbytes: int, raw_nbytes: int, blocks: int) -> list[BufferInfo]:
    return [BufferInfo(f"model.layers.{i}.self_attn.attn", nbytes, raw_nbytes, [blocks]) for i in range(layers)]


def _pull_from_hostile(decode: _Worker, answer: bytes, transfer_id: str = "hostile") -> dict[str, Any]:
    """Pulls ``transfer_id`` from a publisher that answers ``answer``; the pull's record."""
    untouched = decode.blocks(list(range(BLOCKS)))
    with _hostile_publisher(answer) as address, _no_huge_allocation():
        address = {k: v for k, v in address.items() if k != "requests"}
        _pull(decode, "d", _description(address, transfer_id))
    assert "d" in decode.failed_recving  # decode recomputes the prompt
    for got, want in zip(decode.blocks(list(range(BLOCKS))), untouched, strict=True):
        assert torch.equal(got, want)  # no block was written
    [record] = decode.records()
    assert not record["ok"]
    return record


def _block_nbytes_per_layer(decode: _Worker) -> int:
    layout = decode.worker.layout
    return layout.block_nbytes // len(layout.layers)


HOSTILE_HEADERS = {
    # More blocks than the transfer published, sized consistently (the raw sizes match).
    "more-blocks-than-published": lambda d: dict(
        num_blocks=40, buffers=_sizes(LAYERS, 40 * _block_nbytes_per_layer(d), 40 * _block_nbytes_per_layer(d), 40)
    ),
    # A huge number of blocks and raw bytes to go with it.
    "huge-blocks-and-raw": lambda d: dict(
        num_blocks=HUGE // d.worker.layout.block_nbytes,
        buffers=_sizes(LAYERS, HUGE // LAYERS, HUGE // LAYERS, HUGE // d.worker.layout.block_nbytes),
    ),
    # The published number of blocks, but raw sizes those blocks cannot hold.
    "raw-beyond-the-blocks": lambda d: dict(buffers=_sizes(LAYERS, HUGE // LAYERS, HUGE // LAYERS, len(SEND_IDS))),
    # Uncompressed, the right raw sizes, a huge payload.
    "identity-payload-beyond-raw": lambda d: dict(
        buffers=_sizes(LAYERS, HUGE // LAYERS, len(SEND_IDS) * _block_nbytes_per_layer(d), len(SEND_IDS))
    ),
    # Starts past the published blocks.
    "first-block-past-the-transfer": lambda d: dict(first_block=4),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_a_header_for_more_than_was_published_is_refused_before_allocation(make_worker, case):
    decode = make_worker(2)  # no secret: the header is read unsigned
    header = _hostile_header(decode, "hostile", **HOSTILE_HEADERS[case](decode))
    record = _pull_from_hostile(decode, header.encode())
    assert record["error"].startswith("WireFormatError"), record["error"]


def test_a_streamed_chunk_beyond_its_layer_is_refused_before_allocation(make_worker):
    decode = make_worker(2)
    per_layer = len(SEND_IDS) * _block_nbytes_per_layer(decode)
    header = _hostile_header(
        decode, "hostile", streamed=True, checksum="",
        codec=CodecSpec("zstd3", {"layout": "cpu"}), buffers=_sizes(LAYERS, 0, per_layer, len(SEND_IDS)),
    )
    record = _pull_from_hostile(decode, header.encode() + CHUNK_PREFIX.pack(HUGE))
    assert record["error"].startswith("WireFormatError") and "exceeds" in record["error"], record["error"]


def test_a_whole_compressed_payload_beyond_its_raw_size_is_refused_before_allocation(make_worker):
    decode = make_worker(2)
    per_layer = len(SEND_IDS) * _block_nbytes_per_layer(decode)
    header = _hostile_header(
        decode, "hostile", codec=CodecSpec("zstd3", {"layout": "cpu"}),
        buffers=_sizes(LAYERS, HUGE // LAYERS, per_layer, len(SEND_IDS)),
    )
    record = _pull_from_hostile(decode, header.encode())
    assert record["error"].startswith("WireFormatError"), record["error"]


def test_with_a_secret_an_unsigned_answer_is_refused_unread(make_worker):
    decode = make_worker(2, auth_secret="cluster-secret")
    # Even a header that asks for nothing odd: whoever answers must hold the secret.
    header = _hostile_header(decode, "hostile")
    forged_mac = b"\0" * 32
    record = _pull_from_hostile(decode, header.encode() + forged_mac)
    assert "not authenticated" in record["error"], record["error"]


def test_with_a_secret_a_huge_unsigned_header_is_refused_unread(make_worker):
    decode = make_worker(2, auth_secret="cluster-secret")
    header = _hostile_header(decode, "hostile", **HOSTILE_HEADERS["identity-payload-beyond-raw"](decode))
    record = _pull_from_hostile(decode, header.encode() + b"\0" * 32)
    assert "not authenticated" in record["error"], record["error"]


def test_the_request_a_publisher_sees_is_signed_with_a_secret(make_worker):
    decode = make_worker(2, auth_secret="cluster-secret")
    with _hostile_publisher(b"TKVE" + struct.pack("<I", 2) + b"{}") as address:
        requests = address.pop("requests")
        _pull(decode, "d", _description(address, "t"))
    assert "d" in decode.failed_recving
    assert requests and requests[0]["magic"] == b"TKVQ" and b'"auth":' in requests[0]["body"]


# -- the cluster secret --------------------------------------------------------------------


def test_workers_sharing_a_secret_exchange_kv(make_worker, monkeypatch):
    prefill = make_worker(1, auth_secret="cluster-secret")
    monkeypatch.setenv(AUTH_SECRET_ENV, "cluster-secret")  # the decode's from the environment
    decode = make_worker(2)
    _pull(decode, "d", _publish(prefill, "p", "12" * 16))
    assert "d" not in decode.failed_recving
    for got, want in zip(decode.blocks(RECV_IDS), prefill.blocks(SEND_IDS), strict=True):
        assert torch.equal(got, want)
    prefill.sent("p")


@pytest.mark.parametrize("puller_secret", ["another-secret", None], ids=["wrong", "none"])
def test_a_puller_without_the_secret_gets_nothing_and_the_right_one_still_can(make_worker, puller_secret):
    prefill = make_worker(1, auth_secret="cluster-secret")
    stranger, decode = make_worker(2, auth_secret=puller_secret), make_worker(3, auth_secret="cluster-secret")
    stranger_before = stranger.blocks(list(range(BLOCKS)))
    transfer = _publish(prefill, "p", "34" * 16)

    _pull(stranger, "s", transfer)
    assert "s" in stranger.failed_recving  # recomputes instead
    [record] = stranger.records()
    assert not record["ok"] and "not authenticated" in record["error"], record["error"]
    for got, want in zip(stranger.blocks(list(range(BLOCKS))), stranger_before, strict=True):
        assert torch.equal(got, want)
    prefill.collect()
    assert "p" not in prefill.finished_sending  # still published
    assert len(prefill.worker.transport.store) == 1

    _pull(decode, "d", transfer)
    assert "d" not in decode.failed_recving
    for got, want in zip(decode.blocks(RECV_IDS), prefill.blocks(SEND_IDS), strict=True):
        assert torch.equal(got, want)
    prefill.sent("p")


def test_a_publication_only_a_stranger_asked_for_expires(make_worker):
    prefill = make_worker(1, auth_secret="cluster-secret", ttl_s=0.3)
    stranger = make_worker(2, auth_secret="another-secret")
    _pull(stranger, "s", _publish(prefill, "p", "56" * 16))
    assert "s" in stranger.failed_recving
    prefill.sent("p")  # the TTL freed the blocks
    stats = prefill.worker.take_stats()
    assert stats is not None and stats.data["num_kv_expired_reqs"] == [1]


# -- release ---------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [None, "cluster-secret"], ids=["open", "secret"])
def test_a_decode_side_release_frees_the_publication_early(make_worker, secret):
    prefill = make_worker(1, auth_secret=secret, ttl_s=600.0)
    decode = make_worker(2, auth_secret=secret)
    transfer = _publish(prefill, "p", "78" * 16)
    assert len(prefill.worker.transport.store) == 1

    decode.worker.start(TandemConnectorMetadata(releases=[transfer]))

    prefill.sent("p")  # long before its TTL
    assert len(prefill.worker.transport.store) == 0
    assert prefill.worker.take_stats() is None  # released, not expired
    decode.collect()
    assert not decode.finished_recving and not decode.failed_recving  # a release is no pull


def test_a_release_without_the_secret_frees_nothing(make_worker):
    prefill = make_worker(1, auth_secret="cluster-secret", ttl_s=600.0)
    stranger, decode = make_worker(2, auth_secret="another-secret"), make_worker(3, auth_secret="cluster-secret")
    transfer = _publish(prefill, "p", "9a" * 16)
    stranger.worker.start(TandemConnectorMetadata(releases=[transfer]))
    # The stranger's release has run once its release thread is idle again.
    stranger.worker._releaser.submit(lambda: None).result(timeout=WAIT_S)
    prefill.collect()
    assert "p" not in prefill.finished_sending and len(prefill.worker.transport.store) == 1
    decode.worker.start(TandemConnectorMetadata(releases=[transfer]))
    prefill.sent("p")
