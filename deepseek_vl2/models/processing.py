"""DeepSeek-VL2's processor: a chat with images becomes token ids, image tiles and the masks that join them.

Each image becomes a global view and a grid of local tiles, padded with the mean colour, and each
``<image>`` placeholder a run of image-token ids, one per visual embedding the model will scatter
there; ``tiling`` holds the rules (which grid, how many tokens, no tiling with more than two images
in one conversation). The processor logs at INFO level when it turns tiling off.

Differences from the original processor (fixes): system text reaches the tokens, ``images=None``
works, a conversation may end with a user turn, an image too thin for Pillow to scale (on which the
original crashed) is processed with a one-pixel short side, bad input raises ValueError/TypeError
with a message, ``batchify`` keeps ``images_seq_mask`` boolean with any prompt lengths and also
takes batches, ``.to(device)`` keeps pixels in float32 unless asked, images in any mode become RGB
(16-bit ones scaled, not clipped to white), and nothing is printed.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.processing_utils import ProcessorMixin
from transformers.utils import PROCESSOR_NAME, cached_file

from ..utils.checkpoint import check_checkpoint_location
from ..utils.io import to_rgb
from .conversation import ASSISTANT, GROUNDING_TOKENS, IMAGE_TOKEN, PAD, USER, Conversation, format_user_turn
from .tiling import (
    num_image_tokens,
    num_tiles,
    select_best_resolution,
    tile_grid,
    tile_grids,
    tile_size_for,
    tiling_enabled,
)

# select_best_resolution is re-exported: notebooks import it from here.
__all__ = ["BatchedInputs", "DeepseekVLV2Processor", "ProcessedConversation", "pad_to_view", "select_best_resolution"]

logger = logging.getLogger(__name__)

ROLE_TOKENS = (USER, ASSISTANT)
RESAMPLING = Image.Resampling.BICUBIC  # ImageOps.pad's default, which the original uses


def pad_to_view(image: Image.Image, size: tuple[int, int], fill: tuple[int, ...]) -> Image.Image:
    """``image`` scaled to fit ``size`` (width, height) and centred on a ``fill`` canvas, as ``ImageOps.pad`` does.

    Pillow would scale the short side of an image much thinner than ``size`` to 0 px and fail; such
    an image is first scaled to fit with a one-pixel short side, which ``ImageOps.pad`` then only
    centres. Any other image goes to ``ImageOps.pad`` as it is.
    """
    scale = min(size[0] / image.width, size[1] / image.height)
    if min(image.size) * scale < 1:
        image = image.resize(tuple(max(1, round(side * scale)) for side in image.size), RESAMPLING)
    return ImageOps.pad(image, size, method=RESAMPLING, color=fill)


class _FieldsAsMapping:
    """Dict-style access to a dataclass's fields, so ``model(**inputs)`` and ``inputs["images"]`` work."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)


@dataclass
class ProcessedConversation(_FieldsAsMapping):
    """One conversation, unbatched. ``seq`` counts text and image tokens."""

    sft_format: str  # the conversation as readable text
    input_ids: torch.Tensor  # (seq,) int64
    labels: torch.Tensor  # (seq,) int64, ignore_id on image tokens (and on prompts when mask_prompt)
    images: torch.Tensor  # (n_tiles, 3, 384, 384) float32; one zero tile when there is no image
    images_seq_mask: torch.Tensor  # (seq,) bool, True on image tokens
    images_spatial_crop: torch.Tensor  # (n_images, 2) int64 (width, height in tiles); (1, 2) zeros if no image
    num_image_tokens: list[int]  # image tokens per image


@dataclass
class BatchedInputs(_FieldsAsMapping):
    """Model inputs for a batch of ``b`` conversations, padded to ``seq`` tokens (left, by default).

    Padding rows are zeros: zero tiles after a conversation's own tiles, and ``(0, 0)`` rows in
    ``images_spatial_crop`` after its images, so a row whose width is 0 ends a conversation's
    images. A text-only conversation has one zero tile and one ``(0, 0)`` row: for a text-only batch,
    ``images`` is ``(b, 1, 3, 384, 384)`` zeros, ``images_spatial_crop`` ``(b, 1, 2)`` zeros and
    ``images_seq_mask`` all False.
    """

    sft_format: list[str]
    input_ids: torch.Tensor  # (b, seq) int64, pad id on padding
    attention_mask: torch.Tensor  # (b, seq) int64, 0 on padding
    labels: torch.Tensor  # (b, seq) int64, ignore_id on padding
    images: torch.Tensor  # (b, max_n_tiles, 3, 384, 384) float32
    images_seq_mask: torch.Tensor  # (b, seq) bool
    images_spatial_crop: torch.Tensor  # (b, max_n_images, 2) int64
    num_image_tokens: list[list[int]]
    seq_lens: list[int]  # unpadded length of each conversation

    def unbatch(self) -> list[ProcessedConversation]:
        """The conversations of this batch without their padding, as ``batchify`` takes them."""
        samples = []
        for row, sft_format in enumerate(self.sft_format):
            tokens = self.attention_mask[row].bool()
            num_images = len(self.num_image_tokens[row])
            crops = self.images_spatial_crop[row, : max(num_images, 1)]
            tiles = sum(map(num_tiles, crops.tolist())) if num_images else 1
            samples.append(
                ProcessedConversation(
                    sft_format=sft_format,
                    input_ids=self.input_ids[row, tokens],
                    labels=self.labels[row, tokens],
                    images=self.images[row, :tiles],
                    images_seq_mask=self.images_seq_mask[row, tokens],
                    images_spatial_crop=crops,
                    num_image_tokens=self.num_image_tokens[row],
                )
            )
        return samples

    def to(
        self, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None
    ) -> BatchedInputs:
        """Move every tensor to ``device``; cast floating tensors (the pixels) only if ``dtype`` is given.

        ``to(dtype)`` alone casts the pixels and moves nothing; ids and masks always keep their dtype.
        """
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError("to() got two dtypes; call it as to(device, dtype)")
            device, dtype = None, device
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
        for name in self.keys():
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                setattr(self, name, value.to(device=device, dtype=cast))
        return self


class DeepseekVLV2Processor(ProcessorMixin):
    """Turns a DeepSeek-VL2 chat (messages plus PIL images) into model inputs.

    On construction it adds to ``tokenizer`` (in place, in the original's order, skipping tokens it
    already has) the pad token if it has none, ``image_token``, the grounding tokens and the role
    tokens, so ids match the published tokenizers. Defaults are the published checkpoints' values;
    ``add_special_token`` is kept only because the published processor_config.json carries it.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        candidate_resolutions: Sequence[Sequence[int]],
        patch_size: int = 14,
        downsample_ratio: int = 2,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        normalize: bool = True,
        image_token: str = IMAGE_TOKEN,
        pad_token: str = PAD,
        add_special_token: bool = False,
        sft_format: str = "deepseek",
        mask_prompt: bool = False,
        ignore_id: int = -100,
    ):
        if not candidate_resolutions:
            raise ValueError("candidate_resolutions is empty; give (width, height) tile grids such as [[384, 384]]")
        if sft_format != "deepseek":
            raise ValueError(f"unknown sft_format {sft_format!r}; DeepSeek-VL2 uses 'deepseek'")
        self.candidate_resolutions = [tuple(resolution) for resolution in candidate_resolutions]
        self.image_size = tile_size_for(self.candidate_resolutions)
        self.patch_size = patch_size
        self.downsample_ratio = downsample_ratio
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.normalize = normalize
        self.image_token = image_token
        self.pad_token = pad_token
        self.add_special_token = add_special_token
        self.sft_format = sft_format
        self.mask_prompt = mask_prompt
        self.ignore_id = ignore_id

        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": pad_token})
        new_tokens = [image_token, *GROUNDING_TOKENS, *ROLE_TOKENS]
        tokenizer.add_special_tokens({"extra_special_tokens": new_tokens}, replace_extra_special_tokens=False)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        logger.debug("special token ids: %s", dict(zip(new_tokens, tokenizer.convert_tokens_to_ids(new_tokens))))
        super().__init__(tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> DeepseekVLV2Processor:
        """Load processor_config.json and the tokenizer files from a folder or a hub id.

        Keyword arguments naming a processor setting override the file; the others (``revision``,
        ``cache_dir``, ``token``, ``local_files_only``, ...) go to the download. The tokenizer is
        read from tokenizer.json as it is: the published tokenizer_config.json names
        ``LlamaTokenizerFast``, which is not what these byte-level BPE tokenizers are.
        """
        check_checkpoint_location(pretrained_model_name_or_path, PROCESSOR_NAME, kwargs.get("subfolder") or "")
        settings = set(inspect.signature(cls.__init__).parameters) - {"self", "tokenizer"}
        overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in settings}
        with open(cached_file(pretrained_model_name_or_path, PROCESSOR_NAME, **kwargs), encoding="utf-8") as file:
            saved = {name: value for name, value in json.load(file).items() if name in settings}
        tokenizer = PreTrainedTokenizerFast.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(tokenizer, **{**saved, **overrides})

    def num_image_tokens_for(self, num_width_tiles: int, num_height_tiles: int) -> int:
        """How many image tokens stand for one image tiled ``num_width_tiles`` x ``num_height_tiles``."""
        return num_image_tokens(
            (num_width_tiles, num_height_tiles),
            tile_size=self.image_size,
            patch_size=self.patch_size,
            downsample_ratio=self.downsample_ratio,
        )

    def tile_grid(self, image_size: tuple[int, int], cropping: bool = True) -> tuple[int, int]:
        """The local views' tile grid (width, height) for an image of ``image_size`` (width, height).

        Without ``cropping`` the local view is a single 384x384 tile.
        """
        return tile_grid(image_size, self.candidate_resolutions, cropping)

    def tile_image(self, image: Image.Image, cropping: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
        """The global view and the local tiles (row by row) of one image, and the tile grid (width, height).

        Without ``cropping`` the local view is a single 384x384 tile.
        """
        size = self.image_size
        grid_width, grid_height = self.tile_grid(image.size, cropping)
        fill = tuple(int(mean * 255) for mean in self.image_mean)
        global_view = self._to_tensor(pad_to_view(image, (size, size), fill))
        local_view = self._to_tensor(pad_to_view(image, (grid_width * size, grid_height * size), fill))
        local_tiles = (
            local_view.reshape(3, grid_height, size, grid_width, size)
            .permute(1, 3, 0, 2, 4)
            .reshape(grid_height * grid_width, 3, size, size)
        )
        return torch.cat([global_view[None], local_tiles]), (grid_width, grid_height)

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        """(3, H, W) float32 in [0, 1], then normalised with image_mean / image_std."""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        if not self.normalize:
            return pixels
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        return (pixels - mean) / std

    @staticmethod
    def _decoded_rgb(image: Image.Image, index: int) -> Image.Image:
        """``image`` decoded, as 8-bit RGB (16-bit data stretched, not clipped); ValueError if unreadable."""
        try:
            image.load()
            return to_rgb(image)
        except (OSError, ValueError) as error:  # truncated or corrupt data, a closed file
            raise ValueError(f"image {index} could not be decoded ({error})") from error

    def _encode(self, text: str) -> list[int]:
        """Token ids of ``text`` alone (no BOS/EOS)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def process_one(
        self,
        conversations: Sequence[Mapping],
        images: Sequence[Image.Image] | None = None,
        inference_mode: bool = True,
        system_prompt: str = "",
    ) -> ProcessedConversation:
        """Tokenize one conversation and tile its images (see ``__call__``)."""
        conversation = Conversation.from_messages(conversations, system_prompt)
        images = self._check_images(conversation, images)
        images = [self._decoded_rgb(image, index) for index, image in enumerate(images)]
        cropping = tiling_enabled(len(images))
        if not cropping:
            logger.info(
                "%d images in one conversation: each is seen as a global view and one %dx%d tile, "
                "without tiling (as the model was trained)",
                len(images), self.image_size, self.image_size,
            )  # fmt: skip
        tiled = [self.tile_image(image, cropping) for image in images]
        grids = [grid for _, grid in tiled]
        input_ids, image_mask, prompt_mask = self._token_layout(conversation, grids)

        input_ids = torch.tensor(input_ids, dtype=torch.long)
        image_mask = torch.tensor(image_mask, dtype=torch.bool)
        labels = input_ids.clone()
        labels[image_mask] = self.ignore_id
        if self.mask_prompt:
            labels[torch.tensor(prompt_mask)] = self.ignore_id
        if inference_mode:  # drop the EOS of the last (assistant) turn: the model answers from there
            input_ids, labels, image_mask = input_ids[:-1], labels[:-1], image_mask[:-1]

        if tiled:
            pixels = torch.cat([tiles for tiles, _ in tiled])
            spatial_crop = torch.tensor(grids, dtype=torch.long)
        else:
            pixels = torch.zeros(1, 3, self.image_size, self.image_size)
            spatial_crop = torch.zeros(1, 2, dtype=torch.long)
        return ProcessedConversation(
            sft_format=conversation.get_prompt(),
            input_ids=input_ids,
            labels=labels,
            images=pixels,
            images_seq_mask=image_mask,
            images_spatial_crop=spatial_crop,
            num_image_tokens=[self.num_image_tokens_for(*grid) for grid in grids],
        )

    def count_tokens(
        self,
        conversations: Sequence[Mapping],
        images: Sequence[Image.Image] | None = None,
        inference_mode: bool = True,
        system_prompt: str = "",
    ) -> int:
        """How many tokens ``process_one`` would give, read from the images' sizes alone.

        Much cheaper than processing: no image is resized or normalised, so fitting a long chat into
        the context can try many candidate histories. Same arguments and errors as ``process_one``.
        """
        conversation = Conversation.from_messages(conversations, system_prompt)
        images = self._check_images(conversation, images)
        grids = tile_grids([image.size for image in images], self.candidate_resolutions)
        input_ids, _, _ = self._token_layout(conversation, grids)
        return len(input_ids) - 1 if inference_mode else len(input_ids)

    def _token_layout(
        self, conversation: Conversation, grids: Sequence[tuple[int, int]]
    ) -> tuple[list[int], list[bool], list[bool]]:
        """Token ids, image mask and prompt mask of a whole conversation (final EOS included).

        ``grids`` holds each image's tile grid, in placeholder order; an image takes
        ``num_image_tokens_for(*grid)`` tokens.
        """
        input_ids, image_mask, prompt_mask = [self.tokenizer.bos_token_id], [False], [False]
        remaining_grids = iter(grids)
        for index, (role, text) in enumerate(conversation.turns):
            if role == ASSISTANT:
                ids = self._encode(text) + [self.tokenizer.eos_token_id]
                input_ids += ids
                image_mask += [False] * len(ids)
                prompt_mask += [False] * len(ids)
                continue
            prompt = (conversation.system_block if index == 0 else "") + format_user_turn(text)
            start = len(input_ids)
            for position, piece in enumerate(prompt.split(self.image_token)):
                if position > 0:
                    count = self.num_image_tokens_for(*next(remaining_grids))
                    input_ids += [self.image_token_id] * count
                    image_mask += [True] * count
                ids = self._encode(piece)
                input_ids += ids
                image_mask += [False] * len(ids)
            prompt_mask += [True] * (len(input_ids) - start)
        return input_ids, image_mask, prompt_mask

    def _check_images(self, conversation: Conversation, images: Sequence[Image.Image] | None) -> list[Image.Image]:
        """The images as a list, after checking that they match the conversation's placeholders."""
        if self.image_token in conversation.system:
            raise ValueError(f"the system text contains {self.image_token}; images belong in user turns")
        placeholders = 0
        for index, (role, text) in enumerate(conversation.turns):
            if role == ASSISTANT and self.image_token in text:
                raise ValueError(f"assistant turn {index} contains {self.image_token}; images belong in user turns")
            placeholders += text.count(self.image_token)
        if images is None:
            images = []
        if isinstance(images, Image.Image) or not isinstance(images, Sequence):
            raise TypeError(f"images must be a list of PIL images, got {type(images).__name__}")
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(
                    f"image {index} is a {type(image).__name__}, not a PIL image; "
                    "load files with deepseek_vl2.utils.io.load_pil_images"
                )
            if 0 in image.size:
                raise ValueError(f"image {index} is {image.width}x{image.height}: it has no pixels")
        if placeholders != len(images):
            raise ValueError(
                f"the conversation has {placeholders} {self.image_token} placeholder(s) "
                f"but {len(images)} image(s) were given"
            )
        return list(images)

    def __call__(
        self,
        *,
        conversations: Sequence[Mapping],
        images: Sequence[Image.Image] | None = None,
        force_batchify: bool = True,
        inference_mode: bool = True,
        system_prompt: str = "",
    ) -> BatchedInputs | ProcessedConversation:
        """Process one conversation.

        Args:
            conversations: messages ``{"role": ..., "content": ...}``; roles ``<|User|>``/``user``,
                ``<|Assistant|>``/``assistant`` and ``system`` (first only). Each ``<image>`` in a
                user turn takes the next image. It may end with a user turn or with an empty
                assistant turn (the same tokens).
            images: PIL images in placeholder order; ``None`` or ``[]`` for text only. With more
                than two images no image is tiled (global view plus one tile each), as in training.
            force_batchify: return a batch of one (:class:`BatchedInputs`) instead of a
                :class:`ProcessedConversation`.
            inference_mode: drop the final EOS so the model continues the last assistant turn.
            system_prompt: system text, placed before the first user turn followed by a blank line
                (the chat template's form). A ``system`` message instead is placed with no blank
                line, exactly as the original processor tokenizes it.
        """
        sample = self.process_one(conversations, images, inference_mode, system_prompt)
        return self.batchify([sample]) if force_batchify else sample

    def batchify(
        self, samples: Sequence[ProcessedConversation | BatchedInputs], padding: Literal["left", "right"] = "left"
    ) -> BatchedInputs:
        """Pad processed conversations into one batch (left padding for generation).

        Batches among ``samples`` (such as ``processor(...)`` outputs) contribute their rows.
        """
        samples = [row for item in samples for row in (item.unbatch() if isinstance(item, BatchedInputs) else [item])]
        if not samples:
            raise ValueError("batchify needs at least one processed conversation")
        if padding not in ("left", "right"):
            raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
        batch_size = len(samples)
        seq_len = max(len(sample.input_ids) for sample in samples)
        input_ids = torch.full((batch_size, seq_len), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, seq_len), self.ignore_id, dtype=torch.long)
        attention_mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
        images_seq_mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
        max_tiles = max(sample.images.shape[0] for sample in samples)
        images = samples[0].images.new_zeros(batch_size, max_tiles, *samples[0].images.shape[1:])
        max_images = max(sample.images_spatial_crop.shape[0] for sample in samples)
        spatial_crop = torch.zeros(batch_size, max_images, 2, dtype=torch.long)

        for row, sample in enumerate(samples):
            length = len(sample.input_ids)
            span = slice(seq_len - length, seq_len) if padding == "left" else slice(0, length)
            input_ids[row, span] = sample.input_ids
            labels[row, span] = sample.labels
            attention_mask[row, span] = 1
            images_seq_mask[row, span] = sample.images_seq_mask
            images[row, : sample.images.shape[0]] = sample.images
            spatial_crop[row, : sample.images_spatial_crop.shape[0]] = sample.images_spatial_crop

        return BatchedInputs(
            sft_format=[sample.sft_format for sample in samples],
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            images=images,
            images_seq_mask=images_seq_mask,
            images_spatial_crop=spatial_crop,
            num_image_tokens=[sample.num_image_tokens for sample in samples],
            seq_lens=[len(sample.input_ids) for sample in samples],
        )
