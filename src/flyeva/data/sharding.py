"""Exact sharding of an indexable source over ranks for evaluation: every sample counted once."""

from __future__ import annotations

from typing import Any

from flyeva.data.sources import SourceSubset


class RankShard(SourceSubset):
    """Samples rank, rank + world, rank + 2 world, ... of an indexable source: exact sharded evaluation."""

    def __init__(self, source: Any, rank: int, world_size: int):
        super().__init__(source, range(rank, len(source), world_size))
