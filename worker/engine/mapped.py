"""An embedding table read straight from the weights file through a read-only memory map.

A token's input row is one row of the table, so a job reads a few kilobytes
of it; holding the whole table in memory (136 MB in int8, 544 MB in float32
for a 0.5B model) buys nothing. Mapped, only the pages of rows that were
looked up become resident, and the OS can drop them again under pressure, as
llama.cpp does with its whole model. Used when the output layer is a table of
its own (untied) and the folder's safetensors file holds the embedding in
float32 or float16; otherwise the embedding is held as the weight format says.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

EMBEDDING_NAME = "model.embed_tokens.weight"
_DTYPES = {"F32": np.float32, "F16": np.float16}


class MappedEmbedding:
    def __init__(self, rows: np.memmap):
        self.rows = rows  # (vocabulary, hidden), read-only

    @classmethod
    def open(cls, folder: Path, name: str = EMBEDDING_NAME) -> MappedEmbedding | None:
        """The table ``name`` in ``folder``'s safetensors files, or None where it cannot be mapped."""
        path = _file_holding(Path(folder), name)
        if path is None:
            return None
        with open(path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            entry = json.loads(file.read(header_size)).get(name)
        if entry is None or entry["dtype"] not in _DTYPES:
            return None
        begin, _ = entry["data_offsets"]
        rows = np.memmap(path, dtype=_DTYPES[entry["dtype"]], mode="r", offset=8 + header_size + begin,
                         shape=tuple(entry["shape"]))
        return cls(rows)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # ids: (tokens,) -> (tokens, hidden) float32
        return torch.from_numpy(np.array(self.rows[ids.numpy()], dtype=np.float32))


def _file_holding(folder: Path, name: str) -> Path | None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shard = json.loads(index.read_text()).get("weight_map", {}).get(name)
        return folder / shard if shard else None
    single = folder / "model.safetensors"
    return single if single.is_file() else None
