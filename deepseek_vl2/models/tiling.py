"""How DeepSeek-VL2 cuts images into tiles, and how many image tokens each image becomes.

Each image is seen twice: as a *global view* (the whole image padded to one tile, a square as wide
as the first candidate resolution: 384 px) and as *local views* (the image padded to the candidate
resolution that fits it best and cut into a ``width_tiles`` x ``height_tiles`` grid of tiles). In
the token sequence the image becomes a run of image tokens, one per visual embedding: for ``h = w =
ceil((tile_size // patch_size) / downsample_ratio)`` features per side, the global view takes
``h * (w + 1)`` (a newline embedding after each row), one separator follows, then the local views
take ``(height_tiles * h) * (width_tiles * w + 1)``.

As in training, a conversation with more than ``MAX_IMAGES_WITH_TILING`` images gets no tiling at
all: each image is a global view plus a single tile.

Everything here reads sizes only, so the processor, the memory planner, the web demo's context
trimming and the benchmark share one rule without touching pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# With more than this many images in one conversation, no image is tiled (as in training).
MAX_IMAGES_WITH_TILING = 2

Grid = tuple[int, int]  # (width_tiles, height_tiles) of an image's local views


def tile_size_for(candidate_resolutions: Sequence[Sequence[int]]) -> int:
    """The side of one square tile: the width of the first candidate resolution."""
    return candidate_resolutions[0][0]


def select_best_resolution(
    image_size: tuple[int, int], candidate_resolutions: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """The (width, height) among ``candidate_resolutions`` that keeps most of the image's pixels.

    The image is scaled to fit each candidate; the candidate that keeps the most pixels (never
    counting more than the original has) wins, ties going to the one with least padding, then
    to the earlier candidate.
    """
    width, height = image_size
    best, best_kept, best_wasted = None, 0, math.inf
    for candidate_width, candidate_height in candidate_resolutions:
        scale = min(candidate_width / width, candidate_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = candidate_width * candidate_height - kept
        if kept > best_kept or (kept == best_kept and wasted < best_wasted):
            best, best_kept, best_wasted = (candidate_width, candidate_height), kept, wasted
    return best


def tiling_enabled(num_images: int) -> bool:
    """Whether the images of a conversation holding ``num_images`` images are tiled."""
    return num_images <= MAX_IMAGES_WITH_TILING


def tile_grid(image_size: tuple[int, int], candidate_resolutions: Sequence[Sequence[int]], tiling: bool = True) -> Grid:
    """The local views' grid (width_tiles, height_tiles) for an image of ``image_size`` (width, height).

    Without ``tiling`` the local view is a single tile.
    """
    if not tiling:
        return 1, 1
    best_width, best_height = select_best_resolution(image_size, candidate_resolutions)
    side = tile_size_for(candidate_resolutions)
    return best_width // side, best_height // side


def tile_grids(image_sizes: Sequence[tuple[int, int]], candidate_resolutions: Sequence[Sequence[int]]) -> list[Grid]:
    """The grid of each image of one conversation, in order (untiled when there are too many images)."""
    tiling = tiling_enabled(len(image_sizes))
    return [tile_grid(size, candidate_resolutions, tiling) for size in image_sizes]


def num_tiles(grid: Grid) -> int:
    """Tiles the vision tower encodes for an image with this grid: the global view and the local tiles."""
    width_tiles, height_tiles = grid
    return 1 + width_tiles * height_tiles


def num_image_tokens(grid: Grid, *, tile_size: int, patch_size: int, downsample_ratio: int) -> int:
    """Image tokens that stand for one image with this grid (global view, separator, local views)."""
    width_tiles, height_tiles = grid
    side = math.ceil((tile_size // patch_size) / downsample_ratio)
    global_view = side * (side + 1)
    local_views = (height_tiles * side) * (width_tiles * side + 1)
    return global_view + 1 + local_views


def tiles_and_tokens(
    image_sizes: Sequence[tuple[int, int]],
    candidate_resolutions: Sequence[Sequence[int]],
    *,
    patch_size: int,
    downsample_ratio: int,
) -> tuple[int, int]:
    """(tiles, image tokens) in all for the images of one conversation, from their sizes alone."""
    grids = tile_grids(image_sizes, candidate_resolutions)
    side = tile_size_for(candidate_resolutions)
    tokens = [
        num_image_tokens(grid, tile_size=side, patch_size=patch_size, downsample_ratio=downsample_ratio)
        for grid in grids
    ]
    return sum(map(num_tiles, grids)), sum(tokens)
