"""Linux network namespaces, veth pairs, a bridge and `tc` shaping: the network of the
cluster in a box. Everything goes through iproute2 (`ip`, `tc`); nothing here needs more.

One namespace per node, each with one veth whose peer sits on a bridge in the root
namespace. A node's link is shaped on both ends: the veth end inside the node shapes what
the node sends, the bridge end what it receives (see `shape`).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger(__name__)

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$")
_RATE_BITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_TIME = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$")
_TIME_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


class NetError(RuntimeError):
    """An iproute2 command failed."""


def run(args: Sequence[str], *, check: bool = True, namespace: str | None = None) -> str:
    """Run an iproute2 command (in ``namespace`` if given); its stdout."""
    cmd = list(args)
    if namespace is not None:
        cmd = ["ip", "netns", "exec", namespace, *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetError(f"{' '.join(cmd)}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def rate_bits(rate: str) -> float:
    match = _RATE.match(rate.strip().lower())
    if not match:
        raise ValueError(f"rate {rate!r}: expected e.g. 500mbit, 10gbit")
    return float(match.group(1)) * _RATE_BITS[match.group(2)]


def time_ms(value: str) -> float:
    match = _TIME.match(value.strip().lower())
    if not match:
        raise ValueError(f"time {value!r}: expected e.g. 2ms, 500us")
    return float(match.group(1)) * _TIME_MS[match.group(2)]


class LinkSpec(BaseModel):
    """What one node's link looks like, in both directions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # None: as fast as the veth goes.
    rate: str | None = None
    delay_ms: float = Field(0.0, ge=0, le=10_000)
    jitter_ms: float = Field(0.0, ge=0, le=10_000)
    loss_pct: float = Field(0.0, ge=0, le=100)

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is None or value.lower() in ("", "none", "unshaped"):
            return None
        if rate_bits(value) < 8_000:
            raise ValueError("rate below 8kbit")
        return value.lower()

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """``10gbit,2ms`` / ``1gbit,20ms,5ms,1%`` / ``unshaped``: a rate, a delay, a jitter
        and a loss, in any order after the rate; units say which is which except for the
        delay/jitter pair (delay first)."""
        rate = None
        times: list[float] = []
        loss = 0.0
        for part in (p.strip().lower() for p in text.split(",") if p.strip()):
            if part.endswith("%"):
                loss = float(part[:-1])
            elif _RATE.match(part) or part in ("unshaped", "none"):
                rate = None if part in ("unshaped", "none") else part
            elif _TIME.match(part):
                times.append(time_ms(part))
            else:
                raise ValueError(f"link {text!r}: cannot read {part!r}")
        if len(times) > 2:
            raise ValueError(f"link {text!r}: at most a delay and a jitter")
        return cls(rate=rate, delay_ms=times[0] if times else 0.0,
                   jitter_ms=times[1] if len(times) > 1 else 0.0, loss_pct=loss)

    @property
    def rate_bps(self) -> float | None:
        return rate_bits(self.rate) if self.rate else None

    def __str__(self) -> str:
        parts = [self.rate or "unshaped"]
        if self.delay_ms:
            parts.append(f"{self.delay_ms:g}ms")
        if self.jitter_ms:
            parts.append(f"{self.jitter_ms:g}ms")
        if self.loss_pct:
            parts.append(f"{self.loss_pct:g}%")
        return ",".join(parts)


def _netem_args(spec: LinkSpec) -> list[str]:
    args = ["netem", "limit", "100000"]
    if spec.delay_ms or spec.jitter_ms:
        args += ["delay", f"{spec.delay_ms}ms"]
        if spec.jitter_ms:
            args += [f"{spec.jitter_ms}ms", "distribution", "normal"]
    if spec.loss_pct:
        args += ["loss", f"{spec.loss_pct}%"]
    return args


_netem: bool | None = None


def has_netem() -> bool:
    """Whether this kernel has netem (most distribution kernels ship it as a module; some
    minimal VM kernels leave it out, and then links can have no delay)."""
    global _netem
    if _netem is None:
        out = subprocess.run(["ip", "netns", "add", "tandem-probe-netem"], capture_output=True, check=False)
        try:
            probe = subprocess.run(
                ["ip", "netns", "exec", "tandem-probe-netem", "tc", "qdisc", "add", "dev", "lo", "root", "netem"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            _netem = probe.returncode == 0
        finally:
            if out.returncode == 0:
                subprocess.run(["ip", "netns", "del", "tandem-probe-netem"], capture_output=True, check=False)
    return _netem


def loss_filter(loss_pct: float) -> str:
    """A classic-BPF program (tc's ``bytecode`` syntax) that sends ``loss_pct`` percent of
    packets, drawn at random per packet, to class 1:2 and the rest to the default class:
    loss without netem. ``ld rand`` is the kernel's ancillary random load."""
    threshold = min(2**32 - 1, round(loss_pct / 100 * 2**32))
    ops = [
        (0x20, 0, 0, 0xFFFFF038),  # ld [SKF_AD_OFF + SKF_AD_RANDOM]
        (0x35, 0, 1, threshold),  # jge #threshold: keep, else drop
        (0x06, 0, 0, 0xFFFFFFFF),  # ret -1: the qdisc's default class
        (0x06, 0, 0, 0x00010002),  # ret 1:2: the dropping class
    ]
    return f"{len(ops)}," + ",".join(f"{code} {jt} {jf} {k}" for code, jt, jf, k in ops)


GSO_MAX_SEGS = 65535  # the kernel's default
# Above what HTB can shape reliably on a veth, "unshaped" is an HTB class this fast.
UNSHAPED_RATE = "100gbit"


def shape(device: str, spec: LinkSpec, namespace: str | None = None) -> None:
    """Make ``device``'s egress look like ``spec`` (replacing any earlier shaping).

    HTB class 1:1 holds the rate (HTB accounts for offloaded segments, which netem's own
    rate does not), with a netem leaf for delay, jitter and loss. Without netem in the
    kernel, loss is a random BPF classifier into class 1:2, whose queue holds nothing, and
    a delay cannot be had.
    """
    run(["tc", "qdisc", "del", "dev", device, "root"], check=False, namespace=namespace)
    # A real link loses frames, not the 64 KiB segments the stack hands a veth: with loss,
    # segments are cut to one frame (it costs CPU, so only then).
    segs = "1" if spec.loss_pct else str(GSO_MAX_SEGS)
    run(["ip", "link", "set", "dev", device, "gso_max_segs", segs], namespace=namespace)
    delays = bool(spec.delay_ms or spec.jitter_ms)
    if spec.rate is None and not delays and not spec.loss_pct:
        return
    netem = (delays or spec.loss_pct > 0) and has_netem()
    if delays and not netem:
        raise NetError("this kernel has no netem (CONFIG_NET_SCH_NETEM): links cannot have a delay here")
    rate = spec.rate or UNSHAPED_RATE
    # Burst: one large offloaded segment plus a millisecond at the rate, so a fast link is
    # not held back by the timer resolution.
    burst = max(64 * 1024, int(rate_bits(rate) / 8 / 1000))
    tc = ["tc"]
    run([*tc, "qdisc", "add", "dev", device, "root", "handle", "1:", "htb", "default", "1"], namespace=namespace)
    run([*tc, "class", "add", "dev", device, "parent", "1:", "classid", "1:1", "htb",
         "rate", rate, "ceil", rate, "burst", str(burst), "cburst", str(burst)], namespace=namespace)  # fmt: skip
    if netem:
        run([*tc, "qdisc", "add", "dev", device, "parent", "1:1", "handle", "10:", *_netem_args(spec)],
            namespace=namespace)  # fmt: skip
    elif spec.loss_pct:
        run([*tc, "class", "add", "dev", device, "parent", "1:", "classid", "1:2", "htb", "rate", "8kbit"],
            namespace=namespace)  # fmt: skip
        run([*tc, "qdisc", "add", "dev", device, "parent", "1:2", "handle", "20:", "pfifo", "limit", "0"],
            namespace=namespace)  # fmt: skip
        run([*tc, "filter", "add", "dev", device, "parent", "1:", "protocol", "all", "prio", "1",
             "bpf", "bytecode", loss_filter(spec.loss_pct)], namespace=namespace)  # fmt: skip


def set_up(device: str, up: bool, namespace: str | None = None) -> None:
    run(["ip", "link", "set", "dev", device, "up" if up else "down"], namespace=namespace)


def namespaces() -> list[str]:
    out = run(["ip", "-json", "netns", "list"], check=False).strip()
    return [entry["name"] for entry in json.loads(out)] if out else []


def links(prefix: str) -> list[str]:
    out = run(["ip", "-json", "link", "show"], check=False).strip()
    return [entry["ifname"] for entry in (json.loads(out) if out else []) if entry["ifname"].startswith(prefix)]


def namespace_pids(namespace: str) -> list[int]:
    return [int(pid) for pid in run(["ip", "netns", "pids", namespace], check=False).split()]


def counters(device: str, namespace: str | None = None) -> dict[str, int]:
    """``rx_bytes``/``tx_bytes``/... of a device."""
    out = run(["ip", "-json", "-s", "link", "show", "dev", device], namespace=namespace)
    stats = json.loads(out)[0]["stats64"]
    return {f"rx_{k}": v for k, v in stats["rx"].items()} | {f"tx_{k}": v for k, v in stats["tx"].items()}


def create_bridge(name: str, address: str) -> None:
    run(["ip", "link", "add", name, "type", "bridge"])
    run(["ip", "addr", "add", address, "dev", name])
    set_up(name, True)


def create_node_namespace(namespace: str, host_end: str, bridge: str, address: str) -> None:
    """A namespace whose ``eth0`` (``address``, CIDR) is cabled to ``bridge`` by a veth whose
    root-side end is ``host_end``."""
    run(["ip", "netns", "add", namespace])
    run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", namespace])
    run(["ip", "link", "set", host_end, "master", bridge])
    set_up(host_end, True)
    run(["ip", "addr", "add", address, "dev", "eth0"], namespace=namespace)
    set_up("eth0", True, namespace)
    set_up("lo", True, namespace)
