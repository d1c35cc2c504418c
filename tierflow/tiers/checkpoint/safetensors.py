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

import torch

from tierflow.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20


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
    """Parse one safetensors file's header and check it against the file's size."""
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
                                      "file; the file is corrupt or truncated — download it again")
            raw = f.read(header_bytes)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc}); the file is corrupt") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object, found {type(header).__name__}")
    data_start = 8 + header_bytes
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start, file_bytes)
    return entries


def _entry(path: Path, name: str, info: object, data_start: int, file_bytes: int) -> TensorEntry:
    try:
        dtype_name, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: header entry {name!r} is malformed ({info!r})") from exc
    dtype = DTYPES.get(dtype_name)
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype_name!r}; supported: {sorted(DTYPES)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes or begin < 0:
        raise CheckpointError(f"{path}: tensor {name!r} of shape {list(shape)} {dtype_name} needs {nbytes} bytes, "
                              f"header gives {end - begin}; the file is corrupt")
    if data_start + end > file_bytes:
        raise CheckpointError(f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has "
                              f"{file_bytes} bytes; the file is truncated — download it again")
    return TensorEntry(name, str(path), dtype, shape, data_start + begin, nbytes)
