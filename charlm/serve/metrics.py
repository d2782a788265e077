"""``GET /metrics``: the server's counters in Prometheus's text format (the ``prometheus-client`` package).

Each server has a registry of its own (several may run in one process, as in the tests).
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, slots: int):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("charlm_requests_running", "Requests holding slots (warming up or generating).",
                             registry=r)
        self.waiting = Gauge("charlm_requests_waiting", "Requests queued for a slot.", registry=r)
        Gauge("charlm_slots", "Sequences the engine steps together at most (--slots).", registry=r).set(slots)
        self.requests = Counter("charlm_http_requests", "HTTP requests answered, by endpoint, method and status.",
                                ["path", "method", "status"], registry=r)
        self.characters = Counter("charlm_characters_generated", "Characters generated (sent to clients).",
                                  registry=r)
        self.ttfc = Histogram("charlm_time_to_first_character_seconds", "From a request's arrival to its first "
                              "text.", buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("charlm_generation_duration_seconds", "From a request's arrival to its end.",
                                  buckets=_DURATION_BUCKETS, registry=r)
        self.per_tick = [0] * (slots + 1)  # ticks by the number of sequences stepped (counted here, exposed by
        r.register(_Occupancy(self.per_tick))  # _Occupancy: a tick costs an increment, not a histogram's lock)
        self._rate = (time.perf_counter(), 0)  # for chars_per_s: (since, characters)
        self.recent_rate = 0.0

    # -- called by the engine thread --------------------------------------------------------------
    def tick(self, active: int) -> None:
        self.per_tick[active] += 1

    def chars(self, n: int) -> None:
        self.characters.inc(n)
        since, count = self._rate
        now, count = time.perf_counter(), count + n
        if now - since >= 1.0:
            self.recent_rate, self._rate = count / (now - since), (now, 0)
        else:
            self._rate = (since, count)

    def first_char(self, seconds: float) -> None:
        self.ttfc.observe(seconds)

    def finished(self, seconds: float) -> None:
        self.duration.observe(seconds)

    def occupancy(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    # -- HTTP -------------------------------------------------------------------------------------
    def answered(self, path: str, method: str, status: int) -> None:
        self.requests.labels(path, method, str(status)).inc()

    def chars_per_s(self) -> float:
        """Characters sent per second over the last second or so (0 when idle for longer)."""
        since, _ = self._rate
        return self.recent_rate if time.perf_counter() - since < 2.0 else 0.0

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Occupancy:
    """``charlm_slots_active_per_tick``: a histogram of the sequences stepped together at each tick."""

    def __init__(self, per_tick: list[int]):
        self.per_tick = per_tick

    def collect(self):
        counts = list(self.per_tick)
        buckets, total = [], 0
        for k, n in enumerate(counts[1:], start=1):
            total += n
            buckets.append((str(float(k)), total))
        buckets.append(("+Inf", total))
        yield HistogramMetricFamily("charlm_slots_active_per_tick", "Sequences stepped together, per tick.",
                                    buckets=buckets, sum_value=sum(k * n for k, n in enumerate(counts)))
