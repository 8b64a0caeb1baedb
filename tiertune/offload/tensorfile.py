"""A safetensors file written tensor by tensor, so a model or optimizer state larger than memory can be
saved from its tiers one block at a time (the library's writer wants every tensor in memory at once).

The format is the library's: an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the bytes. The header needs only shapes, so it is written first and
the tensors follow in the same order as they are produced. Files read back with ``safetensors``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    path: Path,
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name, tensor), which must come in the order and with the shapes and dtypes of
    ``entries``; each tensor may be freed as soon as it has been handed over. The file is fsynced."""
    header: dict[str, object] = {}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    expected: Iterator[tuple[str, torch.dtype, tuple[int, ...]]] = iter(entries)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for name, tensor in tensors:
            want = next(expected, None)
            if want is None or want[0] != name or tensor.dtype != want[1] or tuple(tensor.shape) != want[2]:
                raise ValueError(
                    f"{path.name}: got {name} {tensor.dtype} {tuple(tensor.shape)}, expected {want}"
                )
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            fh.write(memoryview(data.numpy()))
        if next(expected, None) is not None:
            raise ValueError(f"{path.name}: fewer tensors than announced in the header")
        fh.flush()
        os.fsync(fh.fileno())
