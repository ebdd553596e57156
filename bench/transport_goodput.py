"""Raw goodput of Tandem's KV transports against the local ceiling, in one run.

For payloads of 1-256 MiB, a publisher process serves the bytes and this process pulls
them: through the `tcp`, `nixl` and `gloo` transports, and a plain loopback socket that
only copies the same bytes (the ceiling: no framing, no protocol). Each point is the median
of several pulls. Writes bench/results/transport_goodput.{json,csv,png}.

    python -m bench.transport_goodput [--repeats 15] [--sizes-mib 1 4 16 64 256]
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from typing import Any

import typer
from rich.console import Console
from rich.progress import track

from bench.common import RESULTS, markdown_table, median, write_results

MIB = 1 << 20
console = Console()


def _tune(sock: socket.socket) -> None:
    # The ceiling gets the same socket tuning as the tcp transport.
    from kv_transport.transport.channel import tune

    tune(sock)


def _transport(kind: str) -> Any:
    if kind == "tcp":
        from kv_transport.transport.tcp import TcpTransport

        return TcpTransport()
    if kind == "nixl":
        from kv_transport.transport.nixl import NixlTransport

        return NixlTransport()
    from kv_transport.transport.collective import CollectiveTransport

    return CollectiveTransport(backend=kind)


def _publisher(kind: str, max_bytes: int, conn: Any) -> None:
    """Child process: owns the payload and serves it until told to stop."""
    payload = memoryview(bytes(range(256)) * (max_bytes // 256))
    if kind == "socket":
        listener = socket.create_server(("127.0.0.1", 0))
        conn.send({"host": "127.0.0.1", "port": listener.getsockname()[1]})
        client, _ = listener.accept()
        _tune(client)
        while True:
            request = client.recv(16)
            if not request:
                return
            client.sendall(payload[: int.from_bytes(request[:8], "little")])
    from kv_transport.transport.base import Publication
    from kv_transport.wire import BufferInfo, TransferHeader

    transport = _transport(kind)
    conn.send(transport.address)
    while True:
        command = conn.recv()
        if command is None:
            transport.close()
            return
        transfer_id, nbytes = command
        view = payload[:nbytes]
        header = TransferHeader(transfer_id, "bench", "uint8", 1, nbytes, 1, [BufferInfo("payload", nbytes, nbytes)])
        transport.publish(Publication(transfer_id, lambda _skip=0, h=header, v=view: (h, [v]), lambda *_: None))
        conn.send("published")


def _measure(kind: str, sizes: list[int], repeats: int) -> dict[int, list[float]]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_publisher, args=(kind, max(sizes), child), daemon=True)
    proc.start()
    address = parent.recv()
    timings: dict[int, list[float]] = {size: [] for size in sizes}
    try:
        if kind == "socket":
            sock = socket.create_connection((address["host"], address["port"]))
            _tune(sock)
            for size in sizes:
                buffer = bytearray(size)
                for _ in range(repeats + 1):  # +1 warm-up
                    started = time.perf_counter()
                    sock.sendall(size.to_bytes(8, "little"))
                    view = memoryview(buffer)
                    while len(view):
                        view = view[sock.recv_into(view) :]
                    timings[size].append(time.perf_counter() - started)
                timings[size].pop(0)
            sock.close()
            return timings
        from kv_transport.transport.control import FetchRequest

        client = _transport(kind)
        for size in sizes:
            # Like the ceiling, pull into a buffer allocated once (as the connector pulls
            # straight into KV blocks that already exist).
            destination = [memoryview(bytearray(size))]
            for i in range(repeats + 1):
                transfer_id = f"{size}-{i}"
                parent.send((transfer_id, size))
                parent.recv()
                started = time.perf_counter()
                header, _ = client.fetch(address, FetchRequest(transfer_id), into=lambda h, d=destination: d)
                timings[size].append(time.perf_counter() - started)
                assert header.payload_nbytes == size
            timings[size].pop(0)
        client.close()
        parent.send(None)
        return timings
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def main(
    repeats: int = typer.Option(15, help="Pulls per point (median reported)."),
    sizes_mib: list[int] = typer.Option([1, 4, 16, 64, 256], help="Payload sizes in MiB."),
) -> None:
    sizes = [s * MIB for s in sizes_mib]
    kinds = ["socket", "tcp", "nixl", "gloo"]
    results = {kind: _measure(kind, sizes, repeats) for kind in track(kinds, description="transports")}
    rows = []
    for size in sizes:
        ceiling = size / median(results["socket"][size])
        row: dict[str, Any] = {"size_mib": size // MIB, "socket_ceiling_gb_s": ceiling / 1e9}
        for kind in ("tcp", "nixl", "gloo"):
            goodput = size / median(results[kind][size])
            row[f"{kind}_gb_s"] = goodput / 1e9
            row[f"{kind}_vs_ceiling"] = goodput / ceiling
        rows.append(row)
    write_results("transport_goodput", rows, {"repeats": repeats, "statistic": "median"})
    _plot(rows)
    console.print(markdown_table(rows, list(rows[0])))


def _plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["size_mib"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("socket_ceiling_gb_s", "loopback socket (ceiling)"), ("tcp_gb_s", "tcp transport"), ("nixl_gb_s", "nixl transport"), ("gloo_gb_s", "gloo transport (nccl's CPU twin)")):
        ax.plot(sizes, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("payload (MiB)")
    ax.set_ylabel("goodput (GB/s, median)")
    ax.set_title("KV transport goodput, one pull at a time, loopback")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "transport_goodput.png", dpi=120)


if __name__ == "__main__":
    typer.run(main)
