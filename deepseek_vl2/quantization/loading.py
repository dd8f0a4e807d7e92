"""``from_pretrained``'s quantization arguments, checked before anything loads."""

from __future__ import annotations

from transformers.utils.quantization_config import QuantizationConfigMixin

from .config import QUANT_METHOD, SHORT_FORMS, DeepseekVL2QuantizationConfig

SUPPORTED = (
    f"quantization={' or '.join(map(repr, SHORT_FORMS))} or quantization_config=DeepseekVL2QuantizationConfig(...)"
)


def requested_config(quantization: str | None, quantization_config) -> DeepseekVL2QuantizationConfig | None:
    """The config asked for by the short form or the config object (at most one of them), or None.

    Other transformers configs (bitsandbytes, torchao, ...) are refused: their quantizers replace
    ``nn.Linear`` layers only, which would leave the stacked routed experts, most of the weights, unquantized.
    """
    if quantization is not None and quantization_config is not None:
        raise ValueError("pass quantization or quantization_config, not both")
    if quantization is not None:
        return DeepseekVL2QuantizationConfig.from_short_form(quantization)
    if isinstance(quantization_config, dict):
        if quantization_config.get("quant_method") != QUANT_METHOD:
            raise ValueError(f"unsupported quantization_config {quantization_config!r}: use {SUPPORTED}")
        return DeepseekVL2QuantizationConfig.from_dict(quantization_config)
    if quantization_config is None or isinstance(quantization_config, DeepseekVL2QuantizationConfig):
        return quantization_config
    if isinstance(quantization_config, QuantizationConfigMixin):  # a config of the wrong method: a bad value
        raise ValueError(  # noqa: TRY004
            f"{type(quantization_config).__name__} is not supported for DeepSeek-VL2: it would leave the routed "
            f"experts in full precision; use {SUPPORTED}"
        )
    raise TypeError(
        f"quantization_config must be a DeepseekVL2QuantizationConfig, got {type(quantization_config).__name__}"
    )


def stored_config(checkpoint_config: dict) -> DeepseekVL2QuantizationConfig | None:
    """The quantization a checkpoint's config.json records, or None for a float checkpoint."""
    stored = checkpoint_config.get("quantization_config")
    if stored is None:
        return None
    if stored.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"the checkpoint is quantized with {stored.get('quant_method')!r}, which is not supported")
    return DeepseekVL2QuantizationConfig.from_dict(stored)


def check_against_stored(requested, stored) -> None:
    """ValueError when a quantized checkpoint is asked to load with other quantization settings."""
    if requested is not None and stored is not None and requested.settings() != stored.settings():
        raise ValueError(
            f"the checkpoint is already quantized with {stored.settings()}, not {requested.settings()}: "
            "quantize the float checkpoint instead, or load this one without quantization arguments"
        )
