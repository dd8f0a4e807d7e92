"""``deepseek-vl2 quantize``: quantize a checkpoint once and save it, to load it quantized later."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..options import add_dtype_option, add_model_option
from ..quantization.config import BITS, INT4_GROUP_SIZES


def add_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a checkpoint's weights to int8 or int4 and save them",
        description="Quantize a DeepSeek-VL2 checkpoint while loading it (one tensor group at a time) and save "
        "the quantized model with its processor; load the folder like any checkpoint.",
    )
    add_model_option(parser, required=True)
    parser.add_argument("--bits", type=int, choices=BITS, required=True)
    parser.add_argument("--group_size", type=int, choices=INT4_GROUP_SIZES, help="int4 only (default 64)")
    parser.add_argument("--quantize_vision", action="store_true", help="also quantize the vision tower's linears")
    add_dtype_option(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the quantized checkpoint to")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
    from ..quantization import DeepseekVL2QuantizationConfig
    from ..utils.checks import pick_dtype

    config = DeepseekVL2QuantizationConfig(args.bits, args.group_size, args.quantize_vision)
    dtype = pick_dtype(args.dtype)
    processor = DeepseekVLV2Processor.from_pretrained(args.model_path)
    model = DeepseekVLV2ForCausalLM.from_pretrained(args.model_path, dtype=dtype, quantization_config=config)
    out = Path(args.out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"saved the int{args.bits} model to {out}")
    return 0
