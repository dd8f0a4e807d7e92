"""What a conversation's next turn can reuse from its earlier ones: image features and the prompt's KV cache.

A follow-up prompt starts with the previous one. :class:`ReuseCache` keeps, within one byte budget and
least recently used first out, the embedding run of each image seen (:class:`ImageFeatureCache` entries,
keyed by the image's content) and the KV cache of earlier prompts (:class:`PrefixCache` entries, keyed
by a :class:`PromptKey`). A new prompt continues the kept cache that shares its longest prefix, cut back
to that prefix; only the rest is prefilled. Keys hold everything the cached numbers depend on (tokens,
image content, model, dtype, chunk size), so a match is always exact.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from .cache import DeepseekV2Cache
from .tiling import num_tiles


@dataclass(frozen=True)
class ImageSpan:
    """One image's run of tokens in a prompt, ``start`` to ``end`` (excluded), and its content key."""

    start: int
    end: int
    key: str


@dataclass(frozen=True)
class PromptKey:
    """A prompt as its KV cache depends on it: token ids, which image fills each image run, and ``context``
    (model, dtype, chunk size): caches computed under another context never match."""

    tokens: tuple[int, ...]
    images: tuple[ImageSpan, ...]
    context: Hashable

    def common_prefix(self, other: PromptKey) -> int:
        """Positions at the start that both prompts compute the same way; never a part of an image's run."""
        if self.context != other.context:
            return 0
        length = next(
            (i for i, (a, b) in enumerate(zip(self.tokens, other.tokens)) if a != b),
            min(len(self.tokens), len(other.tokens)),
        )
        others = {span.start: span for span in other.images}
        for span in self.images:
            if span.start >= length:
                break
            if others.get(span.start) != span or span.end > length:
                return span.start
        return length


def model_context(model: torch.nn.Module) -> tuple:
    """What identifies a model's numbers: the object, its dtype and the device it computes on."""
    return id(model), str(model.dtype), str(model.device)


def image_key(tiles: torch.Tensor, crop: tuple[int, int], context: Hashable) -> str:
    """A content key for one processed image: its tiles' pixels and grid, and the model's ``context``."""
    pixels = tiles.detach().contiguous().cpu()
    digest = hashlib.blake2b(digest_size=20)
    digest.update(repr((tuple(pixels.shape), str(pixels.dtype), tuple(crop), context)).encode())
    digest.update(pixels.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class ImageFeatureCache:
    """One image's embedding run (vision tower + projector output, laid out), as the prompt takes it."""

    run: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.run.numel() * self.run.element_size()


@dataclass
class PrefixCache:
    """The KV cache of an earlier prompt, and the conversation it belongs to (``owner``), to free it with."""

    key: PromptKey
    cache: DeepseekV2Cache
    owner: Hashable = None

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes


class ReuseCache:
    """Image features and prompt KV caches under one least-recently-used byte budget; thread-safe."""

    def __init__(self, budget: int):
        self.budget = budget
        self._entries: OrderedDict[tuple, ImageFeatureCache | PrefixCache] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def image_runs(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The kept runs of those images that are kept, now the most recently used."""
        found = {}
        with self._lock:
            for key in keys:
                entry = self._entries.get(("image", key))
                if entry is not None:
                    self._entries.move_to_end(("image", key))
                    found[key] = entry.run
        return found

    def keep_image_run(self, key: str, run: torch.Tensor) -> None:
        self._keep(("image", key), ImageFeatureCache(run))

    def take_prefix(self, key: PromptKey, limit: int) -> tuple[DeepseekV2Cache | None, int]:
        """The kept cache sharing the longest prefix (at most ``limit`` positions) with ``key``, cut to it.

        An entry the new prompt extends whole is taken out (the new prompt's cache replaces it); one it
        shares only a part of stays, for its own conversation, and a cut copy is returned.
        """
        with self._lock:
            best, shared = None, 0
            for name, entry in self._entries.items():
                if name[0] == "prefix":
                    common = min(entry.key.common_prefix(key), limit)
                    if common > shared:
                        best, shared = name, common
            if best is None:
                return None, 0
            entry = self._entries[best]
            if shared == len(entry.key.tokens):
                del self._entries[best]
                entry.cache.keep_prefix(shared)
                return entry.cache, shared
            self._entries.move_to_end(best)
            return entry.cache.copy_prefix(shared), shared

    def keep_prefix(self, key: PromptKey, cache: DeepseekV2Cache, owner: Hashable = None) -> None:
        """Keep ``cache`` cut to the prompt of ``key`` (positions after it, the answer's, are forgotten)."""
        cache.keep_prefix(len(key.tokens))
        self._keep(("prefix", key), PrefixCache(key, cache, owner))

    def drop(self, owner: Hashable) -> None:
        """Free the prompt caches of one conversation (image features stay: they are not anyone's history)."""
        with self._lock:
            for name in [n for n, e in self._entries.items() if isinstance(e, PrefixCache) and e.owner == owner]:
                del self._entries[name]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _keep(self, name: tuple, entry: ImageFeatureCache | PrefixCache) -> None:
        """Add an entry, then evict the least recently used ones until the total fits the budget."""
        with self._lock:
            self._entries.pop(name, None)
            if entry.nbytes > self.budget:
                return
            self._entries[name] = entry
            total = sum(kept.nbytes for kept in self._entries.values())
            while total > self.budget:
                _, evicted = self._entries.popitem(last=False)
                total -= evicted.nbytes


def prompt_image_runs(model, reuse: ReuseCache, inputs, context: Hashable) -> tuple[tuple[ImageSpan, ...], list]:
    """The image spans of a one-row processor output and each image's run, encoding only images not kept."""
    crops = [(w, h) for w, h in inputs.images_spatial_crop[0].tolist() if w > 0 and h > 0]
    tiles, start = [], 0
    for crop in crops:
        tiles.append(inputs.images[0, start : start + num_tiles(crop)])
        start += num_tiles(crop)
    keys = [image_key(image_tiles, crop, context) for image_tiles, crop in zip(tiles, crops)]
    runs = reuse.image_runs(keys)
    first_of = {key: i for i, key in reversed(list(enumerate(keys)))}  # an image shown twice is encoded once
    missing = sorted(i for key, i in first_of.items() if key not in runs)
    if missing:
        images = torch.cat([tiles[i] for i in missing])[None]
        spatial = torch.tensor([[crops[i] for i in missing]])
        for i, run in zip(missing, model.encode_images(images, spatial)[0]):
            runs[keys[i]] = run
            reuse.keep_image_run(keys[i], run)
    positions = inputs.images_seq_mask[0].nonzero().flatten().tolist()
    spans, first = [], 0
    for key, count in zip(keys, inputs.num_image_tokens[0]):
        spans.append(ImageSpan(positions[first], positions[first + count - 1] + 1, key))
        first += count
    return tuple(spans), [runs[key] for key in keys]
