"""One engine across ranks: rank 0 drives, every other rank follows in lockstep.

Every rank holds a full replica of the engine's host state (scheduler, block tables, latent cache, detokenizers)
and its shard of the model. Only rank 0 takes requests. Before each step it broadcasts the commands it applied
since the last one (add with the prompt's token ids and parameters, abort) followed by `step`; every follower
applies the same commands and steps too, so the schedulers, which are deterministic, pick the same batch with the
same block tables and the model's collectives line up. Sampling decisions (each sequence's new tokens and each MTP
draft) are rank 0's: the engine's `sync_tokens` hook broadcasts them, so no follower depends on its own random
stream. A follower's replica would drift only through a bug; the token broadcast carries the batch size, so drift
is caught as an error instead of a hang.

Idle time (a chat waiting for input, a server without requests) would trip the collectives' timeout on the
followers, so the driver sends a heartbeat every timeout / 4 while idle; a follower that hears nothing for the
whole timeout, or sees rank 0's connection drop, ends with an error; a driver whose follower is gone fails its
next step or heartbeat the same way.

Owns Driver, Follower, attach (the wrapper a multi-rank LLM gets: installed into engine/llm.py's
set_parallel_engine hook below, so the dependency runs from here to the LLM, never back) and make_parallel_llm,
the CLI's LLM under torchrun.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from typing import Any

import torch

from ..parallel import ParallelError, ParallelState
from .engine import LLMEngine
from .llm import LLM, set_parallel_engine

log = logging.getLogger(__name__)

__all__ = ["Driver", "Follower", "attach", "make_parallel_llm"]


def _check_batch(ps: ParallelState, header: torch.Tensor, n: int) -> None:
    if int(header[0]) != n:
        raise ParallelError(f"{ps.describe()}: the engine replicas diverged: rank 0 sampled for {int(header[0])} "
                            f"sequences, this rank scheduled {n}; this is a bug, please report it")


class Driver:
    """Rank 0's engine: LLMEngine's interface (anything not defined here is the wrapped engine's), plus the
    broadcasts that keep the followers in step. Thread-safe towards its heartbeat thread only; like LLMEngine it
    is driven by one thread at a time."""

    def __init__(self, engine: LLMEngine, ps: ParallelState, heartbeat_s: float | None = None):
        self.engine, self.ps = engine, ps
        engine.sync_tokens = self._send_tokens
        self._lock = threading.Lock()  # one collective sequence at a time: steps vs heartbeats
        self._pending: list[tuple] = []
        self._last_send = time.monotonic()
        self._closed = False
        self.error: BaseException | None = None
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(0.05, ps.timeout_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="dsv3-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    # -- the engine's interface ---------------------------------------------------------------------------------
    def add_request(self, prompt, params=None, request_id: str | None = None) -> str:
        rid = self.engine.add_request(prompt, params, request_id)  # validates; raises before anything is sent
        seq = self.engine.seqs[rid]
        with self._lock:
            self._pending.append(("add", seq.prompt_ids, seq.params, rid))
        return rid

    def abort(self, request_id: str) -> bool:
        done = self.engine.abort(request_id)
        if done:
            with self._lock:
                self._pending.append(("abort", request_id))
        return done

    def step(self):
        with self._lock:
            self._send([("step",)])
            try:
                return self.engine.step()
            except BaseException as e:
                self.error = e
                raise

    def close(self) -> None:
        """Release the followers (they return from Follower.run). Idempotent; called at exit too."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self.error is None and self._lock.acquire(timeout=self.ps.timeout_s):
            try:
                self._send([("stop",)])
            except ParallelError as e:
                log.warning("could not release the other ranks: %s", e)
            finally:
                self._lock.release()
        atexit.unregister(self.close)

    # -- internals (under the lock) ------------------------------------------------------------------------------
    def _send(self, commands: list[tuple]) -> None:
        if self.error is not None:
            raise ParallelError(f"{self.ps.describe()}: the ranks are out of step since an earlier failure "
                                f"({type(self.error).__name__}: {self.error}); restart the run")
        message, self._pending = self._pending + commands, []
        try:
            self.ps.broadcast_object(message)
        except BaseException as e:
            self.error = e
            raise
        self._last_send = time.monotonic()

    def _send_tokens(self, tokens: list[list[int]]) -> list[list[int]]:
        width = max((len(t) for t in tokens), default=0)
        header = torch.tensor([len(tokens), width], dtype=torch.long)
        self.ps.broadcast_tensor(header)
        if width:
            payload = torch.full((len(tokens), width), -1, dtype=torch.long)
            for i, t in enumerate(tokens):
                payload[i, :len(t)] = torch.tensor(t, dtype=torch.long)
            self.ps.broadcast_tensor(payload)
        return tokens

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s / 2):
            if time.monotonic() - self._last_send < self.heartbeat_s or not self._lock.acquire(blocking=False):
                continue
            try:
                if not self._stop.is_set() and self.error is None:
                    self._send([("noop",)])
            except ParallelError as e:
                # The main thread may be blocked on input or on an idle server: end the job rather than leave
                # rank 0 up with the others gone.
                print(f"dsv3: {e}", file=sys.stderr, flush=True)
                os._exit(1)
            finally:
                self._lock.release()


class Follower:
    """A non-zero rank's engine: replays rank 0's commands on its replica until rank 0 says stop."""

    def __init__(self, engine: LLMEngine, ps: ParallelState):
        self.engine, self.ps = engine, ps
        engine.sync_tokens = self._receive_tokens

    def run(self) -> None:
        while True:
            message = self.ps.broadcast_object(None)
            for command in message:
                kind = command[0]
                if kind == "add":
                    _, ids, params, rid = command
                    self.engine.add_request(ids, params, rid)
                elif kind == "abort":
                    self.engine.abort(command[1])
                elif kind == "step":
                    self.engine.step()
                elif kind == "stop":
                    return

    def _receive_tokens(self, tokens: list[list[int]]) -> list[list[int]]:
        header = self.ps.broadcast_tensor(torch.zeros(2, dtype=torch.long))
        _check_batch(self.ps, header, len(tokens))
        n, width = int(header[0]), int(header[1])
        if not width:
            return [[] for _ in range(n)]
        payload = self.ps.broadcast_tensor(torch.empty(n, width, dtype=torch.long)).tolist()
        return [[t for t in row if t >= 0] for row in payload]


def attach(engine: LLMEngine, ps: ParallelState) -> Driver | Follower:
    return Driver(engine, ps) if ps.is_driver else Follower(engine, ps)


set_parallel_engine(attach)  # what LLM(parallel=...) does with its engine on several ranks


def make_parallel_llm(args, engine_kwargs: dict):
    """The CLI's LLM under torchrun. On rank 0 it returns the LLM (its engine a Driver); on the other ranks it
    follows rank 0 until the command there is done, then exits the process, so the commands' own code (which
    prints results) runs on rank 0 only."""
    from ..parallel import init_parallel

    # The device flag decides the backend: NCCL for GPUs, gloo for a CPU run even on a machine with GPUs.
    backend = "nccl" if str(args.device).startswith("cuda") else "gloo"
    ps = init_parallel(args.tp, args.ep, backend=backend, timeout_s=args.dist_timeout)
    if not ps.is_driver:
        logging.getLogger("dsv3").setLevel(logging.WARNING)  # one rank's log is enough
    try:
        llm = LLM(args.model, dtype=args.dtype, device=args.device, fp8_mode=args.fp8_mode, parallel=ps,
                  quantize=args.quantize,
                  expert_placement=args.expert_placement, progress=False if not ps.is_driver else None,
                  **engine_kwargs)
    except BaseException:
        if not ps.is_driver:
            ps.shutdown()
        raise
    if ps.is_driver:
        if ps.world_size > 1:
            def finish() -> None:
                llm.engine.close()  # release the followers before leaving the process group
                ps.shutdown()

            atexit.register(finish)
            log.info("%d ranks: tp=%d, ep=%d, %s; latent cache replicated: %.1f MiB per rank", ps.world_size,
                     ps.tp_size, ps.ep_size, dist_backend(ps), llm.engine.cache.total_bytes / 2**20)
        return llm
    code = 0
    try:
        llm.engine.run()
    except ParallelError as e:
        print(f"dsv3: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        ps.shutdown()
    sys.exit(code)


def dist_backend(ps: ParallelState) -> str:
    import torch.distributed as dist

    return dist.get_backend() if ps.world_size > 1 and dist.is_initialized() else "single process"
