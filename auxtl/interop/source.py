"""What a reader hands the importer: a foreign file's named arrays and their layout.

Every reader (torch, safetensors, keras, orbax, npz) returns a `Source`; name maps
(`auxtl.interop.name_maps`) and the importer work on it alone, so a format and a
naming scheme are independent: a torchvision state dict reads the same from `.pt`
or `.safetensors`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from auxtl.errors import InputError

# "torch": conv kernels (out, in, kh, kw), dense kernels (out, in).
# "flax": conv kernels (kh, kw, in, out), dense kernels (in, out) (also Keras's).
LAYOUTS = ("torch", "flax")


@dataclasses.dataclass(frozen=True)
class Source:
    """Named arrays read from one foreign file.

    Attributes:
      path: the file or folder read, as the user gave it.
      format: the reader's name (torch, safetensors, keras, orbax, npz).
      tensors: foreign name -> numpy array, in the file's order.
      layout: the layout of the arrays (one of LAYOUTS); a name map may override it.
      info: JSON-able facts the file states besides arrays (e.g. {"bn_epsilon": 1e-3},
        the Keras layer order, safetensors' header metadata).
    """

    path: str
    format: str
    tensors: dict[str, np.ndarray]
    layout: str = "flax"
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise InputError(f"{self.path}: layout must be one of {LAYOUTS}, got {self.layout!r}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(array.shape) for name, array in self.tensors.items()}

    def select(self, prefix: str) -> Source:
        """The arrays whose names start with `prefix`, the prefix stripped; InputError
        naming the prefix and some of the names if none does."""
        if not prefix:
            return self
        chosen = {name[len(prefix):]: array for name, array in self.tensors.items()
                  if name.startswith(prefix)}
        if not chosen:
            sample = ", ".join(list(self.tensors)[:5])
            raise InputError(f"{self.path}: no array name starts with prefix {prefix!r} "
                             f"(names begin: {sample})")
        return dataclasses.replace(self, tensors=chosen)
