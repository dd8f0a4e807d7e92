"""The decoder's KV cache: layers that append in place into buffers with spare room, and the rule they grow by.

:func:`cache_capacity` is the growth rule; the layers size their buffers with it and the memory planner
predicts the cache's size with it. A cache can be cut back to a prefix of its positions, in place or as a
copy, so that a later prompt that starts the same way continues it (``deepseek_vl2.models.reuse``).
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache, DynamicLayer

# Spare room, in tokens, that a cache buffer grows by: one reallocation per this many decode steps.
CACHE_BLOCK = 256


def cache_capacity(tokens: int, decoded: int = 0) -> int:
    """Positions a layer's buffers hold once ``tokens`` positions are written, the last ``decoded`` of them
    one token per forward (decode steps) and the ones before by forwards of several tokens (prefill).

    A forward of several tokens sizes the buffers to what it wrote; a one-token forward that finds them
    full grows them to the next multiple of ``CACHE_BLOCK`` above the tokens written, so that the following
    steps append in place.
    """
    if not 0 <= decoded <= tokens:
        raise ValueError(f"decoded must be between 0 and tokens ({tokens}), got {decoded}")
    if not decoded:
        return tokens
    first_step = (tokens - decoded + 1) // CACHE_BLOCK * CACHE_BLOCK + CACHE_BLOCK
    return max(first_step, -(-tokens // CACHE_BLOCK) * CACHE_BLOCK)


class BufferedLayer(DynamicLayer):
    """A cache layer that appends in place, into buffers with spare room.

    ``DynamicLayer`` concatenates, which copies the whole cache on every decode step (for tiny's plain
    attention at a 1.5k-token prompt, ~180 MB per token on top of 1.15 GB of weights); and oneDNN matmuls
    copy any view into a larger buffer before reading it. Here ``keys``/``values`` are buffers sized by
    :func:`cache_capacity`, zero where nothing was written yet. A one-token step attends over the whole
    buffers, the unwritten tail masked as future positions (``get_mask_sizes`` says so, as for
    ``StaticLayer``); longer steps get views of the filled part, which keeps SDPA's causal fast path for
    prefill.
    """

    def __init__(self):
        super().__init__()
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2] if self.is_initialized and self.keys.dim() > 1 else 0

    def _capacity_for(self, query_length: int) -> int:
        end = self.length + query_length
        if end <= self.capacity:
            return self.capacity
        return cache_capacity(end, decoded=1 if query_length == 1 else 0)

    def _room_for(self, buffer: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        capacity = self._capacity_for(new.shape[-2])
        if buffer.dim() == new.dim() and buffer.shape[:-2] == new.shape[:-2] and buffer.shape[-2] == capacity:
            return buffer
        grown = new.new_zeros((*new.shape[:-2], capacity, new.shape[-1]))
        if self.length:
            grown[..., : self.length, :].copy_(buffer[..., : self.length, :])
        return grown

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        self.keys, self.values = self._room_for(self.keys, key_states), self._room_for(self.values, value_states)
        self.keys[..., start:end, :].copy_(key_states)
        self.values[..., start:end, :].copy_(value_states)
        self.length = end
        visible = self.capacity if key_states.shape[-2] == 1 else end
        return self.keys[..., :visible, :], self.values[..., :visible, :]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self._capacity_for(1) if query_length == 1 else self.length + query_length), 0

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (a negative count, as ``DynamicLayer.crop`` takes).

        The buffers keep their size: the next forward writes over the forgotten positions.
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self.length = max(self.length + tokens_to_remove, 0)

    def reset(self) -> None:
        super().reset()
        self.length = 0

    def copy_prefix(self, length: int) -> BufferedLayer:
        """A layer holding a copy of the first ``length`` positions, on this layer's device."""
        if not 0 <= length <= self.length:
            raise ValueError(f"can copy 0 to {self.length} positions, not {length}")
        copy = BufferedLayer()
        if self.is_initialized:
            copy.lazy_initialization(self.keys, self.values)
            copy.keys = self.keys[..., :length, :].clone()
            copy.values = self.values[..., :length, :].clone()
            copy.length = length
        return copy

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold, their spare room included."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class DeepseekV2Cache(DynamicCache):
    """The decoder's default cache: a ``DynamicCache`` made of :class:`BufferedLayer` layers."""

    def __init__(self, config=None, offloading: bool = False, offload_only_non_sliding: bool = False):
        super().__init__(config=config, offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)
        self.layers = [BufferedLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = BufferedLayer

    def _buffered_layers(self) -> list[BufferedLayer]:
        if not all(isinstance(layer, BufferedLayer) for layer in self.layers):
            raise TypeError("only a cache of BufferedLayer layers can be cut to a prefix")
        return self.layers

    def keep_prefix(self, length: int) -> None:
        """Forget every position from ``length`` on, in place (the buffers keep their size)."""
        if not 0 <= length <= self.get_seq_length():
            raise ValueError(f"can keep 0 to {self.get_seq_length()} positions, not {length}")
        for layer in self._buffered_layers():
            layer.crop(length - layer.length)

    def copy_prefix(self, length: int) -> DeepseekV2Cache:
        """A new cache holding a copy of the first ``length`` positions; each layer stays on its device."""
        copy = DeepseekV2Cache()
        copy.layers = [layer.copy_prefix(length) for layer in self._buffered_layers()]
        return copy

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self._buffered_layers())


class DeepseekV2GenerationMixin(GenerationMixin):
    """``GenerationMixin`` that generates with a :class:`DeepseekV2Cache` where it would create a ``DynamicCache``."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            config = self.config.get_text_config(decoder=True)
            model_kwargs["cache"] = DeepseekV2Cache(config=config, offloading=cache.offloading)
