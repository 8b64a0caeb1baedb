"""Files written tensor by tensor, so a model or optimizer state larger than memory can be saved from its
tiers one block at a time (the libraries' writers want every tensor in memory at once).

- :func:`write_safetensors`: the safetensors format: an 8-byte little-endian header length, a JSON header
  naming each tensor's dtype, shape and byte range, then the bytes. The header needs only shapes, so it
  is written first and the tensors follow in the order they are produced. Read back with ``safetensors``.
- :func:`write_torch`: ``torch.save``'s format (a zip archive: the pickled object, then one record per
  tensor), for objects such as an optimizer ``state_dict`` whose tensors stand in as :class:`Deferred`
  placeholders: the pickle needs only shapes, and each tensor's bytes go out as it is produced. Read back
  with ``torch.load`` (``weights_only`` and ``mmap`` included).
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Deferred:
    """A tensor of a :func:`write_torch` object whose bytes come later: ``key`` is its place (0, 1, ...) in
    the order the tensors are produced."""

    key: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    tensor: Deferred


# torch.load rebuilds a tensor from a storage named by the class torch.save gives it.
_STORAGE_TYPES = {
    torch.float32: torch.FloatStorage,
    torch.float16: torch.HalfStorage,
    torch.bfloat16: torch.BFloat16Storage,
    torch.float64: torch.DoubleStorage,
    torch.int64: torch.LongStorage,
    torch.int32: torch.IntStorage,
    torch.uint8: torch.ByteStorage,
    torch.bool: torch.BoolStorage,
}


class _Pickler(pickle.Pickler):
    """Pickles :class:`Deferred` as torch.save pickles a contiguous CPU tensor: a call that rebuilds it
    from a storage, and the storage as a reference to the archive's record ``data/<key>``. The
    placeholders it met are in ``placeholders``, by key."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=2)
        self.placeholders: dict[int, Deferred] = {}

    def reducer_override(self, obj):
        if not isinstance(obj, Deferred):
            return NotImplemented
        self.placeholders[obj.key] = obj
        stride, step = [], 1
        for n in reversed(obj.shape):
            stride.insert(0, step)
            step *= n
        args = (_Storage(obj), 0, tuple(obj.shape), tuple(stride), False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        t = obj.tensor
        return ("storage", _STORAGE_TYPES[t.dtype], str(t.key), "cpu", math.prod(t.shape))


def write_torch(path: Path, obj: object, tensors: Iterable[torch.Tensor]) -> None:
    """Write ``obj`` as ``torch.save`` would, its :class:`Deferred` placeholders replaced by ``tensors``,
    which must come in key order with the announced shapes and dtypes; each may be freed as soon as it has
    been handed over. The file is fsynced."""
    data = io.BytesIO()
    pickler = _Pickler(data)
    pickler.dump(obj)
    placeholders = pickler.placeholders
    if sorted(placeholders) != list(range(len(placeholders))):
        raise ValueError(f"{path.name}: placeholder keys must be 0..{len(placeholders) - 1}")
    with open(path, "wb") as fh:
        try:  # CRC32 on, 64-byte aligned records (what torch.save writes and mmap loading wants)
            archive = torch._C.PyTorchFileWriter(fh, True, 64)
        except TypeError:  # a torch before the writer took those: it aligns to 64 and computes CRC32 itself
            archive = torch._C.PyTorchFileWriter(fh)
        try:
            _write_records(archive, path, data.getvalue(), placeholders, tensors)
        finally:
            # Always closed while the file is open: the writer's destructor would write to a closed file.
            archive.write_end_of_file()
            del archive
        fh.flush()
        os.fsync(fh.fileno())


def _write_records(
    archive, path: Path, pickled: bytes, placeholders: dict[int, Deferred], tensors: Iterable[torch.Tensor]
) -> None:
    archive.write_record("data.pkl", pickled, len(pickled))
    archive.write_record(".format_version", "1", 1)
    archive.write_record(".storage_alignment", "64", 2)
    archive.write_record("byteorder", "little", len("little"))
    count = 0
    for tensor in tensors:
        want = placeholders.get(count)
        if want is None or tensor.dtype != want.dtype or tuple(tensor.shape) != tuple(want.shape):
            raise ValueError(
                f"{path.name}: tensor {count} is {tensor.dtype} {tuple(tensor.shape)}, expected {want}"
            )
        raw = tensor.detach().to("cpu").contiguous()
        if raw.storage_offset() or raw.untyped_storage().nbytes() != raw.nbytes:
            raw = raw.clone()  # a view: the record is a whole storage, and its storage starts at its base's
        archive.write_record(f"data/{count}", raw.untyped_storage(), raw.nbytes)
        del raw, tensor
        count += 1
    if count != len(placeholders):
        raise ValueError(f"{path.name}: {count} tensors for {len(placeholders)} placeholders")
