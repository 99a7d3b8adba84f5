"""A checkpoint tensor that is read from disk only where it is sliced.

Under tensor parallelism each rank needs one slice of most weights. The
loader hands the layers' `weight_loader`s a `LazyCheckpointTensor`: `narrow`
and `[a:b]` read only those rows or columns from the safetensors file, so a
rank reads (about) 1/tp of the checkpoint; `as_tensor` reads the whole
tensor for the weights every rank keeps whole (norms, biases of row-parallel
layers).
"""

from __future__ import annotations

from typing import Any

import torch


class LazyCheckpointTensor:
    def __init__(self, source: Any, dtype: torch.dtype | None = None) -> None:
        """`source`: a safetensors slice (`safe_open(...).get_slice(name)`)
        or anything with `get_shape()` and numpy-style `__getitem__`."""
        self._source = source
        self._dtype = dtype
        self.shape = torch.Size(source.get_shape())
        # Elements read so far, shared with `.to()` copies: what loading this
        # tensor cost (the TP loading test checks it).
        self._elements_read = [0]

    @property
    def elements_read(self) -> int:
        return self._elements_read[0]

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def to(self, dtype: torch.dtype) -> LazyCheckpointTensor:
        """Convert on read (the loaders' `tensor.to(param.dtype)`)."""
        converted = LazyCheckpointTensor(self._source, dtype)
        converted._elements_read = self._elements_read
        return converted

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._read(index)

    def __getitem__(self, key: slice) -> torch.Tensor:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a checkpoint tensor is sliced with [start:stop] on its first dimension")
        return self._read((key,))

    def materialize(self) -> torch.Tensor:
        return self._read((slice(None),) * max(self.dim(), 1) if self.dim() else ())

    def _read(self, index: tuple) -> torch.Tensor:
        tensor = self._source[index] if index else self._source[...]  # [...] also reads a 0-dim tensor
        self._elements_read[0] += tensor.numel()
        return tensor if self._dtype is None else tensor.to(self._dtype)


def as_tensor(loaded: torch.Tensor | LazyCheckpointTensor) -> torch.Tensor:
    """The whole tensor, read now if it is still lazy."""
    return loaded.materialize() if isinstance(loaded, LazyCheckpointTensor) else loaded
