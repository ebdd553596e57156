"""Pull KV-sized payloads through a real Tandem transport, publisher and puller in separate
processes, optionally in separate network namespaces (nodes of the cluster in a box).

    python -m bench.kv_link publish KIND HOST MAX_BYTES     # a publisher; JSON lines on stdio
    python -m bench.kv_link measure KIND --sizes ... [--publisher-ns NS --publisher-host H]

`measure` starts the publisher itself (through `ip netns exec` when it lives on another
node), pulls each size ``repeats`` times after a warm-up, checks every byte when asked,
and prints one JSON line: {size: [seconds, ...]}. Both sides authenticate with the secret
in TANDEM_KV_AUTH_SECRET when it is set, as workers do. Used by bench/transport_goodput.py
and tests/cluster/test_box_transports.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import typer

from kv_transport.contract import AUTH_SECRET_ENV

KINDS = ("socket", "tcp", "nixl", "gloo")
app = typer.Typer(add_completion=False)


def _protocol_stdout():
    """Stdout for this process's answers only: libraries (NIXL logs to stdout) get stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return out


def payload(nbytes: int) -> memoryview:
    """The bytes a publisher serves: a pattern the puller can check."""
    return memoryview((bytes(range(256)) * (nbytes // 256 + 1))[:nbytes])


def _tune(sock: socket.socket) -> None:
    # The ceiling gets the same socket tuning as the tcp transport.
    from kv_transport.transport.channel import tune

    tune(sock)


def transport(kind: str, host: str) -> Any:
    if kind == "tcp":
        from kv_transport.transport.tcp import TcpTransport

        made: Any = TcpTransport(host)
    elif kind == "nixl":
        from kv_transport.transport.nixl import NixlTransport

        made = NixlTransport(host)
    else:
        from kv_transport.transport.collective import CollectiveTransport

        made = CollectiveTransport(backend=kind, host=host)
    secret = os.environ.get(AUTH_SECRET_ENV)
    if secret:
        made.set_secret(secret.encode())
    return made


@app.command("publish")
def publish(kind: str, host: str, max_bytes: int) -> None:
    """Serve payloads until stdin closes: prints the address, then "published" per line
    ``transfer_id nbytes`` read."""
    data = payload(max_bytes)
    out = _protocol_stdout()
    if kind == "socket":
        listener = socket.create_server((host, 0))
        print(json.dumps({"host": host, "port": listener.getsockname()[1]}), file=out, flush=True)
        client, _ = listener.accept()
        _tune(client)
        while request := client.recv(16):
            client.sendall(data[: int.from_bytes(request[:8], "little")])
        return
    from kv_transport.transport.base import Publication
    from kv_transport.wire import BufferInfo, TransferHeader

    made = transport(kind, host)
    print(json.dumps(made.address), file=out, flush=True)
    for line in sys.stdin:
        transfer_id, nbytes = line.split()
        view = data[: int(nbytes)]
        header = TransferHeader(transfer_id, "bench", "uint8", 1, len(view), 1, [BufferInfo("payload", len(view), len(view))])
        made.publish(Publication(transfer_id, lambda _skip=0, h=header, v=view: (h, [v]), lambda *_: None))
        print("published", file=out, flush=True)
    made.close()


def _publisher_cmd(kind: str, host: str, max_bytes: int, namespace: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "bench.kv_link", "publish", kind, host, str(max_bytes)]
    return ["ip", "netns", "exec", namespace, *cmd] if namespace else cmd


def measure(
    kind: str,
    sizes: list[int],
    repeats: int,
    *,
    publisher_ns: str | None = None,
    publisher_host: str = "127.0.0.1",
    local_host: str = "127.0.0.1",
    verify: bool = False,
    timeout_s: float = 120.0,
) -> dict[int, list[float]]:
    """Seconds per pull of each size (the warm-up pull dropped)."""
    publisher = subprocess.Popen(
        _publisher_cmd(kind, publisher_host, max(sizes), publisher_ns),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
    )  # fmt: skip
    assert publisher.stdin is not None and publisher.stdout is not None
    timings: dict[int, list[float]] = {size: [] for size in sizes}
    try:
        address = json.loads(publisher.stdout.readline())
        if kind == "socket":
            with socket.create_connection((address["host"], address["port"]), timeout=timeout_s) as sock:
                _tune(sock)
                for size in sizes:
                    buffer = bytearray(size)
                    for _ in range(repeats + 1):
                        started = time.perf_counter()
                        sock.sendall(size.to_bytes(8, "little"))
                        view = memoryview(buffer)
                        while len(view):
                            view = view[sock.recv_into(view) :]
                        timings[size].append(time.perf_counter() - started)
                    timings[size].pop(0)
            return timings
        from kv_transport.transport.control import FetchRequest

        client = transport(kind, local_host)
        try:
            for size in sizes:
                # Pulled into a buffer allocated once, as the connector pulls into KV blocks.
                destination = [memoryview(bytearray(size))]
                for i in range(repeats + 1):
                    transfer_id = f"{size}-{i}"
                    publisher.stdin.write(f"{transfer_id} {size}\n")
                    publisher.stdin.flush()
                    assert publisher.stdout.readline().strip() == "published"
                    started = time.perf_counter()
                    header, _ = client.fetch(address, FetchRequest(transfer_id, timeout_s=timeout_s),
                                             into=lambda h, d=destination: d)  # fmt: skip
                    timings[size].append(time.perf_counter() - started)
                    if header.payload_nbytes != size or (verify and destination[0] != payload(size)):
                        raise AssertionError(f"{kind}: transfer {transfer_id} arrived wrong")
                timings[size].pop(0)
        finally:
            client.close()
        return timings
    finally:
        publisher.stdin.close()
        try:
            publisher.wait(timeout=15)
        except subprocess.TimeoutExpired:
            publisher.kill()


@app.command("measure")
def measure_command(
    kind: str,
    sizes: list[int] = typer.Option(..., "--size", help="Payload sizes in bytes."),
    repeats: int = typer.Option(5),
    publisher_ns: str | None = typer.Option(None),
    publisher_host: str = typer.Option("127.0.0.1"),
    local_host: str = typer.Option("127.0.0.1"),
    verify: bool = typer.Option(False),
) -> None:
    out = _protocol_stdout()
    timings = measure(kind, sizes, repeats, publisher_ns=publisher_ns, publisher_host=publisher_host,
                      local_host=local_host, verify=verify)  # fmt: skip
    print(json.dumps({str(size): values for size, values in timings.items()}), file=out)


def measure_across(state: Any, kind: str, sizes: list[int], repeats: int, verify: bool = False,
                   puller_role: str = "decode", publisher_role: str = "prefill") -> dict[int, list[float]]:  # fmt: skip
    """`measure` with the puller on a decode node and the publisher on a prefill node of a
    box (control_plane.cluster.box.BoxState), authenticated with the box's KV secret."""
    from control_plane.cluster.box import exec_in

    puller, publisher = state.nodes_with(puller_role)[0], state.nodes_with(publisher_role)[0]
    cmd = [sys.executable, "-m", "bench.kv_link", "measure", kind, *[f"--size={s}" for s in sizes],
           f"--repeats={repeats}", f"--publisher-ns={publisher.namespace}", f"--publisher-host={publisher.address}",
           f"--local-host={puller.address}", "--verify" if verify else "--no-verify"]  # fmt: skip
    env_secret = {AUTH_SECRET_ENV: state.kv_secret}
    result = exec_in(state, puller, cmd, timeout=1800, env_extra=env_secret)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} across nodes failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return {int(size): values for size, values in json.loads(result.stdout.strip().splitlines()[-1]).items()}


if __name__ == "__main__":
    app()
