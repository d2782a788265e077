"""The serving engine: every active sequence stepped together, one batched forward per character.

One thread owns the model (``charlm serve`` gives it the main thread: torch's parallel regions
started from another thread ran several times slower on a CPU) and keeps ``torch.inference_mode``
open for its whole loop. It holds up to ``slots`` sequences (a request for ``n`` samples takes ``n``);
further requests wait in a bounded queue, and past that :meth:`Engine.submit` raises :class:`Busy`.

Each loop: requests that fit are admitted and their prompts warmed up, ``warmup_chars`` characters
a loop each (so a long prompt does not stall the others); a warmed-up request joins the batch; then
one tick draws a character for every active sequence (each with its own temperature, top-k, top-p
and uniform stream: :func:`charlm.sample.draw`), delivers text (the first character at once, then
chunks of at least ``chunk`` characters, at most one per ``flush_s`` seconds per request), and steps
the batch (:class:`charlm.models.stepper.Stepper`). After each loop the ``flushers`` hand the events
over (the server's :class:`~charlm.serve.server.Mailbox`: one wake-up of the HTTP side per loop). A sequence that reaches its length or a stop
string, or whose request is cancelled (the client left) or timed out, leaves at that tick.

A sequence's text is the one ``charlm.generate`` gives it alone with the same seed: the same prompt
warm-up, the same uniform stream, the same decoding arithmetic row by row. Only the logits of a
batched matmul may differ from a lone one's in the last bits (the CPU's kernels for a few rows and
for one need not add in the same order), so two such texts can part where the model was all but
tied between two characters: :func:`charlm.sample.tie_margin` measures how nearly.

Events delivered to a request (``Request.deliver``, called on the engine thread):
``("prompt", entries)`` (the prompt's log-probabilities, when asked), ``("text", texts, entries)``
(new text per sample, and per sample the log-probability entries of those characters, or None),
``("done", info)`` and ``("error", exception)``. An entry is ``(char, logprob, {char: logprob})``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from charlm.config import PAIR_STATE_CELLS, SampleConfig
from charlm.errors import ConfigError
from charlm.models.stepper import Stepper
from charlm.sample import DrawParams, _Uniforms, draw


class Busy(Exception):
    """Every slot is taken and the queue is full."""


@dataclass(eq=False)
class Request:
    prompt_ids: np.ndarray
    options: SampleConfig  # its length may be 0: the prompt is only scored (with prompt_logprobs)
    deliver: Callable[[tuple], None] | None  # (the server sets it once the request exists)
    stop: tuple[str, ...] = ()  # the text ends before the first of these to appear
    logprobs: int | None = None  # per generated character: its log-probability and the top-N (None: none)
    prompt_logprobs: bool = False  # the prompt's characters' log-probabilities too (the first has none)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    # the engine's
    started: float = 0.0
    state: object = None  # during warm-up: the state after the prompt's characters read so far
    logits: torch.Tensor | None = None  # the prediction after the prompt (no <unk>); None: from the state
    read: int = 0  # prompt characters read
    steps: int = 0  # characters generated per sample
    first_sent: bool = False
    uniforms: object = None  # its samples' uniform streams (charlm.sample._Uniforms), made when it is warmed up
    rows: list = field(default_factory=list)
    ended: bool = False  # its slots are released and its last event sent (exactly once)
    flushed: int = 0  # steps at its last text event
    flushed_at: float = 0.0  # and when

    @property
    def n(self) -> int:
        return self.options.num_samples

    def cancel(self) -> None:
        self.cancelled.set()


class _Row:
    """One sample of a request: its characters so far and what has been sent."""

    __slots__ = ("req", "index", "chars", "entries", "sent", "done", "reason", "cut")

    def __init__(self, req: Request, index: int):
        self.req, self.index = req, index
        self.chars: list[str] = []
        self.entries: list = []
        self.sent, self.done, self.reason, self.cut = 0, False, None, None

    def push(self, char: str, entry) -> None:
        self.chars.append(char)
        if entry is not None:
            self.entries.append(entry)
        stops = self.req.stop
        if stops:
            tail = "".join(self.chars[-max(map(len, stops)):])
            for s in sorted(stops, key=len, reverse=True):  # the match that starts first, when several end here
                if tail.endswith(s):
                    self.cut, self.done, self.reason = len(self.chars) - len(s), True, "stop"
                    return
        if len(self.chars) == self.req.options.length:
            self.done, self.reason = True, "length"

    def finish(self, reason: str) -> None:
        if not self.done:
            self.done, self.reason = True, reason

    def take(self) -> tuple[str, list | None]:
        """The characters not yet sent that no stop string can still claim, and their entries."""
        end = len(self.chars) if self.cut is None else self.cut
        if not self.done and self.req.stop:
            end -= _held_back("".join(self.chars[self.sent:]), self.req.stop)
        text = "".join(self.chars[self.sent:end])
        entries = self.entries[self.sent:end] if self.req.logprobs is not None else None
        self.sent = max(self.sent, end)
        return text, entries


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` begin some stop string (and so may not be sent yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Engine:
    def __init__(self, model, vocab, slots: int = 16, queue_size: int = 16, chunk: int = 16,
                 max_seconds: float = 60.0, warmup_chars: int = 256, metrics=None, flush_s: float = 0.0):
        self.model, self.vocab, self.itos = model, vocab, vocab.itos
        self.slots, self.queue_size, self.chunk, self.max_seconds = slots, queue_size, chunk, max_seconds
        self.warmup_chars, self.metrics, self.flush_s = warmup_chars, metrics, flush_s
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()  # admission: reserved, queue, admitted
        self.wake = threading.Event()
        self.reserved = 0  # rows of the admitted requests (warming up or active)
        self.queue: deque[Request] = deque()  # waiting for rows
        self.admitted: list[Request] = []  # admitted, not yet seen by the engine thread
        self.warming: list[Request] = []
        self.rows: list[_Row] = []
        self.stepper: Stepper | None = None
        self.steppers: dict[int, Stepper] = {}
        self.params: DrawParams | None = None
        self.served = self.ticks = 0
        self.threads = 1
        self.dirty = False  # a row ended: the batch is rebuilt before the next tick
        self.requests: list[Request] = []  # of the rows, in order
        self.wants_logprobs = False
        self.uniform_parts: list = []
        self.stopping = False
        self.closed = False  # the engine has stopped taking requests (set under the lock)
        self.flushers: list[Callable[[], bool | None]] = []  # after each loop: hand buffered events over

    # -- any thread ------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if req.n > self.slots:
            raise ConfigError(f"{req.n} samples need more than the {self.slots} slots")
        with self.lock:
            if self.closed:  # (under the lock: the engine's last collection of requests takes it too)
                raise Busy("the server is stopping")
            self._prune_queue()
            if not self.queue and self.reserved + req.n <= self.slots:
                self.reserved += req.n
                self.admitted.append(req)
            elif len(self.queue) < self.queue_size:
                self.queue.append(req)
            else:
                raise Busy(f"the server is busy: {self.slots} slots are taken and {self.queue_size} requests are "
                           f"waiting; try again shortly")
            self._gauges()
        self.wake.set()

    def _prune_queue(self) -> None:
        """Drop the queued requests whose clients left (under the lock): they hold no place in the queue."""
        if any(r.cancelled.is_set() for r in self.queue):
            self.queue = deque(r for r in self.queue if not r.cancelled.is_set())

    def health(self) -> dict:
        with self.lock:
            self._prune_queue()
            return {"busy": self.reserved > 0, "running": self.reserved, "waiting": len(self.queue),
                    "slots": self.slots, "served": self.served}

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    # -- the engine thread -----------------------------------------------------------------------
    def run(self) -> None:
        """Serve until :meth:`stop`; never blocks for long (a Ctrl-C is acted on within 0.2 s)."""
        model = self.model
        was_training = model.training
        # this thread's threads, for every tick: 2 to 16 sequences ran faster on two threads than on one here,
        # with the HTTP loop beside them (2 x LSTM 320, 8 sequences in-process: 16,756 against 13,522 chars/s)
        self.threads = threads = torch.get_num_threads()
        model.eval()
        try:
            with torch.inference_mode():
                while not self.stopping:
                    self._loop_once()
                    self._flush_all()
        finally:
            for req in self._all_requests():
                for r in req.rows:  # (rows still generating have no reason of their own yet)
                    r.finish("cancelled")
                self._send(req, ("done", self._info(req, "cancelled")))
            self._flush_all()
            model.train(was_training)
            torch.set_num_threads(threads)

    def _flush_all(self) -> None:
        """Hand the buffered events over; a flusher that returns False (its event loop closed) is dropped."""
        if self.flushers:
            self.flushers = [f for f in self.flushers if f() is not False]

    def _loop_once(self) -> None:
        if self.admitted:  # (read without the lock: a request seen one loop late waits one tick)
            with self.lock:
                joining, self.admitted = self.admitted, []
            for req in joining:
                req.started = time.perf_counter()
                self.warming.append(req)
        if not self.warming and not self.rows:
            self.wake.wait(0.2)
            self.wake.clear()
            return
        ready = []
        for req in list(self.warming):  # a request's own work: an error there ends that request alone
            try:
                if self._warm(req):
                    ready.append(req)
            except Exception as exc:  # noqa: BLE001 - reported to its request; the engine goes on
                self._fail([req], exc)
        before = [r.req for r in self.rows]
        try:
            if ready or self.dirty:
                self._update_batch(ready)
            if self.rows:
                self._tick()
        except Exception as exc:  # noqa: BLE001 - the batch's step: every request in it (and only those) ends
            touched = [*before, *ready, *(r.req for r in self.rows)]
            self.rows, self.stepper, self.params, self.requests, self.dirty = [], None, None, [], False
            self.uniform_parts, self.wants_logprobs = [], False
            self._fail(list(dict.fromkeys(touched)), exc)

    def _fail(self, requests: list[Request], exc: Exception) -> None:
        """End ``requests`` with ``exc``: each one's slots are freed (the queue moves up) before it hears of it."""
        for req in requests:
            if req.ended:
                continue
            if req in self.warming:
                self.warming.remove(req)
            req.ended = True
            self._release(req)
            self._send(req, ("error", exc))

    def _all_requests(self) -> list[Request]:
        """Every request the engine holds or has queued, taken out of the queue (at shutdown)."""
        seen = dict.fromkeys([*self.warming, *(r.req for r in self.rows if not r.req.ended)])
        with self.lock:
            self.closed = True
            seen.update(dict.fromkeys([*self.admitted, *self.queue]))
            self.admitted, self.queue = [], deque()
        return list(seen)

    def _warm(self, req: Request) -> bool:
        """Read up to ``warmup_chars`` more of the prompt; True once it is read (or the request ended)."""
        if req.cancelled.is_set():
            self.warming.remove(req)
            self._finish(req, "cancelled")
            return False
        ids = req.prompt_ids
        piece = ids[req.read:req.read + self.warmup_chars]
        if len(piece):
            x = torch.as_tensor(piece.astype(np.int64), device=self.device).unsqueeze(0)
            logits, req.state = self.model(x, req.state)
            if req.prompt_logprobs:
                self._send(req, ("prompt", self._prompt_entries(req, logits[0])))
            req.logits = logits[0, -1:].clone()
            req.logits[:, 0] = float("-inf")  # generation never emits <unk>
            req.read += len(piece)
        if req.read < len(ids):
            return False
        self.warming.remove(req)
        if req.options.length == 0:
            self._finish(req, "length")
            return False
        if req.state is None:
            req.state = self.model.init_state(1, device=self.device)
        if req.options.temperature > 0:
            req.uniforms = _Uniforms(req.options.seed, req.n, self.device)
        return True

    def _prompt_entries(self, req: Request, logits: torch.Tensor) -> list:
        """Entries of the characters this piece predicts: the prompt's from its second on, as
        ``charlm eval`` scores them (the model's whole distribution)."""
        start = req.read
        targets = req.prompt_ids[start + 1:start + 1 + len(logits)]
        entries = [] if start else [(self.itos[int(req.prompt_ids[0])], None, None)]
        if not len(targets):
            return entries
        lp = torch.log_softmax(logits[:len(targets)].float(), -1)
        index = torch.as_tensor(targets.astype(np.int64), device=lp.device).unsqueeze(1)  # beside the logits
        chosen = lp.gather(1, index)[:, 0].tolist()
        tops = self._tops(lp, req.logprobs)
        return entries + [(self.itos[int(t)], c, top) for t, c, top in zip(targets, chosen, tops)]

    def _tops(self, lp: torch.Tensor, n: int | None) -> list:
        """Per position, the ``n`` most probable characters and their log-probabilities (``{}`` for 0)."""
        if n is None:
            return [None] * len(lp)
        values, idx = lp.topk(min(n, lp.shape[-1]), dim=-1)
        return [{self.itos[i]: v for i, v in zip(ri, rv) if v > -math.inf}  # (JSON has no -inf)
                for ri, rv in zip(idx.tolist(), values.tolist())]

    def _update_batch(self, joining: list[Request]) -> None:
        """Drop the rows that are done, add the joining requests' rows, and rebuild the batch if it changed."""
        self.dirty = False
        keep = [r for r in self.rows if not r.done]
        if len(keep) == len(self.rows) and not joining:
            return
        old, index = self.stepper, {id(r): i for i, r in enumerate(self.rows)}
        rows = keep + [_Row(req, i) for req in joining for i in range(req.n)]
        for req in joining:
            req.rows = [r for r in rows if r.req is req]
        self.rows = rows
        self.requests = list(dict.fromkeys(r.req for r in rows))
        self.wants_logprobs = any(req.logprobs is not None for req in self.requests)
        # per request, the rows' places in its own uniform vector (all of them, unless some samples ended)
        self.uniform_parts = [(req, None if [r.index for r in rows if r.req is req] == list(range(req.n))
                               else torch.tensor([r.index for r in rows if r.req is req], device=self.device))
                              for req in self.requests]
        if not rows:
            self.stepper, self.params = None, None
            return
        layers = []  # per state tensor (h, and c for the LSTM and the mogrifier): (L, N, H), the rows in order
        for part in range(2 if self.model.config.cell in PAIR_STATE_CELLS else 1):
            def vec(r, k, part=part):
                if id(r) in index:
                    return (old.h if part == 0 else old.c)[k][index[id(r)]: index[id(r)] + 1]
                state = r.req.state[part] if isinstance(r.req.state, tuple) else r.req.state
                return state[k]
            layers.append(torch.stack([torch.cat([vec(r, k) for r in rows])
                                       for k in range(self.model.config.num_layers)]))
        kept_logits = [old.logits[index[id(r)]: index[id(r)] + 1].clone() if id(r) in index else r.req.logits
                       for r in rows]
        self.stepper = self._stepper(len(rows))
        self.stepper.start(tuple(layers) if len(layers) == 2 else layers[0])
        for i, lg in enumerate(kept_logits):
            if lg is not None:
                self.stepper.logits[i: i + 1].copy_(lg)
        self.params = DrawParams([(r.req.options.temperature, r.req.options.top_k, r.req.options.top_p)
                                  for r in rows], len(self.itos), self.device)
        for req in joining:
            req.state, req.logits = None, None  # in the batch now

    def _stepper(self, n: int) -> Stepper:
        if n not in self.steppers:
            like = next(iter(self.steppers.values()), None)
            threads = self.threads if self.device.type == "cpu" else 1
            self.steppers[n] = Stepper(self.model, n, threads=threads, like=like)
        return self.steppers[n]

    def _tick(self) -> None:
        rows, st = self.rows, self.stepper
        u = None if self.params.all_greedy else self._uniforms()
        ids = draw(st.logits, self.params, u)
        ids_list = ids.tolist()
        entries = self._generated_entries(st.logits, ids_list) if self.wants_logprobs else None
        itos = self.itos
        for i, (row, c) in enumerate(zip(rows, ids_list)):
            row.push(itos[c], None if entries is None else entries[i])
            if row.done:
                self.dirty = True
        now = time.perf_counter()
        for req in self.requests:
            self._after_tick(req, now)
        if self.metrics is not None:
            self.metrics.tick(len(rows))
        self.ticks += 1
        st.step(ids_list[0] if len(rows) == 1 else ids)

    def _uniforms(self) -> torch.Tensor:
        """This tick's uniform per row: each request's stream advances once for all its samples."""
        parts = []
        for req, places in self.uniform_parts:
            if req.uniforms is not None:
                u = req.uniforms.next()
            else:
                u = torch.zeros(req.n, dtype=torch.float64, device=self.device)
            parts.append(u if places is None else u[places])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _generated_entries(self, logits: torch.Tensor, ids: list[int]) -> list:
        """Per row, (char, log-probability, top-N) under the model's whole distribution, as charlm eval
        scores text: the batch's logits hold ``<unk>`` at -inf (never drawn), so its own logit is put back."""
        head = self.model.head
        full = logits.float().clone()
        full[:, 0] = torch.addmv(head.bias[0], self.stepper.h[-1], head.weight[0])
        lp = torch.log_softmax(full, -1)
        chosen = lp.gather(1, torch.as_tensor(ids, device=lp.device).unsqueeze(1))[:, 0].tolist()
        tops = self._tops(lp, max(r.req.logprobs or 0 for r in self.rows))
        out = []
        for r, c, lpc, top in zip(self.rows, ids, chosen, tops):
            n = r.req.logprobs
            out.append(None if n is None else (self.itos[c], lpc, dict(list(top.items())[:n]) if top else {}))
        return out

    def _after_tick(self, req: Request, now: float) -> None:
        req.steps += 1
        if req.cancelled.is_set():
            reason = "cancelled"
        elif now - req.started > self.max_seconds:
            reason = "time"
        else:
            reason = None
        if reason is not None:
            for r in req.rows:
                r.finish(reason)
            self.dirty = True
        done = all(r.done for r in req.rows)
        # the first character at once, then chunks of at least `chunk` characters, at most one per `flush_s`
        if done or req.steps == 1 or (req.steps - req.flushed >= self.chunk and now - req.flushed_at >= self.flush_s):
            req.flushed, req.flushed_at = req.steps, now
            self._flush(req)
        if done:
            self._finish(req, None)

    def _flush(self, req: Request) -> None:
        parts = [r.take() for r in req.rows]
        if any(text for text, _ in parts):
            if self.metrics is not None:
                if not req.first_sent:
                    self.metrics.first_char(time.perf_counter() - req.submitted)
                self.metrics.chars(sum(len(t) for t, _ in parts))
            req.first_sent = True
            entries = [e for _, e in parts] if req.logprobs is not None else None
            self._send(req, ("text", [t for t, _ in parts], entries))

    def _finish(self, req: Request, reason: str | None) -> None:
        # the books first: a client that has its answer may read /metrics or send its next request at once
        if req.ended:
            return
        req.ended = True
        info = self._info(req, reason)
        self._release(req)
        self.served += 1
        if self.metrics is not None:
            self.metrics.finished(time.perf_counter() - req.submitted)
        self._send(req, ("done", info))

    def _info(self, req: Request, reason: str | None) -> dict:
        reasons = [r.reason for r in req.rows] if req.rows else [reason or "cancelled"] * req.n
        counts = [len(r.chars) if r.cut is None else r.cut for r in req.rows] or [0]
        main = next((x for x in ("cancelled", "time") if x in reasons), reasons[0])
        return {"finish_reason": main, "finish_reasons": reasons, "seed": req.options.seed, "chars": counts[0],
                "elapsed_s": round(time.perf_counter() - req.submitted, 4)}

    def _release(self, req: Request) -> None:
        """Free the request's rows and admit what now fits from the queue (in order)."""
        with self.lock:
            self.reserved -= req.n
            self._prune_queue()
            while self.queue and self.reserved + self.queue[0].n <= self.slots:
                nxt = self.queue.popleft()
                self.reserved += nxt.n
                self.admitted.append(nxt)
            self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.occupancy(self.reserved, len(self.queue))

    @staticmethod
    def _send(req: Request, event: tuple) -> None:
        try:
            req.deliver(event)
        except Exception:  # noqa: BLE001 - the consumer is gone (its event loop closed): stop its work
            req.cancel()
