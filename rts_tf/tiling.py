"""Tiling: the grid of overlapping tiles over a scene, grouped into blocks read in one go."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from rts_tf.errors import InputError


def check_tiling(tile_size: int, overlap: int) -> None:
    """Raise InputError for tile sizes and overlaps that cannot tile a scene."""
    if tile_size < 8:
        raise InputError(f"--tile-size must be at least 8 pixels, got {tile_size}")
    if overlap < 0 or overlap >= tile_size:
        raise InputError(f"--overlap must be at least 0 and smaller than --tile-size ({tile_size}), got {overlap}")


def tile_offsets(length: int, tile_size: int, overlap: int) -> list[int]:
    """Offsets of tiles along one axis: stride tile_size - overlap, covering the whole length.

    The last tile may run past the end (it is padded), so pixels at the edge are never dropped.
    """
    stride = tile_size - overlap
    count = max(1, math.ceil((length - overlap) / stride))
    return [index * stride for index in range(count)]


@dataclass(frozen=True)
class Block:
    """A window of the scene grid holding several whole tiles; tiles are (row, col) offsets."""

    row: int
    col: int
    height: int
    width: int
    tiles: tuple[tuple[int, int], ...]


def blocks(height: int, width: int, tile_size: int, overlap: int,
           tiles_per_side: int = 4) -> Iterator[Block]:
    """Blocks of up to tiles_per_side x tiles_per_side tiles, row by row.

    Reading a block at once amortises the halo that terrain needs, while memory stays bounded by
    the block, not the scene.
    """
    rows = tile_offsets(height, tile_size, overlap)
    cols = tile_offsets(width, tile_size, overlap)
    for row_start in range(0, len(rows), tiles_per_side):
        row_group = rows[row_start:row_start + tiles_per_side]
        for col_start in range(0, len(cols), tiles_per_side):
            col_group = cols[col_start:col_start + tiles_per_side]
            yield Block(row_group[0], col_group[0],
                        row_group[-1] + tile_size - row_group[0],
                        col_group[-1] + tile_size - col_group[0],
                        tuple((r, c) for r in row_group for c in col_group))


def count_tiles(height: int, width: int, tile_size: int, overlap: int) -> int:
    """How many tiles cover a scene (before any are dropped)."""
    return len(tile_offsets(height, tile_size, overlap)) * len(tile_offsets(width, tile_size, overlap))
