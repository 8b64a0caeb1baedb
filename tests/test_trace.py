"""The tracer's placing of device work (timed by CUDA events) on the host's time line, with stand-in events."""

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
    tracer = Tracer()
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
