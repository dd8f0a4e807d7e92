"""Loading the images a conversation refers to, as the processor expects them (RGB, upright)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError


def load_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """An RGB image, turned upright by its EXIF orientation; the first frame of an animation.

    Raises FileNotFoundError for a missing file and ValueError for a file that is not an image.
    """
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image).convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as opened:
            opened.seek(0)
            return ImageOps.exif_transpose(opened).convert("RGB")
    except UnidentifiedImageError as error:
        raise ValueError(f"not an image file (or a format Pillow cannot read): {path}") from error


def load_pil_images(conversations: Sequence[Mapping]) -> list[Image.Image]:
    """Every image named in the messages' ``"images"`` lists, in order, loaded with :func:`load_image`.

    Example message: ``{"role": "<|User|>", "content": "<image>\\nDescribe it.", "images": ["cat.jpg"]}``.
    """
    images = []
    for index, message in enumerate(conversations):
        paths = message.get("images", [])
        if isinstance(paths, (str, os.PathLike, Image.Image)):
            raise TypeError(f"message {index}: 'images' must be a list of paths, got a single {type(paths).__name__}")
        images.extend(load_image(path) for path in paths)
    return images
