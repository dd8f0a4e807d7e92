"""Loading the images a conversation refers to, as the processor expects them (RGB, upright)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def load_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """An RGB image, turned upright by its EXIF orientation; the first frame of an animation.

    Raises FileNotFoundError for a missing file, ValueError for a file that is not a readable image
    (not an image, truncated, or over Pillow's decompression-bomb limit, which we keep), TypeError
    for something that is neither a path nor a PIL image.
    """
    if isinstance(image, Image.Image):
        return _upright_rgb(image)
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"an image must be a file path or a PIL image, got {type(image).__name__}")
    if not os.fspath(image):
        raise ValueError("an image path is empty")
    path = Path(image)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as opened:
            opened.seek(0)
            return _upright_rgb(opened)
    except UnidentifiedImageError as error:
        raise ValueError(f"not an image file (or a format Pillow cannot read): {path}") from error
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"image {path} is larger than Pillow's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS:,} "
            "pixels (twice PIL.Image.MAX_IMAGE_PIXELS); if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS"
        ) from error
    except OSError as error:  # truncated or corrupt data, found while decoding
        raise ValueError(f"image file {path} could not be decoded ({error})") from error


def _upright_rgb(image: Image.Image) -> Image.Image:
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB; 16-bit and float images are stretched to their own range, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float images would clip to white in convert("RGB"): stretch them to 8 bits first
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    return image.convert("RGB")


def checked_messages(messages: Iterable[Mapping], what: str = "conversations") -> list[Mapping]:
    """``messages`` as a list, each a dict whose ``"images"``, if any, is a list: a bad shape fails obscurely later."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
        raise TypeError(f"{what} must be a list of message dicts, got {type(messages).__name__}")
    checked = list(messages)
    for index, message in enumerate(checked):
        if not isinstance(message, Mapping):
            raise TypeError(f"{what} message {index} must be a dict with 'role' and 'content', got {message!r}")
        images = message.get("images")
        if isinstance(images, (str, os.PathLike, Image.Image)):
            single = type(images).__name__
            raise TypeError(f"{what} message {index}: 'images' must be a list of paths, got a single {single}")
        if images is not None and not isinstance(images, Iterable):
            raise TypeError(f"{what} message {index}: 'images' must be a list of paths, got {type(images).__name__}")
    return checked


def load_pil_images(conversations: Sequence[Mapping]) -> list[Image.Image]:
    """Every image named in the messages' ``"images"`` lists, in order, loaded with :func:`load_image`.

    Example message: ``{"role": "<|User|>", "content": "<image>\\nDescribe it.", "images": ["cat.jpg"]}``.
    A missing or null ``"images"`` means none.
    """
    return [load_image(path) for message in checked_messages(conversations) for path in message.get("images") or []]
