"""The generation engine: one thread that owns the executor and runs the scheduler,
fed by a queue that any number of threads submit to.

    submit() (any thread) ──► incoming queue ──► engine thread: Scheduler.step() in a loop
         ▲                                            │ text deltas, the finished Generation
         └── RequestHandle: .result(), iteration ◄────┘

The thread starts with the first request and sleeps while there is no work. Nothing
a request does ends the thread: a failure of one request (forged parameters, an error
while sampling, detokenizing or in its grammar) fails that request alone (its handle
raises) and the others carry on; an executor failure fails every request in flight and
the engine carries on with the next ones. Fields are validated before a request gets
here (llmbuild.runtime.requests).

Asynchronous callers (the HTTP server, llmbuild.serve) pass `notify`, called on the
engine thread after every event, and read the events with `drain()` without blocking.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator

from llmbuild.errors import UserError
from llmbuild.runtime.generator import Generation, Limits, Request, check_request
from llmbuild.runtime.scheduler import EngineStats, Scheduler, Sequence

_DONE = object()


class RequestHandle:
    """A submitted request: `result()` waits for its Generation; iterating yields its
    text deltas as they are produced (stream=True requests)."""

    def __init__(self, seq: Sequence, notify: Callable[[], None] | None = None):
        self._seq = seq
        self._notify = notify or _nothing
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._finished = threading.Event()
        self._generation: Generation | None = None
        self._error: BaseException | None = None

    # engine side
    def _emit(self, delta: str) -> None:
        self._events.put(delta)
        self._notify()

    def _done(self, generation: Generation) -> None:
        self._generation = generation
        self._finished.set()
        self._events.put(_DONE)
        self._notify()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._finished.set()
        self._events.put(_DONE)
        self._notify()

    # caller side
    def done(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> None:
        """Stop generating; the result's finish_reason is "cancelled"."""
        self._seq.cancel()

    def drain(self) -> list[str]:
        """The text deltas produced since the last call, without waiting. When `done()`
        was true before the call, the list holds every delta that is left."""
        out = []
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return out
            if item is not _DONE:
                out.append(item)

    def logprobs(self, start: int = 0) -> list:
        """The TokenLogprobs of the output tokens sampled so far, from index `start` on
        (requests submitted with logprobs; else []), without waiting. The output length
        is read first: an EOS logprob is appended and dropped before the output grows."""
        seq = self._seq
        n = len(seq.output)
        return list((seq.logprobs or [])[start:n])

    @property
    def error(self) -> BaseException | None:
        return self._error

    def result(self, timeout: float | None = None) -> Generation:
        if not self._finished.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self._error is not None:
            raise self._error
        return self._generation

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                item = self._events.get()
                if item is _DONE:
                    break
                yield item
            if self._error is not None:
                raise self._error
        finally:
            if not self._finished.is_set():  # the consumer stopped early
                self.cancel()


class Engine:
    def __init__(self, executor, *, limits: Limits, num_slots: int, max_num_tokens: int, eos_token_ids,
                 decode: Callable[[list[int]], str], vocab_size: int | None = None):
        if num_slots < 1 or max_num_tokens < 1:
            raise UserError(f"num_slots ({num_slots}) and max_num_tokens ({max_num_tokens}) must be >= 1")
        self.limits = limits
        self.vocab_size = vocab_size
        self.scheduler = Scheduler(executor, num_slots=num_slots, max_num_tokens=max_num_tokens,
                                   eos_token_ids=eos_token_ids, decode=decode)
        self._cv = threading.Condition()
        self._incoming: list[tuple[Sequence, RequestHandle]] = []
        self._handles: dict[int, RequestHandle] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def stats(self) -> EngineStats:
        return self.scheduler.stats

    def reset_stats(self) -> None:
        self.scheduler.stats = EngineStats()

    def submit(self, request: Request, *, on_finish: Callable[[Generation], None] | None = None,
               notify: Callable[[], None] | None = None) -> RequestHandle:
        """Queue a request (thread-safe). Raises UserError at once if it exceeds the
        engine's limits, so nothing out of range ever reaches the executor. `notify` is
        called (on the engine thread) after each event of the handle."""
        check_request(request.prompt_ids, request.max_new_tokens, self.limits, self.vocab_size)
        seq = Sequence(request=request, submitted=time.perf_counter())
        if request.grammar is not None:
            seq.constraint = request.grammar.matcher()  # a bad grammar fails here, in the caller
        handle = RequestHandle(seq, notify)
        seq.emit = handle._emit if request.stream else None

        def done(generation: Generation, handle=handle):
            self._handles.pop(id(seq), None)
            handle._done(generation)
            if on_finish is not None:
                on_finish(generation)

        def fail(error: BaseException, handle=handle):
            self._handles.pop(id(seq), None)
            handle._fail(error)

        seq.done = done
        seq.fail = fail
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._incoming.append((seq, handle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llmbuild-engine", daemon=True)
                self._thread.start()
            self._cv.notify()
        return handle

    def _run(self) -> None:
        """The engine thread. Nothing a request does ends it: a request's own failure
        fails that request (Scheduler._fail), an executor failure the requests in flight."""
        while True:
            try:
                if not self._serve():
                    return
            except BaseException as error:  # noqa: BLE001 - handed to every waiting caller
                for seq in self.scheduler.fail_all(error):
                    self._handles.pop(id(seq), _Null)._fail(error)
                for handle in list(self._handles.values()):
                    handle._fail(error)
                self._handles = {}

    def _serve(self) -> bool:
        """Admit what came in and run one scheduler step; False once closed."""
        scheduler = self.scheduler
        with self._cv:
            while not self._incoming and not scheduler.has_work() and not self._closed:
                self._cv.wait()
            if self._closed:
                incoming, self._incoming = self._incoming, []
                for seq, handle in incoming:
                    handle._fail(RuntimeError("the engine was closed"))
                dropped = scheduler.fail_all(RuntimeError("closed"))
                for seq in dropped:
                    self._handles.pop(id(seq), _Null)._fail(RuntimeError("the engine was closed"))
                return False
            incoming, self._incoming = self._incoming, []
            for seq, handle in incoming:
                self._handles[id(seq)] = handle
            if not scheduler.has_work():
                scheduler.ensure_cache()  # someone may have reset the executor meanwhile
            for seq, _handle in incoming:
                scheduler.add(seq)
        scheduler.step()
        return True

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)


def _nothing() -> None:
    pass


class _Null:
    @staticmethod
    def _fail(error):
        pass
