"""idx files (LeCun et al.'s format of MNIST and FashionMNIST): find, read (``.gz`` or not), check, parse.

An idx file is a 4-byte magic number — two zero bytes, the element type (``0x08`` unsigned byte, ``0x09``
signed byte, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64) and the number of
dimensions — then each dimension as a big-endian uint32, then the data, big-endian, row-major.
Nothing here writes a file.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxFormatError(ValueError):
    """The bytes are not a well-formed idx file."""


def parse_idx(data: bytes) -> np.ndarray:
    """The array stored in the idx bytes ``data`` (native byte order, read-only view of ``data``)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise IdxFormatError(
            f"magic number {data[:4].hex() or 'missing'} is not an idx header "
            "(00 00 <type 08/09/0b/0c/0d/0e> <dimensions>)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{len(data)} bytes cannot hold the header of {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_TYPES[data[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise IdxFormatError(f"dimensions {dims} need {expected} bytes of data; the file has {len(data) - header}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def find_idx(folder: Path, name: str) -> Path | None:
    """``folder/name`` if it is a file, else ``folder/name.gz`` if it is one, else None."""
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def find_folder(folders: Sequence[Path], names: Sequence[str]) -> dict[str, Path] | None:
    """The files ``names`` (each plain or ``.gz``) of the first folder that holds all of them, or None."""
    for folder in folders:
        found = {name: find_idx(folder, name) for name in names}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its name ends in ``.gz``."""
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def md5(data: bytes) -> str:
    """The hex MD5 of ``data``."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def check_md5(data: bytes, expected: str) -> str | None:
    """None when the MD5 of ``data`` is ``expected``, else the MD5 found (the tests patch this function)."""
    found = md5(data)
    return None if found == expected else found
