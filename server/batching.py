"""Micro-batching: concurrent model jobs of the same kind run as one batched model call.

A diffusion model evaluates a batch of latents for little more than the cost of one on a GPU (and
a bit less than the sum of them on a CPU), so a server that runs each request on its own leaves
most of its throughput unused. The :class:`MicroBatcher` of a model collects the jobs that arrive
together and share a *batch key* (the operation and the method; a method's step configuration is
fixed per server, so the same method means the same steps) and runs them as one call:

- a batch is closed when it holds ``max_batch`` jobs, or ``max_wait_ms`` after its first job
  arrived; jobs that arrive while the model is busy join the next batch without waiting;
- one dispatcher thread per model runs the batches, under the model's lock (so they never overlap
  with the model jobs that are not batched, such as watermarking an uploaded image); the lock is a
  :class:`FairLock`, granted in arrival order, so an unbatched job waits for the batches and jobs
  that asked before it, not for every batch that comes after it too;
- deadlines are honoured: a job is refused on arrival if its deadline leaves less than its
  estimated time (``DeadlineTooShort``, as without batching), and again when its batch starts: a
  job whose time left cannot cover the whole batch is left for a smaller batch or, if it cannot
  cover even its own run, refused; a caller whose deadline passes while queued gets
  DEADLINE_EXCEEDED and its job is dropped if it has not started;
- so are the jobs of callers that cancelled (:meth:`MicroBatcher.cancel`, called when the RPC
  ends, and ``alive()`` checked again when a batch is formed): an abandoned request costs no model
  time;
- one job's failure does not fail the others: the batch function returns an exception in that
  job's place, and a batch that raises as a whole is re-run one job at a time.

Batch functions (per-request keys differ, the model work does not depend on them):

- Verify (:func:`verify_batch`): the ring and bit methods invert all images in one call
  (``invert``) and score each image against its own keys (``score``,
  no model evaluation); post-hoc methods (no model in detection) just loop.
- Embed, generate mode (:func:`generate_batch`): ``method.generate(keys, seeds, prompts)`` with
  one key and one seed per job.

Two things keep batches efficient:

- the wait for company starts when the model becomes free, not only when the batch's first job
  arrived. Clients that send their next request as soon as they get an answer would otherwise lock
  into a rhythm of one full batch and one batch of the stragglers (with 4 clients: 3, 1, 3, 1, ...),
  because a job that waited through the previous batch used to start alone the moment the model
  freed up, just before the others came back;
- on a CPU the autoencoder runs one image at a time inside a batch (:class:`VAEChunks`; the
  ``vae_batch`` setting): its full-resolution activations are large, so a batched encode or decode
  costs about twice as much per image as single ones (page faults and memory traffic), while the
  denoiser, which is most of the work, still gets the whole batch.

The time estimate of a batch of ``b`` jobs is ``b x evaluations x sec_per_eval``, where
``sec_per_eval`` is learnt per image from the batches run (linear in ``b``: right for a CPU,
pessimistic for a GPU, which is the safe side for a deadline check).

The pool counts jobs and model calls (:class:`BatchStats`, ``ModelPool.stats``) whether batching
is on or off, so a test or an operator can see how much batching happens.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from shallowmark.server.errors import CallEnded, DeadlineTooShort, ModelNotReady

__all__ = ["BatchJob", "BatchStats", "FairLock", "MicroBatcher", "VAEChunks", "run_isolated", "verify_batch",
           "generate_batch", "check_deadline", "NO_DEADLINE"]

log = logging.getLogger("shallowmark.server")

#: A "deadline" further away than a year means none (gRPC reports "no deadline" as ~9e18 s).
NO_DEADLINE = 365 * 24 * 3600.0


def normalise_time_left(raw: Callable[[], float | None]) -> Callable[[], float | None]:
    """``time_left`` returning ``None`` for "no deadline" (what ``Lock.acquire`` and ``Event.wait`` accept)."""

    def time_left() -> float | None:
        left = raw()
        return None if left is None or left > NO_DEADLINE else float(left)

    return time_left


def check_deadline(left: float | None, need: float, evals: int, what: str, lm: Any) -> None:
    """Raise :class:`DeadlineTooShort` if ``left`` seconds cannot cover ``need``."""
    if left is not None and left < need:
        raise DeadlineTooShort(
            f"the call's deadline leaves {max(left, 0.0):.2f} s but this {what} needs about {need:.2f} s "
            f"({evals} evaluations of {lm.name} at ~{lm.sec_per_eval:.3f} s each); "
            "give the call a longer deadline")


class FairLock:
    """The model's lock: granted in arrival order (FIFO), like ``threading.Lock`` otherwise.

    Why not ``threading.Lock``: it is not fair. The dispatcher thread releases the model after a
    batch and asks for it again at once for the next one, while an unbatched job (an Embed of an
    uploaded image) waits for it with a timeout, to check in between whether its caller is still
    there; the lock goes to whoever asks at the right moment, so an upload could lose to batch after
    batch and to later uploads. Measured with fake model work (16 closed-loop clients, the soak's
    mix): an upload waited up to 42 s for the model while no batch took over 1 s; the soak saw an
    upload p99 of 93 s against 15 s for Verify. Here each caller takes its place in a queue and
    keeps it while it waits, so a job waits for the jobs that asked before it, and no longer.

    ``acquire(timeout=..., alive=...)`` leaves the queue without ever holding the lock when the
    timeout passes (the caller's deadline) or ``alive()``, checked every ``poll_s`` while waiting,
    returns False (the caller cancelled); the next in line moves up.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._held = False
        self._line: collections.deque[object] = collections.deque()  # waiters' tickets, oldest first

    def acquire(self, blocking: bool = True, timeout: float | None = -1,
                alive: Callable[[], bool] | None = None, poll_s: float = 0.05) -> bool:
        """Take the lock once every earlier caller had it or left; True if taken.

        ``timeout`` None or negative: no limit. False after ``timeout`` seconds, when ``alive()``
        turns False, or at once with ``blocking=False`` if the lock is held or others wait."""
        end = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        with self._cv:
            if not self._held and not self._line:
                self._held = True
                return True
            if not blocking:
                return False
            ticket: object | None = object()
            self._line.append(ticket)
        try:
            while True:
                with self._cv:
                    while True:
                        if not self._held and self._line[0] is ticket:
                            self._line.popleft()
                            self._held, ticket = True, None
                            return True
                        left = None if end is None else end - time.monotonic()
                        if left is not None and left <= 0:
                            return False
                        wait = left if alive is None else poll_s if left is None else min(poll_s, left)
                        if not self._cv.wait(wait) and alive is not None:
                            break  # a poll interval without news: is the caller still there?
                if not alive():  # outside our lock: it is the caller's code (an RPC's is_active)
                    return False
        finally:
            if ticket is not None:  # gave up (timeout, cancelled, an exception): leave the line
                with self._cv:
                    self._line.remove(ticket)
                    self._cv.notify_all()  # the next in line may be at the front now

    def release(self) -> None:
        with self._cv:
            if not self._held:
                raise RuntimeError("release of an unheld FairLock")
            self._held = False
            self._cv.notify_all()  # the one at the front of the line takes it

    def locked(self) -> bool:
        return self._held

    def waiting(self) -> int:
        """Callers in line for the lock (for tests and debugging)."""
        with self._cv:
            return len(self._line)

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class BatchJob:
    """One request's share of model work.

    Attributes:
        key: jobs with equal keys may run as one batch (e.g. ``("verify", "shallow-diffuse")``);
            its first two items are the operation and the method, under which :class:`BatchStats`
            counts the job's model evaluations.
        payload: what ``run`` needs for this job.
        run: ``run(payloads) -> results``, one result (or an ``Exception`` instance) per payload,
            in order. Jobs with the same key must pass the same ``run``.
        evals: denoiser evaluations per job (for deadline estimates).
        what: a short name for messages, e.g. "shallow-diffuse verify".
    """

    key: Hashable
    payload: Any
    run: Callable[[list], list]
    evals: int
    what: str


class BatchStats:
    """Counters: jobs run, model calls (batches) made, how many batches had each size, and the model
    evaluations spent per ``(operation, method)``.

    These are what the server's metrics report (:mod:`shallowmark.server.metrics` reads them when
    scraped), so every model job is counted here once, batched or not.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.jobs = 0
        self.batches = 0
        self.sizes: collections.Counter[int] = collections.Counter()
        self.evals: collections.Counter[tuple[str, str]] = collections.Counter()

    def add(self, size: int, key: Hashable = None, evals: int = 0) -> None:
        """Count one model call of ``size`` jobs, each of ``evals`` evaluations, under the batch
        ``key``: its first two items name the operation and the method (e.g. ``("verify",
        "shallow-diffuse")``); without a key no evaluations are counted."""
        with self._lock:
            self.jobs += size
            self.batches += 1
            self.sizes[size] += 1
            if isinstance(key, tuple) and len(key) >= 2 and evals:
                self.evals[(str(key[0]), str(key[1]))] += int(evals) * size

    def evals_snapshot(self) -> dict[tuple[str, str], int]:
        """Model evaluations spent so far per ``(operation, method)``."""
        with self._lock:
            return dict(self.evals)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"jobs": self.jobs, "batches": self.batches, "sizes": dict(sorted(self.sizes.items()))}


def run_isolated(run: Callable[[list], list], payloads: list) -> list:
    """``run(payloads)``; if it raises, re-run each payload alone so only the culprit fails.

    Returns one result or ``Exception`` instance per payload.
    """
    try:
        out = list(run(payloads))
        if len(out) != len(payloads):
            raise RuntimeError(f"batch function returned {len(out)} results for {len(payloads)} jobs")
        return out
    except Exception as e:  # noqa: BLE001 - handed to the jobs' callers
        if len(payloads) == 1:
            return [e]
        log.warning("a batch of %d failed (%s: %s); re-running its jobs one by one",
                    len(payloads), type(e).__name__, e)
        return [run_isolated(run, [p])[0] for p in payloads]


@dataclass(eq=False)
class _Item:
    job: BatchJob
    time_left: Callable[[], float | None]
    alive: Callable[[], bool] = lambda: True
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    started: bool = False
    abandoned: bool = False

    def finish(self, result: Any) -> None:
        if isinstance(result, BaseException):
            self.error = result
        else:
            self.result = result
        self.done.set()


class MicroBatcher:
    """Collects jobs for one model and runs them in batches on a dispatcher thread.

    Args:
        lm: the loaded model (``name``, ``lock``, ``sec_per_eval`` are used).
        max_batch: most jobs per batch.
        max_wait_s: how long the first job of a batch waits for others.
        stats: counters to update (one per pool).
    """

    def __init__(self, lm: Any, *, max_batch: int, max_wait_s: float, stats: BatchStats | None = None):
        self.lm, self.max_batch, self.max_wait_s = lm, int(max_batch), float(max_wait_s)
        self.stats = stats or BatchStats()
        self._cv = threading.Condition()
        self._queues: dict[Hashable, collections.deque[_Item]] = {}
        self._closed = False
        # when the dispatcher last finished a batch: a partial batch waits max_wait from then too
        self._free_since = 0.0
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{lm.name}", daemon=True)
        self._thread.start()

    # -- caller side -------------------------------------------------------------------------------
    def submit(self, job: BatchJob, time_left: Callable[[], float | None],
               alive: Callable[[], bool] | None = None) -> _Item:
        """Queue ``job``; returns a handle for :meth:`wait`. ``time_left`` returns seconds or None;
        ``alive()`` (e.g. the RPC context's ``is_active``) False means the caller left."""
        item = _Item(job, time_left, alive) if alive is not None else _Item(job, time_left)
        with self._cv:
            if self._closed:
                raise ModelNotReady("the server is shutting down; retry on another instance")
            self._queues.setdefault(job.key, collections.deque()).append(item)
            self._cv.notify_all()
        return item

    def wait(self, item: _Item) -> Any:
        """Block until ``item`` ran; return its result or raise its error.

        Raises:
            DeadlineTooShort: the deadline passed while the job waited (it is dropped if not started).
        """
        left = item.time_left()
        if not item.done.wait(None if left is None else max(left, 0.0)):
            with self._cv:
                if not item.started:
                    item.abandoned = True
            if not item.done.is_set():
                raise DeadlineTooShort(f"the deadline passed while this {item.job.what} waited for the model; "
                                       "retry with a longer deadline")
        if item.error is not None:
            raise item.error
        return item.result

    def cancel(self, item: _Item) -> None:
        """Drop ``item`` if it has not started (its caller gave up), waking its :meth:`wait`; no
        effect otherwise."""
        with self._cv:
            if not item.started and not item.done.is_set():
                item.abandoned = True
                item.finish(CallEnded(f"this {item.job.what} was cancelled before it started; dropped",
                                      cancelled=True))

    def close(self) -> None:
        """Stop the dispatcher; jobs still queued fail with UNAVAILABLE."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(10)

    # -- dispatcher --------------------------------------------------------------------------------
    def _next_batch(self) -> tuple[Hashable, list[_Item]] | None:
        """Wait for the oldest key's batch to fill or time out, then take it (None when closed)."""
        with self._cv:
            while True:
                for q in self._queues.values():
                    while q and q[0].abandoned:
                        q.popleft()
                live = [(q[0].arrived, k) for k, q in self._queues.items() if q]
                if self._closed:
                    for q in self._queues.values():
                        for it in q:
                            it.finish(ModelNotReady("the server is shutting down; retry on another instance"))
                        q.clear()
                    return None
                if not live:
                    self._cv.wait()
                    continue
                first, key = min(live, key=lambda t: t[0])
                q = self._queues[key]
                # The window opens at the later of the first job's arrival and the end of the previous
                # batch, so the callers just answered can rejoin instead of leaving a straggler alone.
                remaining = max(first, self._free_since) + self.max_wait_s - time.monotonic()
                if len(q) >= self.max_batch or remaining <= 0:
                    items = []
                    while q and len(items) < self.max_batch:
                        it = q.popleft()
                        if not it.abandoned:
                            items.append(it)
                    if items:
                        return key, items
                    continue
                self._cv.wait(remaining)

    def _loop(self) -> None:
        while True:
            nxt = self._next_batch()
            if nxt is None:
                return
            key, items = nxt
            try:
                self._run(key, items)
            except BaseException as e:  # noqa: BLE001 - never let the dispatcher die silently
                log.exception("batch for %s failed outside the batch function", key)
                for it in items:
                    if not it.done.is_set():
                        it.finish(e if isinstance(e, Exception) else RuntimeError(str(e)))
            finally:
                self._free_since = time.monotonic()

    def _run(self, key: Hashable, items: list[_Item]) -> None:
        lm = self.lm
        with lm.lock:
            job = items[0].job
            per_job = job.evals * lm.sec_per_eval
            # Earliest deadline first: the most urgent job that can still make it caps the batch size
            # (a batch of b takes ~b x per_job); jobs beyond the cap wait for the next batch.
            lefts = {id(it): it.time_left() for it in items}
            inf = float("inf")
            order = sorted(items, key=lambda it: inf if lefts[id(it)] is None else lefts[id(it)])
            batch: list[_Item] = []
            later: list[_Item] = []
            cap: int | None = None
            for it in order:
                left = lefts[id(it)]
                if not it.alive():  # cancelled after it was taken from the queue: nobody waits for it
                    it.finish(CallEnded(f"the caller cancelled this {job.what} before it started; dropped",
                                        cancelled=True))
                    continue
                if left is not None and left < per_job:
                    try:
                        check_deadline(left, per_job, job.evals, job.what, lm)
                    except DeadlineTooShort as e:
                        it.finish(e)
                    continue
                if cap is None:
                    cap = self.max_batch if left is None or per_job <= 0 else \
                        max(1, min(self.max_batch, int(left // per_job)))
                (batch if len(batch) < cap else later).append(it)
            if later:  # back to the front of the queue, for the next (smaller) batch
                with self._cv:
                    self._queues.setdefault(key, collections.deque()).extendleft(reversed(later))
                    self._cv.notify_all()
            with self._cv:  # a job cancelled since it left the queue is not started
                batch = [it for it in batch if not it.abandoned]
                for it in batch:
                    it.started = True
            if not batch:
                return
            batch.sort(key=lambda it: it.arrived)
            t0 = time.monotonic()
            results = run_isolated(job.run, [it.job.payload for it in batch])
            elapsed = time.monotonic() - t0
            if job.evals > 0:
                per = elapsed / (job.evals * len(batch))
                lm.sec_per_eval = 0.7 * lm.sec_per_eval + 0.3 * per
        self.stats.add(len(batch), key, job.evals)
        log.debug("batch %s: %d jobs in %.3f s", key, len(batch), elapsed)
        for it, r in zip(batch, results):
            it.finish(r)


# -- the autoencoder inside a batch ----------------------------------------------------------------


class VAEChunks:
    """A backend whose ``encode`` and ``decode`` run at most ``chunk`` images per call; every other
    attribute (the denoiser ``eps`` above all) is the wrapped backend's, batch and all.

    Why: on a CPU the autoencoder works at full image resolution, and a call on 8 images of 256x256
    needs activations of hundreds of MB that glibc maps fresh (and the kernel zeroes) on every call,
    while one image's fit in memory the allocator reuses. Measured on tiny-ldm, one torch thread:
    encode 85 ms of CPU per image one at a time, 172 ms per image in a call of 8; decode 239 vs 367
    ms. The watermark methods call ``backend.encode``/``decode`` on the whole batch, so the server
    hands them this view instead of the backend.
    """

    def __init__(self, backend: Any, chunk: int):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1; got {chunk}")
        self._backend, self._chunk = backend, int(chunk)

    def __getattr__(self, name: str) -> Any:
        if name in ("_backend", "_chunk"):  # not set yet (copy, pickle): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self._backend, name)

    @property
    def wrapped(self) -> Any:
        """The backend itself."""
        return self._backend

    @property
    def chunk(self) -> int:
        """Most images per encode or decode call."""
        return self._chunk

    def _split(self, fn: Callable, x: Any) -> Any:
        n = x.shape[0]
        if n <= self._chunk:
            return fn(x)
        import torch

        return torch.cat([fn(x[i:i + self._chunk]) for i in range(0, n, self._chunk)])

    def encode(self, images: Any) -> Any:
        return self._split(self._backend.encode, images)

    def decode(self, latents: Any) -> Any:
        return self._split(self._backend.decode, latents)


def vae_view(backend: Any, vae_batch: int, device: str) -> Any:
    """The backend the methods see: with autoencoder calls split into ``vae_batch`` images
    (:class:`VAEChunks`); ``vae_batch`` 0 means one image at a time on a CPU, where batched VAE calls
    cost more per image than single ones, and the whole batch elsewhere."""
    chunk = vae_batch
    if chunk == 0:
        chunk = 1 if str(getattr(backend, "device", device)).startswith("cpu") else 0
    return VAEChunks(backend, chunk) if chunk else backend


# -- batch functions -------------------------------------------------------------------------------


def verify_batch(method: Any) -> Callable[[list], list]:
    """Batch function for Verify on ``method``; payloads are ``(pixels HxWx3, keys, target_fpr)``,
    results are :class:`~shallowmark.core.watermarks.base.Detection` (or exceptions).

    A latent method inverts the whole batch in one call (:meth:`invert`, the model work) and scores
    each image against its own keys (:meth:`score`, none); a method without an inversion has no
    model work to share, so each image is detected on its own."""

    def run(payloads: list) -> list:
        import numpy as np

        if method.inversion is None or len(payloads) == 1:
            out: list = []
            for pixels, keys, fpr in payloads:
                try:
                    out.append(method.detect(pixels[None], keys, fpr)[0])
                except Exception as e:  # noqa: BLE001 - this job's error only
                    out.append(e)
            return out
        latents = method.invert(np.stack([p[0] for p in payloads]))
        out = []
        for i, (_, keys, fpr) in enumerate(payloads):
            try:
                out.append(method.score(latents[i:i + 1], keys, fpr)[0])
            except Exception as e:  # noqa: BLE001 - this job's error only (e.g. a non-finite latent)
                out.append(e)
        return out

    return run


def generate_batch(method: Any) -> Callable[[list], list]:
    """Batch function for Embed-generate on ``method``; payloads are ``(method_key, seed, prompt or
    None)`` (all prompts None, or all set: the batch key says which); results are uint8 HxWx3."""

    def run(payloads: Sequence) -> list:
        keys = [p[0] for p in payloads]
        seeds = [int(p[1]) for p in payloads]
        prompts = None if payloads[0][2] is None else [p[2] for p in payloads]
        images = method.generate(keys, seeds, prompts)
        return [images[i] for i in range(len(payloads))]

    return run
