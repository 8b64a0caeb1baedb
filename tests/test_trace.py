"""The tracer's placing of device work (timed by CUDA events) on the host's time line, with stand-in events;
its samples of the process's resident set."""

import time

import torch

from tiertune.trace import Tracer


class FakeEvent:
    """A recorded device event at ``at_ms`` on the device's clock."""

    def __init__(self, at_ms: float) -> None:
        self.at_ms, self.synced = at_ms, False

    def elapsed_time(self, other: "FakeEvent") -> float:
        return other.at_ms - self.at_ms

    def synchronize(self) -> None:
        self.synced = True


def test_device_spans_land_on_the_host_time_line_through_the_reference_event():
    tracer = Tracer(rss_interval_s=None)
    tracer.set_device_reference(FakeEvent(100.0), host_ns=5_000_000)  # device 100 ms = host 5 ms
    end = FakeEvent(103.5)
    tracer.device_span("copies", "layers.0 to device", FakeEvent(102.0), end, bytes=4096)
    events = tracer.events()
    tracks = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    (copy,) = [e for e in events if e["ph"] == "X"]
    assert tracks[copy["tid"]] == "copies" and copy["name"] == "layers.0 to device"
    assert copy["ts"] == 7_000.0 and copy["dur"] == 1_500.0  # microseconds: host 5 ms + 2 ms, 1.5 ms long
    assert copy["args"] == {"bytes": 4096} and end.synced
    assert [e for e in tracer.events() if e["ph"] == "X"] == [copy]  # resolved once, kept


def test_the_resident_set_is_sampled_into_the_trace_and_the_plot_and_its_peak_found(tmp_path):
    tracer = Tracer(rss_interval_s=0.005)
    time.sleep(0.05)
    big = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched: resident
    time.sleep(0.05)
    del big
    time.sleep(0.05)
    tracer.counter({"device": 1 << 20})
    written = tracer.save(tmp_path)
    assert [p.name for p in written] == ["trace.json", "memory.png"]
    samples = [e["args"]["rss"] for e in tracer.events() if e.get("name") == "process RSS"]
    assert len(samples) >= 10
    assert max(samples) - samples[0] >= 60 << 20  # the 64 MiB seen while it lived
    at, peak = tracer.peak_rss()
    assert peak == max(samples) and 0.04 < at < 1.0
    n = len(samples)
    time.sleep(0.03)
    assert len([e for e in tracer.events() if e.get("name") == "process RSS"]) == n  # stopped by save
