"""A fault-injecting TCP proxy: the faults a loopback never makes, toxiproxy's way.

    from connlab.proxy import Proxy

    with connlab.Server("epoll") as server, Proxy(server) as proxy:
        proxy.add_toxic("lag", "latency", stream="downstream", latency=50, jitter=5)
        ...  # clients connect to proxy.address
        proxy.remove_toxic("lag")

A toxic has toxiproxy's fields: a unique `name`, a `type` (`TOXIC_TYPES`), a `stream`
("upstream": client to server; "downstream": server to client), a `toxicity` (the share of
connections it affects, drawn from the proxy's `seed`: one seed, the same connections) and
integer attributes in toxiproxy's units:

- latency: `latency`, `jitter` (ms): every chunk waits latency ± jitter from its arrival.
- bandwidth: `rate` (KiB/s).
- slicer: `average_size`, `size_variation` (bytes), `delay` (µs between slices).
- limit_data: `bytes`: forwards that many, then ends the connection.
- reset_peer: `timeout` (ms): then resets (RST) both sides.
- timeout: `timeout` (ms): holds the stream's data and ends the connection after it; with 0 it
  holds it forever and closes nothing (a peer that vanished: no FIN, no RST). Removing the
  toxic releases what it held, in order (a partition that heals).
- slow_close: `delay` (ms) before a close is passed on.

Toxics act on live connections at once. Half-closes pass through.
"""

from __future__ import annotations

from typing import Any, Protocol

from connlab import _native

__all__ = ["TOXIC_TYPES", "Proxy", "parse_toxic"]

TOXIC_TYPES: tuple[str, ...] = _native.TOXIC_TYPES


class _HasAddress(Protocol):
    @property
    def address(self) -> tuple[str, int]: ...


class Proxy:
    """Listens on `host`:`port` (127.0.0.1, a free port by default) and forwards every
    connection to `upstream`, a `(host, port)` or anything with an `address` (a
    `connlab.Server`). A context manager; `close()` ends every connection it holds."""

    def __init__(
        self,
        upstream: tuple[str, int] | _HasAddress,
        *,
        seed: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        up_host, up_port = upstream if isinstance(upstream, tuple) else upstream.address
        self._native = _native.Proxy(up_host, up_port, host=host, port=port, seed=seed)
        self.upstream = (up_host, up_port)

    @property
    def address(self) -> tuple[str, int]:
        return self._native.address

    def add_toxic(
        self, name: str, type: str, *, stream: str = "downstream", toxicity: float = 1.0, **attributes: int
    ) -> None:
        """Adds a toxic (see the module's docstring); ValueError names a bad field."""
        self._native.add_toxic(name, type, stream, toxicity, attributes)

    def remove_toxic(self, name: str) -> None:
        self._native.remove_toxic(name)

    def toxics(self) -> list[dict[str, Any]]:
        """The toxics, in the order added, as toxiproxy's JSON."""
        return self._native.toxics()

    def stats(self) -> dict[str, Any]:
        """Connections (active, accepted, closed) and, per stream, bytes in, out and held."""
        return self._native.stats()

    def close(self) -> None:
        self._native.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        host, port = self.address
        return f"<connlab.proxy.Proxy {host}:{port} -> {self.upstream[0]}:{self.upstream[1]}>"


def parse_toxic(spec: str) -> dict[str, Any]:
    """`TYPE[:STREAM[:KEY=VALUE,...]]`, e.g. `latency:downstream:latency=50,jitter=5`, as
    `add_toxic`'s keyword arguments (the name is TYPE_STREAM; `toxicity=0.5` may be among the
    pairs). Raises ValueError naming what is wrong."""
    kind, _, rest = spec.partition(":")
    stream, _, pairs = rest.partition(":")
    if kind not in TOXIC_TYPES:
        raise ValueError(f"{spec!r}: unknown toxic type {kind!r}; known: {', '.join(TOXIC_TYPES)}")
    stream = stream or "downstream"
    if stream not in ("upstream", "downstream"):
        raise ValueError(f"{spec!r}: stream must be upstream or downstream, got {stream!r}")
    toxic: dict[str, Any] = {"name": f"{kind}_{stream}", "type": kind, "stream": stream}
    for pair in filter(None, pairs.split(",")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"{spec!r}: expected KEY=VALUE, got {pair!r}")
        try:
            toxic[key.strip()] = float(value) if key.strip() == "toxicity" else int(value)
        except ValueError:
            raise ValueError(f"{spec!r}: {key.strip()} must be a number, got {value!r}") from None
    return toxic
