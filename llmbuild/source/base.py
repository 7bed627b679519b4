"""What every weight source offers: named tensors in HF layout, the config, a fingerprint.

A source is opened once, asked for names and shapes without reading data, and then
loads one tensor at a time. Concrete sources (`HFSource`, `GGUFSource`) differ only in
how they find and decode bytes; the shared pieces (fingerprint hashing, byte sampling)
live here as functions and a tiny base class; which tensors an architecture needs is
checked by llmbuild.models.shapes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from llmbuild.errors import UserError

# Fingerprint sampling: every tensor contributes up to _SAMPLES blocks of _BLOCK bytes,
# evenly spaced and always including its first and last block. Tensors up to
# _SAMPLES * _BLOCK bytes (64 KiB) are therefore hashed completely.
_BLOCK = 4096
_SAMPLES = 16


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class ByteSpan:
    """A byte range of one source file that the fingerprint samples."""

    start: int
    end: int


class ModelSource:
    """Base of the per-format sources. Subclasses set `format`, `path`, `config`."""

    format: str = ""
    path: Path
    config: dict

    # -- implemented per format -------------------------------------------------
    def names(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def load(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def export_tokenizer(self, dst_dir: Path) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _fingerprint_files(self) -> Iterable[tuple[str, Path, list[ByteSpan]]]:
        """(stable relative name, file, spans to sample) for every file that matters."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def fingerprint(self) -> str:
        """sha256 over format, config, tensor table and sampled file content.

        No mtimes and no absolute paths, so a copied or re-downloaded model keeps
        its fingerprint; any change to a tensor's shape/dtype, to the config, to the
        file sizes, or to the sampled bytes changes it.
        """
        h = hashlib.sha256()
        table = sorted((n, list(i.shape), str(i.dtype)) for n, i in ((n, self.info(n)) for n in self.names()))
        h.update(json.dumps({"format": self.format, "config": self.config, "tensors": table},
                            sort_keys=True, default=str).encode())
        for rel, file, spans in sorted(self._fingerprint_files(), key=lambda t: t[0]):
            size = file.stat().st_size
            h.update(f"\0{rel}\0{size}\0".encode())
            with open(file, "rb") as f:
                for span in spans:
                    for start, end in sample_ranges(span.start, min(span.end, size)):
                        f.seek(start)
                        h.update(f.read(end - start))
        return h.hexdigest()


def sample_ranges(start: int, end: int, block: int = _BLOCK, samples: int = _SAMPLES):
    """Evenly spaced [a, b) blocks covering start..end, the whole range if it is small."""
    n = end - start
    if n <= 0:
        return []
    if n <= block * samples:
        return [(start, end)]
    step = (n - block) / (samples - 1)
    return [(start + int(i * step), start + int(i * step) + block) for i in range(samples)]


def whole_file(path: Path) -> ByteSpan:
    return ByteSpan(0, path.stat().st_size)


def missing_tensor(name: str, where: Path) -> UserError:
    return UserError(f"tensor {name!r} not found in {where}")
