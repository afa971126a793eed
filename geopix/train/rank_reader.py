"""Each training worker's share of the Parquet shards, in a deterministic order it can resume.

Why not Ray Data's ``streaming_split``: it hands blocks to whichever worker asks first, so a
restarted run cannot find where it stopped. Here the assignment and order depend only on
(files, world size, rank, seed, epoch), so a position is two numbers, ``(epoch, rows)``, saved
in every checkpoint and skipped over on resume (the skipped rows are read but not decoded).

Assignment: with at least as many files as workers, file ``i`` goes to rank ``i % world``; with
fewer, each file is shared by the ranks ``r ≡ i (mod files)``, which take every k-th row of it.
Each epoch a rank visits its files in a seeded random order and shuffles rows inside a buffer of
``shuffle_rows``; ``task_weights`` repeat or thin a task's rows before that buffer (a weight w
gives each row floor(w) copies and one more with probability w − floor(w), drawn per epoch).
Workers never run out: epochs repeat until the step budget is spent, so every rank makes the same
number of optimizer steps (a collective per step needs that).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from geopix.data.shard_set import ShardError, shard_files

# image_id: train.augment_per_image draws a picture's turn by it (the feature cache then hits).
# phrase_type: augmentation leaves relation phrases alone, and "segment every X" answers are
# complete (the image class map); both read it from the record.
COLUMNS = (
    "record_id", "image_id", "image", "task", "phrase_type", "conversation", "targets", "width", "height", "class_counts"
)  # fmt: skip


@dataclass(frozen=True)
class FileShare:
    path: str
    rows: int  # rows of the file (before the task filter)
    stride: int  # this rank takes rows offset, offset + stride, …
    offset: int


@dataclass
class Position:
    """Where a rank is: ``rows`` records of epoch ``epoch`` already consumed (after the task filter)."""

    epoch: int = 0
    rows: int = 0


def assign_files(row_counts: Sequence[int], world: int, rank: int) -> list[tuple[int, int, int]]:
    """The files ``rank`` reads, as (file index, row stride, row offset)."""
    files = len(row_counts)
    if files >= world:
        return [(i, 1, 0) for i in range(files) if i % world == rank]
    sharers = [r for r in range(world) if r % files == rank % files]
    return [(rank % files, len(sharers), sharers.index(rank))]


class RankReader:
    """The records of one rank, epoch after epoch, from a deterministic position."""

    def __init__(
        self,
        shards_uri: str,
        split: str,
        *,
        rank: int,
        world: int,
        seed: int,
        tasks: Sequence[str] | None = None,
        task_weights: Mapping[str, float] | None = None,
        shuffle_rows: int = 256,
        read_rows: int = 64,
    ):
        import pyarrow.parquet as pq

        self.fs, paths = shard_files(shards_uri, split)
        self.rank, self.world, self.seed = rank, world, seed
        self.tasks = set(tasks) if tasks else None
        self.task_weights = dict(task_weights or {})
        self.shuffle_rows, self.read_rows = shuffle_rows, read_rows
        counts = []
        for path in paths:
            try:
                counts.append(pq.ParquetFile(path, filesystem=self.fs).metadata.num_rows)
            except Exception as exc:  # noqa: BLE001 - any unreadable footer: name the file
                raise ShardError(f"shard {path} is not readable Parquet: {exc}") from None
        self.shares = [
            FileShare(paths[i], counts[i], stride, offset)
            for i, stride, offset in assign_files(counts, world, rank)
        ]

    def epoch_files(self, epoch: int) -> list[FileShare]:
        order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(self.shares))
        return [self.shares[i] for i in order]

    def epoch_records(self, epoch: int, skip: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """(rows consumed so far in this epoch, record) for one epoch, after the first ``skip``."""
        consumed = 0
        for share in self.epoch_files(epoch):
            for record in self._file_records(share, epoch):
                consumed += 1
                if consumed > skip:
                    yield consumed, record
        if consumed == 0:
            raise ShardError(
                f"rank {self.rank} of {self.world} has no records"
                + (f" of tasks {sorted(self.tasks)}" if self.tasks else "")
                + f" in {[s.path for s in self.shares]}"
            )

    def _file_records(self, share: FileShare, epoch: int) -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq

        seed = [self.seed, epoch, self.rank, zlib.crc32(share.path.encode())]
        rng = np.random.default_rng(seed)
        # Its own stream, so the shuffle (and every run without weights) stays as it was.
        copies_rng = np.random.default_rng([*seed, 1])
        file = pq.ParquetFile(share.path, filesystem=self.fs)
        columns = [c for c in COLUMNS if c in file.schema_arrow.names]
        buffer: list[dict[str, Any]] = []
        row = 0
        for table in file.iter_batches(batch_size=self.read_rows, columns=columns):
            keep = (np.arange(row, row + table.num_rows) - share.offset) % share.stride == 0
            row += table.num_rows
            table = table.filter(keep)
            if self.tasks is not None:
                table = table.filter(is_task(table["task"], self.tasks))
            rows = table.to_pylist()
            if self.task_weights:
                rows = [r for r in rows for _ in range(self._copies(r["task"], copies_rng))]
            buffer.extend(rows)
            while len(buffer) >= self.shuffle_rows:
                yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def _copies(self, task: str, rng: np.random.Generator) -> int:
        weight = self.task_weights.get(task, 1.0)
        whole = int(weight)
        return whole + int(rng.random() < weight - whole)


def is_task(column, tasks) -> Any:
    """A boolean Arrow mask: which rows of a ``task`` column are one of ``tasks``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.is_in(column, value_set=pa.array(sorted(tasks), pa.string()))
