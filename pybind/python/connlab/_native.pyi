"""Typed stubs of the native module (PyO3): the servers themselves."""

from types import TracebackType
from typing import Any, Self

BACKENDS: tuple[str, ...]
STATES: tuple[str, ...]
CLOSE_REASONS: tuple[str, ...]

Address = tuple[str, int]
Transition = tuple[int, Address, str | None, str, str | None, float]

class Server:
    """A TCP echo server of one backend, listening from construction until `stop()`."""

    def __init__(
        self,
        backend: str,
        host: str = "127.0.0.1",
        port: int = 0,
        workers: int | None = None,
        max_connections: int = 10_000,
        max_frame: int = 1 << 20,
        max_pending_output: int = 4 << 20,
        idle_timeout: float | None = 60.0,
        read_timeout: float | None = 10.0,
        write_timeout: float | None = 10.0,
        backlog: int = 1024,
        journal_capacity: int = 65_536,
        thread_stack: int = 64 << 10,
    ) -> None: ...
    @property
    def backend(self) -> str: ...
    @property
    def address(self) -> Address: ...
    def stats(self) -> dict[str, Any]: ...
    def connections(self) -> list[dict[str, Any]]: ...
    def transitions(self, peer: tuple[Any, ...] | None = None) -> list[Transition]: ...
    def stop(self, grace: float = 1.0) -> dict[str, float]: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...
