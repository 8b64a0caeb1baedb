"""What the benchmarks that run DeepSpeed share: its async I/O settings and a free port for its one-process
rendezvous."""

import socket

# DeepSpeed's documented aio defaults: 1 MiB blocks, queue depth 8, one thread, overlapped events.
AIO = {
    "block_size": 1 << 20,
    "queue_depth": 8,
    "intra_op_parallelism": 1,
    "single_submit": False,
    "overlap_events": True,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
