"""AsyncEngine: one LLMEngine stepped by one background thread, shared by every asyncio request handler.

The engine is not thread-safe, so only the engine thread touches it. Handlers submit commands (add a group of
requests, abort requests, stop) to a list guarded by a condition; the thread applies them between steps, runs a
step when there is work and otherwise sleeps on the condition. Outputs go back to the event loop in one
`call_soon_threadsafe` per step and land in per-group asyncio queues.

A group is what one HTTP request asked for: every prompt times `n`, each an engine request. Completions of one
prompt get seeds derived per index (`sample_seed`), so a seeded request with n > 1 returns n different samples and
completion 0 equals the same request with n = 1.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..engine.engine import LLMEngine
from ..engine.request import RequestOutput
from ..engine.sampling import SamplingParams, sample_seed
from ..engine.scheduler import QueueFullError

log = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineStopped", "QueueFullError", "RequestAborted", "RequestGroup"]


class EngineStopped(RuntimeError):
    """The server is shutting down (or the engine thread died) and takes no new requests."""


class RequestAborted(RuntimeError):
    """The engine dropped the request before it finished: 503 at shutdown, 500 when a step (or this request's own
    part of it) failed."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


class RequestGroup:
    """Outputs of the engine requests behind one HTTP request, in arrival order, as (index, RequestOutput)."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str], prompt_lens: list[int], arrival: float):
        self._engine = engine
        self.request_ids = request_ids
        self.prompt_lens = prompt_lens
        self.arrival = arrival
        self._queue: asyncio.Queue = asyncio.Queue()
        self.done = [False] * len(request_ids)
        self._aborted = False
        # Written by the engine thread only; read by the metrics code there.
        self.first_token_time: list[float | None] = [None] * len(request_ids)
        self.last_token_time: list[float | None] = [None] * len(request_ids)

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def finished(self) -> bool:
        return all(self.done)

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while not self.finished:
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self.done[index] = True
            yield index, item

    def abort(self, error: BaseException | None = None) -> None:
        """Cancel whatever is still running (a no-op once everything finished), which frees its cache blocks;
        `error`, when given, is raised to the task iterating over the group."""
        if not self._aborted:
            self._aborted = True
            ids = [rid for rid, d in zip(self.request_ids, self.done) if not d]
            if ids:
                self._engine.abort(ids)
        if error is not None:
            self._put(0, error)

    def _put(self, index: int, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait((index, item))


@dataclasses.dataclass
class _Route:
    group: RequestGroup
    index: int


class AsyncEngine:
    """`observer` (the server's metrics) is called on the engine thread: on_added(group) once a group is queued,
    on_outputs([(group, index, output)], now) after each step, before the group's token times move,
    on_aborted(group, index) per cancelled request and on_failed(group, index) per request the engine ended with an
    error. It must be quick and must not touch the engine."""

    def __init__(self, engine: LLMEngine, observer: Any | None = None):
        self.engine = engine
        self.observer = observer
        self._cond = threading.Condition()
        self._commands: list[Callable[[], None]] = []
        self._routes: dict[str, _Route] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._exit = False
        self._next_id = 0
        self.snapshot: dict[str, Any] = self._take_snapshot()  # replaced whole by the engine thread (atomic)

    # -- lifecycle (event loop) -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine.start() was already called")
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._exit

    @property
    def accepting(self) -> bool:
        return self._accepting and self.alive

    def drain(self, grace: float) -> None:
        """Refuse new requests now and abort whatever is still running after `grace` seconds, so that handlers
        answer (503, or an error event in a stream) before the ASGI server gives up on them."""
        self._accepting = False

        def abort_rest() -> None:
            self._submit(lambda: self._fail_all(RequestAborted("the server shut down before the request finished")))

        self._loop.call_later(grace, abort_rest)

    async def shutdown(self, grace: float = 0.0) -> None:
        """Refuse new requests, let in-flight ones finish for up to `grace` seconds, abort the rest, stop the
        thread. Aborted handlers see RequestAborted."""
        self._accepting = False
        if self._thread is None:
            return
        deadline = time.monotonic() + grace
        while self.snapshot["in_flight"] and time.monotonic() < deadline and self._thread.is_alive():
            await asyncio.sleep(0.05)
        self._submit(self._stop_command)
        await asyncio.to_thread(self._thread.join, 30.0)
        if self._thread.is_alive():
            log.error("the engine thread did not stop within 30 s (a step is stuck?); leaving it as a daemon")
        else:
            log.info("engine stopped")

    # -- requests (event loop) ------------------------------------------------------------------------------------
    async def add(self, prompts: list[list[int]], params: SamplingParams, arrival: float | None = None,
                  prefix: str = "req") -> RequestGroup:
        """Queue every prompt `params.n` times as one group, all or nothing. Raises ValueError (the engine refused
        the input), QueueFullError (too many waiting) or EngineStopped."""
        if not self.accepting:
            raise EngineStopped("the server is shutting down and takes no new requests")
        n = params.n
        items = []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                sub = dataclasses.replace(params, n=1)
                if params.seed is not None:
                    sub.seed = sample_seed(params.seed, i)
                items.append((f"{prefix}-{self._next_id}-{p}-{i}", prompt, sub))
        self._next_id += 1
        group = RequestGroup(self, [rid for rid, _, _ in items], [len(x) for _, x, _ in items],
                             arrival if arrival is not None else time.perf_counter())
        future = self._loop.create_future()

        def add_all() -> None:
            added = []
            try:
                for index, (rid, prompt, sub) in enumerate(items):
                    self.engine.add_request(prompt, sub, rid)
                    added.append(rid)
                    self._routes[rid] = _Route(group, index)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting handler
                for rid in added:  # all or nothing: a half-queued group would hold blocks nobody reads
                    self.engine.abort(rid)
                    self._routes.pop(rid, None)
                self._resolve(future, e)
                return
            if self.observer is not None:
                self.observer.on_added(group)
            self._resolve(future, None)

        if not self._submit(add_all):
            raise EngineStopped("the engine thread has stopped")
        try:
            await future
        except asyncio.CancelledError:
            # The handler went away while the command was queued; the requests may be in the engine by now.
            group.abort()
            raise
        return group

    def abort(self, request_ids: list[str]) -> None:
        """Thread-safe and non-blocking: the engine thread frees the requests' blocks before its next step. After
        the thread stopped there is nothing left to free, so this never raises."""
        def abort_all() -> None:
            for rid in request_ids:
                if self.engine.abort(rid) and self.observer is not None:
                    self.observer.on_aborted(self._routes[rid].group, self._routes[rid].index)
                self._routes.pop(rid, None)

        self._submit(abort_all)

    # -- engine thread --------------------------------------------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> bool:
        with self._cond:
            if self._exit:
                return False
            self._commands.append(command)
            self._cond.notify()
        return True

    def _run(self) -> None:
        log.debug("engine thread started")
        try:
            while not self._exit:
                with self._cond:
                    # No busy loop: with nothing queued and nothing running, sleep until a command arrives.
                    while not self._commands and not self.engine.has_unfinished():
                        self._cond.wait()
                    commands, self._commands = self._commands, []
                for command in commands:
                    command()
                if not self._exit and self.engine.has_unfinished():
                    self._step()
                self.snapshot = self._take_snapshot()
        except BaseException:
            log.exception("the engine thread crashed; the server can no longer generate")
            with self._cond:
                self._exit = True
            self._fail_all(RequestAborted("the engine thread crashed; see the server log", 500))
            raise
        finally:
            self.snapshot = self._take_snapshot()
            log.debug("engine thread stopped")

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; aborting the %d requests in flight", len(self._routes))
            self._fail_all(RequestAborted(f"the engine failed while generating ({type(e).__name__}: {e})", 500))
            return
        now = time.perf_counter()
        batch, failed = [], []
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None:  # aborted while its step ran
                continue
            if out.finished:
                del self._routes[out.request_id]
            if out.finish_reason == "error":
                # The engine ended this request alone (its other rows went on): its handler answers the error.
                failed.append((route.group, route.index, RequestAborted(out.error or "the engine failed", 500)))
                if self.observer is not None:
                    self.observer.on_failed(route.group, route.index)
                continue
            batch.append((route.group, route.index, out))
        if failed:
            self._deliver(failed)
        if not batch:
            if self.engine.num_running == 0:
                # Only waiting requests that cannot be scheduled yet: do not spin on them.
                with self._cond:
                    self._cond.wait(0.05)
            return
        if self.observer is not None:
            self.observer.on_outputs(batch, now)  # before the times below move, so it can measure gaps
        for group, index, _ in batch:
            if group.first_token_time[index] is None:
                group.first_token_time[index] = now
            group.last_token_time[index] = now
        self._deliver(batch)

    def _fail_all(self, error: BaseException) -> None:
        if self._routes:
            log.warning("aborting %d requests in flight: %s", len(self._routes), error)
        routes, self._routes = self._routes, {}
        for rid in routes:
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
        groups = {id(r.group): r for r in routes.values()}
        self._deliver([(r.group, r.index, error) for r in groups.values()])

    def _stop_command(self) -> None:
        if self._routes:
            self._fail_all(RequestAborted("the server shut down before the request finished"))
        with self._cond:
            self._exit = True

    def _deliver(self, items: list[tuple[RequestGroup, int, Any]]) -> None:
        def put() -> None:
            for group, index, item in items:
                group._put(index, item)

        try:
            self._loop.call_soon_threadsafe(put)
        except RuntimeError:  # the event loop is closed: nobody is left to read
            pass

    def _resolve(self, future: asyncio.Future, error: BaseException | None) -> None:
        def done() -> None:
            if future.cancelled():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        try:
            self._loop.call_soon_threadsafe(done)
        except RuntimeError:
            pass

    def _take_snapshot(self) -> dict[str, Any]:
        e = self.engine
        cache = e.cache_stats()
        return {"waiting": e.num_waiting, "running": e.num_running, "in_flight": len(self._routes),
                "blocks_used": cache["blocks_used"], "blocks_total": cache["blocks_total"],
                "cache_usage": cache["usage"], "prefix_hit_rate": cache["prefix_hit_rate"],
                "preemptions": cache["preemptions"], "stats": dict(e.stats)}
