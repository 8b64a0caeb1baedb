"""``train.trace``: what ran when, in Chrome's trace format, and the bytes per tier over time as a plot.

Spans go on tracks: ``compute`` (forward, backward and the optimizer step of the training thread, and its
waits for blocks still in flight), ``nvme read`` and ``nvme write`` (each transfer from submission to its
last piece), ``copies`` (host-to-device copies into the window, timed by CUDA events on the device). Transfers that overlap each other get lanes of their own
track, so overlap with compute is visible at a glance in Perfetto (ui.perfetto.dev) or chrome://tracing.
The ledger's bytes per tier are recorded as counters, and drawn as ``memory.png`` with the process's
resident set (sampled by a thread every ``rss_interval_s``): the gap between the two is what the ledger
does not hold (the interpreter and libraries, activations, allocator slack, temporaries).

Tracing is off unless a :class:`Tracer` is installed (:func:`install`); the hooks then cost a function
call that does nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TRACKS = ("compute", "copies", "nvme read", "nvme write")


class Tracer:
    def __init__(self, rss_interval_s: float | None = 0.05) -> None:
        self._t0 = time.perf_counter_ns()
        self._lock = threading.Lock()
        self._spans: list[tuple[str, str, int, int, dict[str, Any]]] = []  # track, name, start, end (ns)
        self._counters: list[tuple[int, dict[str, int]]] = []
        self._rss: list[tuple[int, int]] = []  # (ns, bytes)
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        if rss_interval_s is not None:
            self._sampler = threading.Thread(
                target=self._sample_rss, args=(rss_interval_s,), name="tiertune-rss", daemon=True
            )
            self._sampler.start()
        # Device work timed by CUDA events (``enable_timing=True``), placed on the host's time line through
        # one reference event whose host time is known; resolved when the trace is written.
        self._device: list[tuple[str, str, Any, Any, dict[str, Any]]] = []
        self._reference: tuple[Any, int] | None = None

    def now(self) -> int:
        return time.perf_counter_ns() - self._t0

    def _sample_rss(self, interval_s: float) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        try:
            statm = open("/proc/self/statm", "rb")  # noqa: SIM115 (read again every sample)
        except OSError:  # not Linux: no samples
            return
        with statm:
            while not self._stop.is_set():
                statm.seek(0)
                resident = int(statm.read().split()[1]) * page
                with self._lock:
                    self._rss.append((self.now(), resident))
                self._stop.wait(interval_s)

    def close(self) -> None:
        """Stop sampling the resident set (the trace keeps what was sampled)."""
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
            self._sampler = None

    def peak_rss(self) -> tuple[float, int] | None:
        """The highest resident set sampled, and when (seconds since the tracer started)."""
        with self._lock:
            if not self._rss:
                return None
            ts, peak = max(self._rss, key=lambda s: s[1])
        return ts / 1e9, peak

    @contextlib.contextmanager
    def span(self, track: str, name: str, **args: Any) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.add(track, name, start, self.now(), **args)

    def add(self, track: str, name: str, start_ns: int, end_ns: int, **args: Any) -> None:
        with self._lock:
            self._spans.append((track, name, start_ns, end_ns, args))

    def set_device_reference(self, event: Any, host_ns: int) -> None:
        """The device event that completed at ``host_ns`` on this tracer's clock."""
        self._reference = (event, host_ns)

    def device_span(self, track: str, name: str, start: Any, end: Any, **args: Any) -> None:
        """A span between two recorded CUDA events (created with ``enable_timing=True``): its times are
        the device's, read when the trace is written."""
        if self._reference is None:
            import torch

            ref = torch.cuda.Event(enable_timing=True)
            ref.record()
            ref.synchronize()  # it completes now: its device time is this host time
            self.set_device_reference(ref, self.now())
        with self._lock:
            self._device.append((track, name, start, end, args))

    def _resolve_device_spans(self) -> None:
        with self._lock:
            device, self._device = self._device, []
        if not device:
            return
        ref, host_ns = self._reference
        for track, name, start, end, args in device:
            end.synchronize()
            begin_ns = host_ns + int(ref.elapsed_time(start) * 1e6)  # elapsed_time is in ms
            self.add(track, name, begin_ns, host_ns + int(ref.elapsed_time(end) * 1e6), **args)

    def counter(self, values: dict[str, int]) -> None:
        with self._lock:
            self._counters.append((self.now(), dict(values)))

    def events(self) -> list[dict[str, Any]]:
        """Chrome trace events: one thread per track lane, spans as complete events, counters."""
        self._resolve_device_spans()
        with self._lock:
            spans, counters = sorted(self._spans, key=lambda s: s[2]), list(self._counters)
        lanes: dict[str, list[int]] = {}  # track -> end time of each lane's last span
        tids: dict[tuple[str, int], int] = {}
        out: list[dict[str, Any]] = []
        for track, name, start, end, args in spans:
            ends = lanes.setdefault(track, [])
            lane = next((i for i, e in enumerate(ends) if e <= start), len(ends))
            if lane == len(ends):
                ends.append(end)
            else:
                ends[lane] = end
            if (track, lane) not in tids:
                tids[(track, lane)] = tid = len(tids) + 1
                label = track if lane == 0 else f"{track} ({lane + 1})"
                out.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": label}})
                order = TRACKS.index(track) if track in TRACKS else len(TRACKS)
                out.append(
                    {
                        "ph": "M",
                        "name": "thread_sort_index",
                        "pid": 1,
                        "tid": tid,
                        "args": {"sort_index": order * 100 + lane},
                    }
                )
            out.append(
                {
                    "ph": "X",
                    "name": name,
                    "pid": 1,
                    "tid": tids[(track, lane)],
                    "ts": start / 1e3,
                    "dur": max(end - start, 0) / 1e3,
                    **({"args": args} if args else {}),
                }
            )
        for ts, values in counters:
            out.append({"ph": "C", "name": "bytes per tier", "pid": 1, "ts": ts / 1e3, "args": values})
        with self._lock:
            rss = list(self._rss)
        for ts, resident in rss:
            out.append(
                {"ph": "C", "name": "process RSS", "pid": 1, "ts": ts / 1e3, "args": {"rss": resident}}
            )
        out.append({"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "tiertune"}})
        return out

    def save(self, directory: Path, suffix: str = "") -> list[Path]:
        """Stop sampling, write ``trace{suffix}.json`` and, when there are counters, ``memory{suffix}.png``;
        return what was written."""
        self.close()
        path = directory / f"trace{suffix}.json"
        path.write_text(json.dumps({"traceEvents": self.events(), "displayTimeUnit": "ms"}))
        written = [path]
        with self._lock:
            counters, rss = list(self._counters), list(self._rss)
        if counters:
            written.append(plot_tiers(counters, directory / f"memory{suffix}.png", rss))
        return written


def plot_tiers(
    counters: list[tuple[int, dict[str, int]]], path: Path, rss: list[tuple[int, int]] | None = None
) -> Path:
    """Bytes per tier over time, one line per tier, and the process's resident set, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = sorted({t for _, values in counters for t in values})
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    times = [ts / 1e9 for ts, _ in counters]
    for tier in tiers:
        ax.step(times, [v.get(tier, 0) / 2**20 for _, v in counters], where="post", label=tier)
    if rss:
        ax.plot([ts / 1e9 for ts, _ in rss], [n / 2**20 for _, n in rss], "k--", lw=1, label="process RSS")
    ax.set_xlabel("seconds since the engine started")
    ax.set_ylabel("MiB held")
    ax.set_title("bytes per memory tier" + (", and the process's resident set" if rss else ""))
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


_current: Tracer | None = None


def install(tracer: Tracer | None) -> None:
    """Make ``tracer`` the one the engine's hooks report to (None: tracing off)."""
    global _current
    _current = tracer


def current() -> Tracer | None:
    return _current


@contextlib.contextmanager
def span(track: str, name: str, **args: Any) -> Iterator[None]:
    """A span on the installed tracer; nothing when tracing is off."""
    tracer = _current
    if tracer is None:
        yield
        return
    with tracer.span(track, name, **args):
        yield
