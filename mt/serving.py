"""Serving translations to many clients at once: one worker per model batches concurrent requests.

A request's segments join a queue; the worker takes the oldest request, waits for more until
`max_wait` after that one arrived (not at all if it has waited that long already), and decodes the
segments of every request with the same decoding options as one chunk through
`Translator.translate_chunks`: sorted by length and batched by tokens, the path `mt translate`
takes. Each request then gets its own results, in order. Nothing here knows of HTTP (mt.server).
"""

from __future__ import annotations

import bisect
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from mt.decoding import DecodeOptions
from mt.translate import Translation, Translator


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; more is refused with a 4xx naming the limit."""

    max_body_bytes: int = 1 << 20
    max_segments: int = 128  # per request
    max_chars: int = 2000  # per segment
    max_beam: int = 16
    max_wait_ms: float = 5.0  # how long a request waits for others to share its batch
    max_batch_segments: int = 512  # segments decoded together at most


@dataclass
class Job:
    """One request's work for a model: translate `segments`, or (attention) one segment with its weights."""

    segments: list[str]
    options: DecodeOptions
    attention: bool = False
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.monotonic)


class Metrics:
    """Counters and histograms for GET /metrics, in Prometheus's text format; safe across threads."""

    LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.segments: Counter[str] = Counter()  # model -> segments translated
        self.latency = _Histogram(self.LATENCY_BUCKETS)
        self.batch_segments = _Histogram(self.BATCH_BUCKETS)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1
            if status < 400:
                self.latency.observe(seconds)

    def batch(self, model: str, segments: int) -> None:
        with self._lock:
            self.segments[model] += segments
            self.batch_segments.observe(segments)

    def render(self, queued: dict[str, int]) -> str:
        with self._lock:
            requests = {f'endpoint="{e}",status="{s}"': n for (e, s), n in sorted(self.requests.items())}
            lines = [
                *_family("mt_requests_total", "counter", "HTTP requests by endpoint and status.", requests),
                *_family("mt_segments_total", "counter", "Segments translated, by model.", _by_model(self.segments)),
                *_family("mt_queued_requests", "gauge", "Requests waiting for a worker.", _by_model(queued)),
                *self.latency.render("mt_request_seconds", "Latency of successful requests."),
                *self.batch_segments.render("mt_batch_segments", "Segments per decoded batch."),
            ]
        return "\n".join(lines) + "\n"


def _by_model(values: dict[str, int]) -> dict[str, int]:
    return {f'model="{m}"': n for m, n in sorted(values.items())}


def _header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _family(name: str, kind: str, help_text: str, samples: dict[str, int]) -> list[str]:
    return [*_header(name, kind, help_text), *(f"{name}{{{k}}} {n}" for k, n in samples.items())]


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.total, self.count = buckets, [0] * (len(buckets) + 1), 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines, running = _header(name, "histogram", help_text), 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            running += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return [*lines, f"{name}_sum {self.total:.6f}", f"{name}_count {self.count}"]


class BatchingWorker:
    """The one thread that decodes for a model, batching the jobs queued while it was busy or waiting."""

    def __init__(self, name: str, translator: Translator, limits: ServeLimits, metrics: Metrics):
        self.name, self.translator, self.limits, self.metrics = name, translator, limits, metrics
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=f"mt-serve-{name}", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Future:
        self.jobs.put(job)
        return job.future

    def stop(self) -> None:
        """Finish every queued job, then end the thread."""
        self.jobs.put(None)
        self.thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self.jobs.get()
            if first is None:
                break
            jobs, stopping = self._gather(first)
            self._decode(jobs)

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """`first` and the jobs that arrive within its wait (or are queued already), up to the batch limit."""
        jobs, segments = [first], len(first.segments)
        deadline = first.queued + self.limits.max_wait_ms / 1000
        while segments < self.limits.max_batch_segments:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            segments += len(job.segments)
        return jobs, False

    def _decode(self, jobs: list[Job]) -> None:
        groups: dict[DecodeOptions, list[Job]] = {}
        for job in jobs:
            if job.attention:
                self._settle([job], lambda job=job: [self.translator.attention(job.segments[0], job.options)])
            else:
                groups.setdefault(job.options, []).append(job)
        for options, group in groups.items():
            self._settle(group, lambda group=group, options=options: self._translate(group, options))

    def _translate(self, group: list[Job], options: DecodeOptions) -> list[list[list[Translation]]]:
        """All the group's segments as one chunk (sorted and batched by tokens), split back per job."""
        segments = [segment for job in group for segment in job.segments]
        translations = list(self.translator.translate_chunks([segments], options))
        self.metrics.batch(self.name, len(segments))
        results, start = [], 0
        for job in group:
            results.append(translations[start : start + len(job.segments)])
            start += len(job.segments)
        return results

    def _settle(self, jobs: list[Job], work: Callable[[], list]) -> None:
        """Run `work` (one result per job) and hand each job its result, or the error to all of them."""
        try:
            results = work()
        except Exception as exc:  # the request's problem, never the worker's end
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, result in zip(jobs, results):
            job.future.set_result(result)
