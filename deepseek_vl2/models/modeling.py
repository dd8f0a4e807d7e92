"""The DeepSeek-VL2 vision-language model: vision tower + projector + DeepSeekMoE decoder.

Images become runs of embeddings inside the prompt. Each image is a global 384-px view plus a grid of
384-px local tiles; after the projector every tile is an h x w grid of vectors. The run for one image is
the global grid with a learned newline after each row, the learned view separator, then the local
tiles stitched into one (th*h) x (tw*w) grid, again with a newline after each row (global view last
when ``global_view_pos == "tail"``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import CONFIG_NAME
from transformers.utils.deprecation import deprecate_kwarg

from ..quantization.loading import check_against_stored, requested_config, stored_config
from ..utils.checkpoint import check_checkpoint_location, own_mapped_weights
from ..utils.checks import check_chunk_size
from .cache import DeepseekV2Cache, DeepseekV2GenerationMixin
from .configuration import DeepseekVLV2Config
from .language import DeepseekV2ForCausalLM
from .packed import pack_weights
from .projector import MlpProjector
from .tiling import num_tiles
from .vision import VisionTransformer

IMAGE_INPUTS = ("images", "images_seq_mask", "images_spatial_crop")
# from_pretrained's arguments that say which config.json to read (checked for quantization before loading)
HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
# Processor outputs that are not model inputs: generate(**inputs) leaves them out.
PROCESSOR_ONLY = ("sft_format", "labels", "num_image_tokens", "seq_lens")


class DeepseekVLV2PreTrainedModel(PreTrainedModel):
    config_class = DeepseekVLV2Config
    config: DeepseekVLV2Config
    base_model_prefix = "deepseek_vl_v2"
    main_input_name = "input_ids"
    # The whole vision tower stays on one device: it comes first in the model, so device_map="auto" puts it
    # with the projector, image_newline/view_seperator and the token embeddings.
    _no_split_modules = ["VisionTransformer", "DeepseekV2DecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, quantization: str | None = None, **kwargs):
        """transformers' loader, with errors that name the problem (a missing folder, wrong-shaped tensors),
        and weights in the process's own memory rather than views of the checkpoint files, the decoder's
        packed for oneDNN where its bf16 products run there (``models.packed``).

        ``quantization="int8"`` or ``"int4"`` (or ``quantization_config=DeepseekVL2QuantizationConfig(...)``)
        quantizes the weights while loading; a checkpoint saved quantized loads quantized by itself.
        """
        check_checkpoint_location(pretrained_model_name_or_path, CONFIG_NAME, kwargs.get("subfolder") or "")
        requested = requested_config(quantization, kwargs.pop("quantization_config", None))
        if requested is not None:
            hub = {name: kwargs[name] for name in HUB_KWARGS if kwargs.get(name) is not None}
            config_dict, _ = cls.config_class.get_config_dict(pretrained_model_name_or_path, **hub)
            stored = stored_config(config_dict)
            check_against_stored(requested, stored)
            if stored is None:
                kwargs["quantization_config"] = requested
        if kwargs.get("ignore_mismatched_sizes"):
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            own_mapped_weights(model[0] if isinstance(model, tuple) else model)
            pack_weights(model[0] if isinstance(model, tuple) else model)
            return model
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *args, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
        )
        if info["mismatched_keys"]:
            wrong = "; ".join(
                f"{name}: checkpoint {tuple(found)}, model {tuple(expected)}"
                for name, found, expected in sorted(info["mismatched_keys"])
            )
            raise ValueError(f"checkpoint {pretrained_model_name_or_path} has tensors of the wrong shape: {wrong}")
        own_mapped_weights(model)
        pack_weights(model)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' saver; a quantized model keeps its experts stacked, as it holds them.

        Splitting them into the published one-tensor-per-expert layout would split int4's packed tiles
        and grouped scales along the wrong axes; a quantized folder is read by this library only.
        """
        if getattr(self, "is_quantized", False):
            kwargs["save_original_format"] = False
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """Random init for built test checkpoints; the decoder (a sub-model) initialises itself."""
        if isinstance(module, DeepseekVLV2ForCausalLM):
            std = module.config.projector_config.n_embed**-0.5
            init.normal_(module.image_newline, std=std)
            init.normal_(module.view_seperator, std=std)
        elif isinstance(module, VisionTransformer):
            init.normal_(module.pos_embed, std=module.pos_embed.shape[1] ** -0.5)
            if hasattr(module, "attn_pool"):
                init.normal_(module.attn_pool.latent, std=module.config.width**-0.5)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class DeepseekVLV2ForCausalLM(DeepseekVLV2PreTrainedModel, DeepseekV2GenerationMixin):
    """Vision tower, projector and decoder; generates text through transformers' ``generate``."""

    def __init__(self, config: DeepseekVLV2Config):
        super().__init__(config)
        self.vision = VisionTransformer(config.vision_config)
        self.projector = MlpProjector(config.projector_config)
        width = config.projector_config.n_embed
        self.image_newline = nn.Parameter(torch.zeros(width))
        self.view_seperator = nn.Parameter(torch.zeros(width))  # sic: the published name
        self.language = DeepseekV2ForCausalLM(config.language_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language.get_output_embeddings()

    # ------------------------------------------------------------------ images -> embeddings

    def _image_run(self, tile_features: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
        """Lay out one image's projected tile features ([tiles, h*w, D]) as its run of token embeddings."""
        width_tiles, height_tiles = crop
        _, hw, dim = tile_features.shape
        side = int(hw**0.5)
        global_view = self._with_newlines(tile_features[0].view(side, side, dim))
        local = tile_features[1 : 1 + width_tiles * height_tiles]
        local = local.view(height_tiles, width_tiles, side, side, dim).permute(0, 2, 1, 3, 4)
        local_view = self._with_newlines(local.reshape(height_tiles * side, width_tiles * side, dim))
        separator = self.view_seperator[None].to(tile_features)
        if self.config.global_view_pos == "head":
            return torch.cat([global_view, separator, local_view])
        return torch.cat([local_view, separator, global_view])

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        rows = grid.shape[0]
        newline = self.image_newline.to(grid).expand(rows, 1, -1)
        return torch.cat([grid, newline], dim=1).flatten(0, 1)

    @staticmethod
    def _image_crops(images_spatial_crop: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per batch row, the (width_tiles, height_tiles) of each real image (zero rows are padding)."""
        crops = []
        for row in images_spatial_crop.tolist():
            crops.append([(w, h) for w, h in row if w > 0 and h > 0])
        return crops

    @staticmethod
    def _check_image_inputs(input_ids, images, images_seq_mask, images_spatial_crop) -> None:
        """ValueError naming the problem when the inputs are not one batch as ``batchify`` makes it.

        Leaving out some of the image inputs while the others show images would drop the images silently.
        """
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}: "
                "use processor(..., force_batchify=True) or processor.batchify"
            )
        given = {"images": images, "images_seq_mask": images_seq_mask, "images_spatial_crop": images_spatial_crop}
        missing = [name for name, value in given.items() if value is None]
        if len(missing) == 3:
            return
        if missing:
            if any(bool(value.any()) for value in given.values() if value is not None):
                raise ValueError(f"image inputs given without {', '.join(missing)}: pass all three or none")
            return
        batch, length = input_ids.shape
        if tuple(images_seq_mask.shape) != (batch, length):
            raise ValueError(
                f"images_seq_mask has shape {tuple(images_seq_mask.shape)} but input_ids {(batch, length)}: "
                "they must come from the same batch"
            )
        if images.dim() != 5 or images.shape[0] != batch:
            raise ValueError(f"images must be (batch={batch}, tiles, 3, H, W), got shape {tuple(images.shape)}")
        if images_spatial_crop.dim() != 3 or images_spatial_crop.shape[0] != batch or images_spatial_crop.shape[2] != 2:
            raise ValueError(
                f"images_spatial_crop must be (batch={batch}, images, 2), got shape {tuple(images_spatial_crop.shape)}"
            )

    def prepare_inputs_embeds(
        self,
        input_ids: torch.LongTensor,
        images: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
        **unused,
    ) -> torch.Tensor:
        """Token embeddings with every image-token position replaced by its image features.

        input_ids [b, T]; images [b, max_tiles, 3, 384, 384]; images_seq_mask [b, T] (bool);
        images_spatial_crop [b, max_images, 2] as (width_tiles, height_tiles), zeros for padding.
        """
        self._check_image_inputs(input_ids, images, images_seq_mask, images_spatial_crop)
        if images is None or images_spatial_crop is None or images_seq_mask is None:
            return self.get_input_embeddings()(input_ids)
        return self.place_image_runs(input_ids, images_seq_mask, self.encode_images(images, images_spatial_crop))

    def encode_images(self, images: torch.Tensor, images_spatial_crop: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per batch row, each image's run of embeddings ([tokens, D]), all tiles through the vision tower at once.

        Apart from the prompt, so that a caller can keep an image's run and place it again in a later prompt.
        """
        crops = self._image_crops(images_spatial_crop)
        tiles_per_row = [sum(map(num_tiles, row)) for row in crops]
        if sum(tiles_per_row) == 0:
            return [[] for _ in crops]
        if any(n > images.shape[1] for n in tiles_per_row):
            raise ValueError(
                f"images_spatial_crop asks for {max(tiles_per_row)} tiles in a row but images holds {images.shape[1]}"
            )
        tiles = torch.cat([images[row, :n] for row, n in enumerate(tiles_per_row)])
        tiles = tiles.to(device=self.vision.pos_embed.device, dtype=self.vision.pos_embed.dtype)
        tile_features = self.projector(self.vision(tiles))
        runs, start = [], 0
        for row in crops:
            row_runs = []
            for crop in row:
                row_runs.append(self._image_run(tile_features[start : start + num_tiles(crop)], crop))
                start += num_tiles(crop)
            runs.append(row_runs)
        return runs

    def place_image_runs(
        self, input_ids: torch.LongTensor, images_seq_mask: torch.Tensor, runs: list[list[torch.Tensor]]
    ) -> torch.Tensor:
        """Token embeddings with the image-token positions of each row filled by that row's image runs, in order."""
        embeddings = self.get_input_embeddings()(input_ids)
        pieces = [run for row in runs for run in row]
        if not pieces:
            return embeddings
        features = torch.cat(pieces).to(embeddings)
        mask = images_seq_mask.to(device=embeddings.device, dtype=torch.bool)
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(
                f"the prompt has {int(mask.sum())} image-token positions but the images give {features.shape[0]} "
                "embeddings: input_ids, images_seq_mask and images_spatial_crop do not belong together"
            )
        return embeddings.masked_scatter(mask.unsqueeze(-1), features)

    # ------------------------------------------------------------------ forward and generation

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache", raise_if_both_names=True)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids or inputs_embeds")
            inputs_embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        return self.language(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def generate(self, *args, **kwargs):
        """transformers' ``generate``; also takes a whole processor output, ``generate(**inputs, ...)``."""
        for name in PROCESSOR_ONLY:
            kwargs.pop(name, None)
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        """Images are encoded once, in the first step; later steps only see the new token."""
        if not is_first_iteration:
            for name in IMAGE_INPUTS:
                kwargs.pop(name, None)
        return super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )

    @torch.no_grad()
    def incremental_prefilling(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
        chunk_size: int = 1024,
        cache: DeepseekV2Cache | None = None,
        **unused,
    ) -> tuple[torch.Tensor, DeepseekV2Cache]:
        """Prefill all but the last prompt token in chunks of ``chunk_size`` tokens to bound peak memory.

        Returns ``(inputs_embeds, cache)``; pass both (with ``input_ids`` and ``attention_mask``) to
        ``generate``, which runs the last token and continues. The cache stays on the model's device.
        Other processor outputs (``sft_format``, ``labels`` ...) are accepted and ignored, so
        ``incremental_prefilling(**inputs, chunk_size=512)`` works. A ``cache`` that already holds the
        prompt's first positions (a kept prefix of an earlier prompt) is continued from where it ends:
        the chunks then start there.
        """
        check_chunk_size(chunk_size)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("incremental_prefilling needs input_ids or inputs_embeds")
            inputs_embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        batch, length, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
        attention_mask = attention_mask.to(inputs_embeds.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if cache is None:
            cache = DeepseekV2Cache(config=self.config.language_config)
        cached = cache.get_seq_length()
        if cached >= length:
            raise ValueError(
                f"the cache holds {cached} positions, the prompt only {length}: nothing is left to prefill"
            )
        decoder = self.language.model
        for start in range(cached, length - 1, chunk_size):
            end = min(start + chunk_size, length - 1)
            decoder(
                inputs_embeds=inputs_embeds[:, start:end],
                attention_mask=attention_mask[:, :end],
                position_ids=position_ids[:, start:end],
                cache=cache,
                use_cache=True,
            )
        return inputs_embeds, cache


__all__ = ["DeepseekVLV2PreTrainedModel", "DeepseekVLV2ForCausalLM"]
