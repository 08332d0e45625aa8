"""Reading prepared data: memory-mapped Arrow, no ``datasets`` or network needed.

``pipeline.prepare`` writes one folder per split with ``Dataset.save_to_disk``: Arrow
IPC stream files plus ``state.json`` naming them. Those files are readable by
``datasets.load_from_disk`` *and* by plain pyarrow, which is all this module uses, so a
GPU machine with only torch + pyarrow can train.

Each row holds ``input_ids`` (``<bos> tokens <eos>``, uint16 or int32) and ``length``
(the number of ids). The model predicts ``length - 1`` tokens per row.

Importing it does not import torch (``pipeline.prepare`` reads prepared splits back
without it); :func:`make_loader` does.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.errors import UserError

MANIFEST = "manifest.json"


def read_manifest(folder: str | Path) -> dict:
    """The ``manifest.json`` of a prepared folder.

    Raises:
        UserError: the folder is missing or holds no (readable) manifest.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a prepared dataset (no {MANIFEST}); run python -m pipeline.prepare first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt: {e}; rebuild it with python -m pipeline.prepare RECIPE --force") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict) or "vocab_size" not in manifest:
        raise UserError(f"{path} is corrupt: not a pipeline.prepare manifest; rebuild it with python -m pipeline.prepare RECIPE --force")
    return manifest


class TokenDataset:
    """One split of a prepared folder, memory-mapped: a map-style dataset for ``DataLoader``.

    ``dataset[i]`` is a read-only numpy view of row ``i``'s ids (no copy);
    ``dataset.lengths`` is the length column, all a sampler needs. Pickling (DataLoader
    workers under spawn) sends only the path: each worker maps the same files, so the
    page cache is shared and nothing is copied per worker.

    Args:
        folder: the ``data.output`` folder written by ``pipeline.prepare``.
        split: ``train``, ``validation`` or ``test``.
    """

    def __init__(self, folder: str | Path, split: str) -> None:
        self.folder, self.split = Path(folder), split
        self._open()

    def _open(self) -> None:
        split_dir = self.folder / self.split
        state = split_dir / "state.json"
        if not state.is_file():
            have = sorted(p.name for p in self.folder.iterdir() if (p / "state.json").is_file()) if self.folder.is_dir() else []
            raise UserError(f"{self.folder} has no {self.split!r} split (has: {', '.join(have) or 'none'})")
        self._values: list[np.ndarray] = []  # flat ids of each record batch, memory-mapped
        starts, lengths = [], []
        try:
            files = [split_dir / f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(2, "No such file or directory", f.name)
                # nanoGPT's memmap habit: map the file, let the page cache do the rest
                table = pa.ipc.open_stream(pa.memory_map(str(f))).read_all()
                for chunk, length in zip(table.column("input_ids").chunks, table.column("length").chunks):
                    self._values.append(chunk.values.to_numpy(zero_copy_only=True))
                    starts.append(chunk.offsets.to_numpy()[:-1].astype(np.int64))
                    lengths.append(length.to_numpy())
        except (ValueError, KeyError, TypeError, OSError, pa.ArrowException) as e:  # JSON, Arrow, missing files
            why = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{split_dir} is damaged ({why}); rebuild it with python -m pipeline.prepare RECIPE --force") from None
        self._starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.lengths: np.ndarray = (np.concatenate(lengths) if lengths else np.zeros(0, np.int32)).astype(np.int64)
        self._chunk_ends = np.cumsum([len(s) for s in starts], dtype=np.int64)

    @classmethod
    def from_rows(cls, rows: list[np.ndarray], split: str) -> "TokenDataset":
        """An in-memory dataset of already encoded rows (``<bos> ids <eos>`` each), for text
        scored outside a prepared folder (``lm.evaluate --file``). It does not pickle."""
        self = cls.__new__(cls)
        self.folder, self.split = None, split
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        self._values = [np.concatenate(rows) if rows else np.zeros(0, np.int64)]
        self._starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.lengths = lengths
        self._chunk_ends = np.array([len(rows)], dtype=np.int64)
        return self

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} sequences")
        i = int(i) % len(self)
        c = int(np.searchsorted(self._chunk_ends, i, side="right"))
        start = self._starts[i]
        return self._values[c][start : start + self.lengths[i]]

    @property
    def num_tokens(self) -> int:
        """Predicted tokens: every id after ``<bos>`` (the perplexity denominator)."""
        return int(self.lengths.sum() - len(self.lengths))

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.folder, self.split = state["folder"], state["split"]
        self._open()


def make_loader(
    dataset: TokenDataset,
    *,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
) -> "torch.utils.data.DataLoader":
    """The data path in one call: bucket sampler over ``dataset.lengths`` + packed collator.

    Args:
        dataset: one split of a prepared folder.
        max_tokens: token budget per batch (sum of lengths); or give ``batch_size``.
        batch_size: sequences per batch.
        shuffle: shuffled epochs (training) or a fixed length-sorted order (evaluation).
        seed: sampler seed (call ``loader.batch_sampler.set_epoch(e)`` every epoch).
        num_workers: DataLoader worker processes; they map the files, nothing is copied.
        pin_memory: pin batches for fast host-to-GPU copies.
        num_replicas: DDP world size; rank: this process's rank.

    Returns:
        A ``DataLoader`` yielding :class:`pipeline.collate.PackedBatch` with shifted targets.
    """
    import torch

    from pipeline.collate import PackedCollator
    from pipeline.sampling import BucketBatchSampler

    sampler = BucketBatchSampler(
        dataset.lengths, batch_size=batch_size, max_tokens=max_tokens, shuffle=shuffle, seed=seed,
        num_replicas=num_replicas, rank=rank,
    )
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=PackedCollator(pad_id=0), num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=num_workers > 0,
        generator=torch.Generator(),  # its own generator: iterating never draws from the global RNG
    )
