"""A GGUF reader for the tensor types of llama.cpp's Q4_1 Llama files, in numpy.

GGUF (version 2 and 3): a header, typed metadata, tensor descriptions, then the tensor data, each tensor
at an offset aligned to `general.alignment`. Dimensions are stored innermost first, so a tensor listed
as [576, 49152] is the row-major (49152, 576) matrix. Supported element types, each dequantized exactly
to float32 as llama.cpp defines it (`ggml-quants.c`):

| type | id | block of 32 values                                  | value          |
|------|---:|-----------------------------------------------------|----------------|
| F32  |  0 | —                                                   | x              |
| F16  |  1 | —                                                   | x              |
| Q4_1 |  3 | fp16 d, fp16 m, 16 bytes: value j in the low nibble | d·q + m        |
|      |    | of byte j, value j + 16 in its high nibble          |                |
| Q8_0 |  8 | fp16 d, 32 int8                                     | d·q            |
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from decomposer.errors import VpdError

MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8
_BLOCK = 32
_BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}
TYPE_NAMES = {F32: "F32", F16: "F16", Q4_1: "Q4_1", Q8_0: "Q8_0"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major, outermost first
    type: int
    offset: int  # absolute, in the file


class _Reader:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.off, self.path = buf, 0, path

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.off + size > len(self.buf):
            raise VpdError(f"GGUF file {self.path} ends inside its header. Delete it so that it is downloaded again.")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.off)
        self.off += size
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        raw = bytes(self.buf[self.off : self.off + n])
        self.off += n
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            inner, n = self.scalar("I"), self.scalar("Q")
            return [self.value(inner) for _ in range(n)]
        if kind not in _SCALARS:
            raise VpdError(f"GGUF file {self.path} has a metadata value of unknown type {kind}; it is not a GGUF file.")
        return self.scalar(_SCALARS[kind])


@dataclass
class GGUFFile:
    """Metadata and tensor descriptions of a GGUF file; `tensor(name)` dequantizes one tensor."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    _data: np.ndarray

    def tensor(self, name: str) -> np.ndarray:
        """Tensor `name` as a float32 array of its row-major shape."""
        info = self.tensors[name]
        n = int(np.prod(info.shape))
        if info.type == F32:
            out = self._slice(info, 4 * n).view("<f4")
        elif info.type == F16:
            out = self._slice(info, 2 * n).view("<f2").astype(np.float32)
        elif info.type in _BLOCK_BYTES:
            blocks = self._slice(info, n // _BLOCK * _BLOCK_BYTES[info.type]).reshape(-1, _BLOCK_BYTES[info.type])
            out = _dequantize(blocks, info.type)
        else:
            raise VpdError(
                f"GGUF tensor {name} of {self.path} has type {info.type}, which this reader does not decode; "
                f"it reads {', '.join(TYPE_NAMES.values())}."
            )
        return out.reshape(info.shape).astype(np.float32, copy=False)

    def _slice(self, info: TensorInfo, nbytes: int) -> np.ndarray:
        if info.offset + nbytes > len(self._data):
            raise VpdError(
                f"GGUF file {self.path} ends inside tensor {info.name}. Delete it so that it is downloaded again."
            )
        return self._data[info.offset : info.offset + nbytes]


def _dequantize(blocks: np.ndarray, kind: int) -> np.ndarray:
    """(n_blocks, bytes) → (n_blocks · 32,) float32."""
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)  # (n, 1)
    if kind == Q8_0:
        q = blocks[:, 2:].view(np.int8).astype(np.float32)  # (n, 32)
        return (d * q).reshape(-1)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    packed = blocks[:, 4:]  # (n, 16)
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)  # values j and j + 16
    return (d * q + m).reshape(-1)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of a GGUF file (the tensor data stays memory-mapped until read).

    Raises:
        VpdError: Not a GGUF file, an unsupported version, or a file that ends inside its header.
    """
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if len(data) < 24 or bytes(data[:4]) != MAGIC:
        raise VpdError(f"{path} is not a GGUF file (it does not start with 'GGUF'). Delete it and fetch it again.")
    r = _Reader(memoryview(data), path)
    r.off = 4
    version = r.scalar("I")
    if version not in (2, 3):
        raise VpdError(f"{path} is GGUF version {version}; this reader reads versions 2 and 3.")
    n_tensors, n_kv = r.scalar("Q"), r.scalar("Q")
    metadata = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.scalar("I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.scalar("Q") for _ in range(r.scalar("I"))]
        kind, offset = r.scalar("I"), r.scalar("Q")
        infos.append((name, tuple(reversed(dims)), kind, offset))
    align = int(metadata.get("general.alignment", 32))
    start = (r.off + align - 1) // align * align
    tensors = {name: TensorInfo(name, shape, kind, start + offset) for name, shape, kind, offset in infos}
    return GGUFFile(path, metadata, tensors, data)
