"""Text for calibration and evaluation: the bundled corpus (split into parts that never
overlap) or a user's `.txt` / `.jsonl` file, cut into fixed-length token chunks.

    kjv                      the bundled corpus (llmbuild/data/corpus/README.md); a
                             consumer picks the split: quantization calibrates on
                             `calibration`, `llmbuild eval` measures on `evaluation`
    kjv:calibration          one split explicitly
    path/to/file.txt         plain text, used whole
    path/to/file.jsonl       one JSON object per line; its "text" field is used
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

import numpy as np

from llmbuild.errors import UserError

BUNDLED = {"kjv": ("calibration", "evaluation")}
DEFAULT_DATASET = "kjv"


def is_bundled(name: str) -> bool:
    return name.split(":", 1)[0] in BUNDLED


def dataset_problem(name: str) -> str | None:
    """Why `name` cannot name a dataset (for recipe validation), or None."""
    base, _, split = name.partition(":")
    if base in BUNDLED:
        if split and split not in BUNDLED[base]:
            return f"bundled corpus {base!r} has splits {list(BUNDLED[base])}, not {split!r}"
        return None
    if not name.endswith((".txt", ".jsonl")):
        return (f"dataset {name!r}: expected a bundled corpus ({', '.join(BUNDLED)}) or a path to a .txt or"
                " .jsonl file")
    return None


def read_text(name: str, split: str, base_dir: Path | None = None) -> str:
    """The text of dataset `name`; `split` picks the part of a bundled corpus unless the
    name already says `corpus:split`."""
    problem = dataset_problem(name)
    if problem:
        raise UserError(problem)
    base, _, explicit = name.partition(":")
    if base in BUNDLED:
        part = explicit or split
        data = resources.files("llmbuild.data").joinpath("corpus", f"{base}-{part}.txt.gz").read_bytes()
        return gzip.decompress(data).decode("utf-8")
    path = Path(name)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise UserError(f"dataset file {path} does not exist")
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts.append(row["text"])
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{i}: expected a JSON object with a \"text\" field ({e})") from None
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


def token_chunks(ids: list[int] | np.ndarray, seq_len: int, count: int | None = None, *, seed: int | None = None,
                 where: str = "dataset") -> np.ndarray:
    """[count, seq_len] int64 chunks of the token stream, non-overlapping.

    seed None: the first `count` consecutive chunks (evaluation: deterministic, in order);
    seed int: `count` chunks drawn at random from all chunk positions (calibration).
    """
    ids = np.asarray(ids, np.int64)
    available = len(ids) // seq_len
    if available == 0:
        raise UserError(f"{where} has {len(ids)} tokens, fewer than one chunk of {seq_len}")
    count = available if count is None else count
    if count > available:
        raise UserError(f"{where} has {len(ids)} tokens: {available} chunks of {seq_len}, {count} requested")
    chunks = ids[: available * seq_len].reshape(available, seq_len)
    if seed is None:
        return chunks[:count].copy()
    order = np.random.default_rng(seed).permutation(available)[:count]
    return chunks[np.sort(order)].copy()
