"""Server streams as iterators that raise typed errors, and agent runs that remember where they
are so a broken stream can be resumed by run id and last event sequence."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Generic, TypeVar

import grpc

from agentmesh.agent.v1 import agent_pb2
from agentmesh.client._base import CallInfo
from agentmesh.client.errors import AgentMeshError, error_from_rpc

T = TypeVar("T")

#: How a run stream is resumed: (run id, last sequence seen, timeout) -> a new stream.
Resume = Callable[[str, int, "float | None"], Any]


class _RunState:
    """What a run stream has shown so far."""

    def __init__(self) -> None:
        self.run_id = ""
        self.last_sequence = 0
        self.final: agent_pb2.RunCompleted | None = None
        self.interrupt: agent_pb2.RunInterrupted | None = None

    def observe(self, event: agent_pb2.RunResponse) -> None:
        self.last_sequence = max(self.last_sequence, event.sequence)
        kind = event.WhichOneof("event")
        if kind == "started":
            self.run_id = event.started.run_id
        elif kind == "interrupt":
            self.interrupt = event.interrupt
        elif kind == "final":
            self.final = event.final

    def require_final(self, request_id: str) -> agent_pb2.RunCompleted:
        if self.final is None:
            raise AgentMeshError(
                grpc.StatusCode.UNKNOWN,
                f"the stream of run {self.run_id or '(unknown)'} ended after sequence {self.last_sequence} "
                "without its final event",
                request_id=request_id,
            )
        return self.final


class Stream(Generic[T]):
    """Iterator over the items of one server-streaming call. Iterating raises
    :class:`~agentmesh.client.AgentMeshError` (by status code) when the stream ends with an error.
    Used as a context manager, the call is cancelled when the block is left before the stream ended.
    """

    def __init__(self, call: Any, info: CallInfo, unwrap: Callable[[Any], T] | None = None) -> None:
        self._call = call
        self._unwrap = unwrap
        self._info = info
        #: The ``x-request-id`` the call was sent with.
        self.request_id = info.request_id
        self._done = False
        self._cancelled = False

    def _observe(self, item: T) -> None:
        """Hook for subclasses: called with every item before it is handed out."""

    def __iter__(self) -> Iterator[T]:
        try:
            for raw in self._call:
                item = self._unwrap(raw) if self._unwrap else raw
                self._observe(item)
                yield item
        except grpc.RpcError as exc:
            self._done = True
            # A stream this client cancelled is not a deadline, whenever it happened.
            deadline = None if self._cancelled else self._info.deadline
            raise error_from_rpc(exc, self.request_id, deadline) from exc
        self._done = True

    def cancel(self) -> None:
        """Cancel the call (the server sees CANCELLED); iterating afterwards raises
        :class:`~agentmesh.client.CancelledError`."""
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._done:
            self.cancel()


class RunStream(Stream[agent_pb2.RunResponse]):
    """The events (``RunResponse``) of an agent run: Run, ResumeRun or ResolveInterrupt.

    While iterating it records ``run_id`` (from the ``started`` event), ``last_sequence`` (the
    highest event sequence seen), ``interrupt`` (the run paused for approvals) and ``final``.
    A run stream is never re-sent automatically (a second Run would be a second run); when it
    breaks (UNAVAILABLE, INTERNAL "stream removed", a deadline), :meth:`resume` follows the same
    run from the last event seen. Start the run with ``on_disconnect=ON_DISCONNECT_CONTINUE`` so it
    keeps going while no client is attached (with the default, the run is cancelled when its
    caller goes away).
    """

    def __init__(
        self,
        call: Any,
        info: CallInfo,
        resume: Resume,
        unwrap: Callable[[Any], Any] | None = None,
        run_id: str = "",
        after_sequence: int = 0,
    ) -> None:
        super().__init__(call, info, unwrap)
        self._state = _RunState()
        # A resumed stream starts where its caller was, so resuming it again never replays.
        self._state.run_id = run_id
        self._state.last_sequence = after_sequence
        self._resume = resume

    def _observe(self, item: agent_pb2.RunResponse) -> None:
        self._state.observe(item)

    @property
    def run_id(self) -> str:
        """Id of the run; empty until its ``started`` event arrived (a resumed stream starts with
        the id it was resumed with)."""
        return self._state.run_id

    @property
    def last_sequence(self) -> int:
        """Sequence of the last event received (0 before the first)."""
        return self._state.last_sequence

    @property
    def final(self) -> agent_pb2.RunCompleted | None:
        """The ``final`` event once received."""
        return self._state.final

    @property
    def interrupt(self) -> agent_pb2.RunInterrupted | None:
        """The approvals the run waits for, when it paused (``final`` status INTERRUPTED)."""
        return self._state.interrupt

    def result(self) -> agent_pb2.RunCompleted:
        """Read the rest of the stream and return its ``final`` event. Raises the stream's
        error, or AgentMeshError(UNKNOWN) when the stream ended without a ``final`` event."""
        for _ in self:
            pass
        return self._state.require_final(self.request_id)

    def resume(self, timeout: float | None = None) -> RunStream:
        """A new stream of the same run from the event after ``last_sequence`` (ResumeRun).
        ValueError before the ``started`` event (no run id yet: nothing started that could be
        resumed). ``timeout`` in seconds; None means the configured run deadline."""
        if not self.run_id:
            raise ValueError("the run has no id yet (no `started` event was received): start a new run instead")
        return self._resume(self.run_id, self.last_sequence, timeout)


class AsyncStream(Generic[T]):
    """Async iterator over the items of one server-streaming call (``async for``); raises
    :class:`~agentmesh.client.AgentMeshError` by status code. ``async with`` cancels the call when
    the block is left before the stream ended."""

    def __init__(self, call: Any, info: CallInfo, unwrap: Callable[[Any], T] | None = None) -> None:
        self._call = call
        self._unwrap = unwrap
        self._info = info
        #: The ``x-request-id`` the call was sent with.
        self.request_id = info.request_id
        self._done = False
        self._cancelled = False

    def _observe(self, item: T) -> None:
        """Hook for subclasses: called with every item before it is handed out."""

    async def __aiter__(self) -> AsyncIterator[T]:
        try:
            async for raw in self._call:
                item = self._unwrap(raw) if self._unwrap else raw
                self._observe(item)
                yield item
        except grpc.RpcError as exc:
            self._done = True
            # A stream this client cancelled is not a deadline, whenever it happened.
            deadline = None if self._cancelled else self._info.deadline
            raise error_from_rpc(exc, self.request_id, deadline) from exc
        self._done = True

    def cancel(self) -> None:
        """Cancel the call (the server sees CANCELLED)."""
        self._cancelled = True
        self._call.cancel()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if not self._done:
            self.cancel()


class AsyncRunStream(AsyncStream[agent_pb2.RunResponse]):
    """The async form of :class:`RunStream` (same attributes; ``await stream.result()``)."""

    def __init__(
        self,
        call: Any,
        info: CallInfo,
        resume: Resume,
        unwrap: Callable[[Any], Any] | None = None,
        run_id: str = "",
        after_sequence: int = 0,
    ) -> None:
        super().__init__(call, info, unwrap)
        self._state = _RunState()
        # A resumed stream starts where its caller was, so resuming it again never replays.
        self._state.run_id = run_id
        self._state.last_sequence = after_sequence
        self._resume = resume

    def _observe(self, item: agent_pb2.RunResponse) -> None:
        self._state.observe(item)

    run_id = RunStream.run_id
    last_sequence = RunStream.last_sequence
    final = RunStream.final
    interrupt = RunStream.interrupt

    async def result(self) -> agent_pb2.RunCompleted:
        """Read the rest of the stream and return its ``final`` event (see RunStream.result)."""
        async for _ in self:
            pass
        return self._state.require_final(self.request_id)

    def resume(self, timeout: float | None = None) -> AsyncRunStream:
        """A new stream of the same run after ``last_sequence`` (see RunStream.resume)."""
        if not self.run_id:
            raise ValueError("the run has no id yet (no `started` event was received): start a new run instead")
        return self._resume(self.run_id, self.last_sequence, timeout)
