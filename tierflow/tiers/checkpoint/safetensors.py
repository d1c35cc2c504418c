"""Reading safetensors headers directly (no tensor data is touched).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping
tensor names to {dtype, shape, data_offsets}, then the data; offsets are relative to the
end of the header. We parse the header ourselves so that the reader can turn tensors into
absolute byte ranges of the original file and read them with O_DIRECT, without ever
writing a converted copy of the model.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from tierflow.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20
MAX_RANK = 64                  # dimensions of one tensor (PyTorch allows 64)


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor's bytes are: an absolute byte range of a file."""

    name: str
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file_offset: int
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors file's header and check it against the file's size.

    Every malformed header is a ``CheckpointError`` naming the file (and the tensor): a
    header length past the end of the file, a header that is not UTF-8 JSON holding an
    object, an entry that is not an object, an unknown dtype, a shape that is not a list of
    integers >= 0, ``data_offsets`` that are not two integers ``begin <= end`` within the data
    area, a byte count other than shape x dtype size, or two tensors sharing bytes.
    ``__metadata__`` is not read."""
    try:
        file_bytes = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: {file_bytes} bytes is too short to be a safetensors file "
                                      "(expected an 8-byte header length); the file is truncated or not safetensors")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > min(MAX_HEADER_BYTES, file_bytes - 8):
                raise CheckpointError(f"{path}: header length {header_bytes} does not fit a {file_bytes}-byte "
                                      f"file (at most {MAX_HEADER_BYTES} bytes); the file is corrupt or truncated "
                                      "— download it again")
            raw = f.read(header_bytes)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc}); the file is corrupt "
                              "— download it again") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object, found {type(header).__name__}; "
                              "the file is corrupt")
    data_start = 8 + header_bytes
    entries = {name: _entry(path, name, info, data_start, file_bytes)
               for name, info in header.items() if name != "__metadata__"}
    _check_overlaps(path, entries.values())
    return entries


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, info: object, data_start: int, file_bytes: int) -> TensorEntry:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {what}; the file is corrupt — download it again")

    if not isinstance(info, dict):
        raise bad(f"its header entry must be an object with dtype, shape and data_offsets, found {_shown(info)}")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
    if missing:
        raise bad(f"its header entry lacks {missing}")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise bad(f"dtype {_shown(dtype_name)} is not one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_index(n) for n in shape):
        raise bad(f"shape must be a list of at most {MAX_RANK} integers >= 0, found {_shown(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(n) for n in offsets):
        raise bad(f"data_offsets must be two integers [begin, end] >= 0, found {_shown(offsets)}")
    begin, end = offsets
    if begin > end:
        raise bad(f"data_offsets {offsets} are reversed (begin after end)")
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise bad(f"shape {shape} of {dtype_name} needs {nbytes} bytes, data_offsets {offsets} give {end - begin}")
    if data_start + end > file_bytes:
        raise CheckpointError(f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has "
                              f"{file_bytes} bytes; the file is truncated — download it again")
    return TensorEntry(name, str(path), dtype, tuple(shape), data_start + begin, nbytes)


def _check_overlaps(path: Path, entries: Iterable[TensorEntry]) -> None:
    """No two tensors (of at least one byte) share a byte of the file."""
    previous: TensorEntry | None = None
    for entry in sorted((e for e in entries if e.nbytes), key=lambda e: e.file_offset):
        if previous is not None and entry.file_offset < previous.file_offset + previous.nbytes:
            raise CheckpointError(f"{path}: tensors {previous.name!r} and {entry.name!r} overlap (bytes "
                                  f"{entry.file_offset}..{previous.file_offset + previous.nbytes} of the file); "
                                  "the file is corrupt — download it again")
        previous = entry


def _shown(value: object) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
