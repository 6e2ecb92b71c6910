"""Reading one rank's slice of a safetensors tensor with positioned reads, into the rank's own memory.

safetensors' own `get_slice` reads through a memory map: the pages it touches stay mapped into the
process until the file is closed, and a column slice (a row-parallel weight) touches every page of
the tensor, so a tensor-parallel rank would hold most of each file while loading it. A safetensors
file is an 8-byte header length, a JSON header (each tensor's dtype, shape and byte range) and the
row-major data, so the rank can instead `pread` exactly its bytes straight into its shard: nothing
else of the file is mapped or copied, and the page cache (shared by all ranks) is the only other
place the bytes pass through.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SliceReader:
    """An open safetensors file whose tensors are read piecewise; use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        (size,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        self.header, self.base = json.loads(os.pread(self.fd, size, 8)), 8 + size

    def __enter__(self) -> "SliceReader":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def read_into(self, name: str, dest: torch.Tensor, dim: int, start: int) -> None:
        """dest.copy_(stored.narrow(dim, start, dest.shape[dim])), reading only those bytes.

        `dest` may be a narrowed view (each block of it below `dim` is contiguous). In the stored
        dtype the bytes land in `dest` itself; otherwise one block at a time is read and converted.
        """
        info = self.header[name]
        stored, shape = DTYPES[info["dtype"]], info["shape"]
        if list(dest.shape[:dim]) != shape[:dim] or list(dest.shape[dim + 1:]) != shape[dim + 1:]:
            raise ValueError(f"{self.path}: {name} has shape {shape}, which a slice of shape "
                             f"{list(dest.shape)} along dim {dim} cannot come from")
        inner = math.prod(shape[dim + 1:]) * stored.itemsize            # bytes of one index along `dim`
        blocks = dest.view(-1, *dest.shape[dim:]) if dim else dest.unsqueeze(0)
        first = self.base + info["data_offsets"][0] + start * inner
        for b, block in enumerate(blocks):
            offset = first + b * shape[dim] * inner
            if block.dtype == stored:
                self._read(block, offset)
            else:
                staged = torch.empty(block.shape, dtype=stored)
                self._read(staged, offset)
                block.copy_(staged)

    def _read(self, block: torch.Tensor, offset: int) -> None:
        view = memoryview(block.detach().view(torch.uint8).numpy()).cast("B")
        while view:
            got = os.preadv(self.fd, [view], offset)
            if got == 0:
                raise ValueError(f"{self.path} ends before the data its header promises (truncated?)")
            view, offset = view[got:], offset + got
