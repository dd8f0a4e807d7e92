"""The settings of weight-only quantization, as a transformers quantization config.

Registered with transformers under :data:`QUANT_METHOD`, so that ``save_pretrained`` writes them into
config.json's ``quantization_config`` and ``from_pretrained`` on that folder finds them again.
"""

from __future__ import annotations

from transformers.quantizers.auto import register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

from .packing import UNRECORDED_INT4_LAYOUT, Int4Layout, machine_int4_layout

QUANT_METHOD = "deepseek_vl2_weight_only"
BITS = (8, 4)
# Group sizes the CPU int4 kernel takes (``_weight_int4pack_mm_for_cpu``).
INT4_GROUP_SIZES = (32, 64, 128, 256)
# 64: the largest the kernel takes that divides the input width of every published decoder layer (the dense
# MLPs' down projections read 6848 / 10944 / 12288 channels, which 128 does not divide for tiny and small);
# smaller groups would add a scale and a zero (4 bytes) per 32 weights, an eighth more bytes to read.
DEFAULT_INT4_GROUP_SIZE = 64
SHORT_FORMS = {"int8": 8, "int4": 4}


@register_quantization_config(QUANT_METHOD)
class DeepseekVL2QuantizationConfig(QuantizationConfigMixin):
    """Weight-only quantization of the decoder (and optionally the vision tower) of DeepSeek-VL2.

    ``bits=8``: int8 weights, one scale per output channel. ``bits=4``: int4 weights, one scale and one
    zero point per ``group_size`` input channels. ``quantize_vision`` also quantizes the vision tower's
    linear layers (kept in the model dtype by default: they are a small share of the bytes and run once
    per image, not once per token).

    ``int4_layout`` is not a setting but a fact about stored int4 tensors (see ``packing.Int4Layout``): the
    layout a saved checkpoint's bytes are in; None for this machine's, which quantizing and loading give.
    """

    def __init__(
        self,
        bits: int = 8,
        group_size: int | None = None,
        quantize_vision: bool = False,
        int4_layout: str | None = None,
    ):
        self.quant_method = QUANT_METHOD
        self.bits, self.group_size, self.quantize_vision = bits, group_size, quantize_vision
        self.int4_layout = None if int4_layout is None else Int4Layout.named(int4_layout)
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        if self.bits == 8 and self.group_size is not None:
            raise ValueError("int8 has one scale per output channel: group_size is for bits=4 only")
        if self.bits == 4:
            self.group_size = DEFAULT_INT4_GROUP_SIZE if self.group_size is None else self.group_size
            if self.group_size not in INT4_GROUP_SIZES:
                raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES} for int4, got {self.group_size!r}")
        if not isinstance(self.quantize_vision, bool):
            raise TypeError(f"quantize_vision must be True or False, got {self.quantize_vision!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"

    @classmethod
    def from_short_form(cls, name: str, quantize_vision: bool = False) -> DeepseekVL2QuantizationConfig:
        """The config for ``"int8"`` or ``"int4"`` (default group size)."""
        if name not in SHORT_FORMS:
            raise ValueError(f"quantization must be one of {', '.join(SHORT_FORMS)}, got {name!r}")
        return cls(bits=SHORT_FORMS[name], quantize_vision=quantize_vision)

    def settings(self) -> dict:
        """What decides the stored weights: two configs with the same settings load the same tensors."""
        return {"bits": self.bits, "group_size": self.group_size, "quantize_vision": self.quantize_vision}

    def to_dict(self) -> dict:
        if self.bits != 4:
            return {"quant_method": QUANT_METHOD, **self.settings()}
        return {"quant_method": QUANT_METHOD, **self.settings(), "int4_layout": self.stored_int4_layout().name}

    def stored_int4_layout(self) -> Int4Layout:
        return self.int4_layout or machine_int4_layout()

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        settings = {key: value for key, value in {**config_dict, **kwargs}.items() if key != "quant_method"}
        if settings.get("bits") == 4 and "int4_layout" not in settings:  # saved before layouts were recorded
            settings["int4_layout"] = UNRECORDED_INT4_LAYOUT.name
        config = cls(**settings)
        return (config, {}) if return_unused_kwargs else config
