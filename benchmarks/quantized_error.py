"""Error of int8 / int4 weights against bf16 over the README's prompts, on one random-weight model.

The model has a variant's real dimensions and random weights (``bench.build_model``; not the real
weights, so the figures say how far quantization moves this network, not how it changes real answers).
For each prompt bf16 answers greedily; each quantized copy is then given the prompt and bf16's answer
(teacher forcing) and its logits at the answer's positions are compared with bf16's: relative RMS, and
the share of positions where both put the same token first. Each copy also answers greedily on its
own: how many of its first tokens equal bf16's before the first difference.

    python benchmarks/quantized_error.py --new_tokens 32
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from bench import build_model, build_processor, chat, cpu_name, image_inputs
from PIL import Image

from deepseek_vl2.quantization import DeepseekVL2QuantizationConfig
from deepseek_vl2.quantization.selection import quantize_in_place

IMAGES = Path(__file__).resolve().parents[1] / "images"
# The prompts of README.md's examples: (text, images shown before it).
PROMPTS = (
    ("Describe the image.", ("street.png",)),
    ("<|ref|>The red car<|/ref|>.", ("street.png",)),
    ("What do these three pictures have in common?", ("shapes.png", "shelf.png", "street.png")),
    ("<|ref|>the blue mug<|/ref|>.", ("shapes.png",)),
    ("Hello!", ()),
)
SETTINGS = {
    "int8": DeepseekVL2QuantizationConfig(bits=8),
    "int4": DeepseekVL2QuantizationConfig(bits=4),
    "int8 + vision": DeepseekVL2QuantizationConfig(bits=8, quantize_vision=True),
    "int4 + vision": DeepseekVL2QuantizationConfig(bits=4, quantize_vision=True),
}


def prompt_inputs(processor, text: str, images: tuple[str, ...]):
    pictures = [Image.open(IMAGES / name).convert("RGB") for name in images]
    return processor(conversations=chat(text, len(images)), images=pictures, force_batchify=True, system_prompt="")


@torch.inference_mode()
def greedy_answer(model, inputs, new_tokens: int, pad_token_id: int) -> torch.Tensor:
    """The ``new_tokens`` token ids ``model`` answers greedily (no stop at the end-of-sentence token)."""
    output = model.generate(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, **image_inputs(inputs),
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
        pad_token_id=pad_token_id,
    )  # fmt: skip
    return output[:, -new_tokens:]


@torch.inference_mode()
def answer_logits(model, inputs, answer: torch.Tensor) -> torch.Tensor:
    """float32 logits [T, vocab] that predict each token of ``answer`` after the prompt (teacher forcing)."""
    ids = torch.cat([inputs.input_ids, answer[:, :-1]], dim=1)
    extra = image_inputs(inputs)
    if extra:
        pad = torch.zeros_like(answer[:, :-1], dtype=torch.bool)
        extra["images_seq_mask"] = torch.cat([extra["images_seq_mask"], pad], dim=1)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=answer.shape[1], **extra).logits
    return logits[0].float()


def compare(expected: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(relative RMS of ``got`` against ``expected``, share of positions with the same top token)."""
    relative_rms = ((got - expected).pow(2).mean() / expected.pow(2).mean()).sqrt().item()
    return relative_rms, (got.argmax(-1) == expected.argmax(-1)).float().mean().item()


def agreeing_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    differ = (a != b).flatten().nonzero()
    return int(differ[0]) if len(differ) else a.numel()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the variant's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=tuple(SETTINGS))
    parser.add_argument(
        "--output", type=Path, default=None, help="JSON file (default: results-<variant>-cpu-quantized-error.json)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = build_model(args.variant, args.layers, torch.bfloat16, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as folder:
        processor = build_processor(args.variant, folder)
    pad = processor.tokenizer.pad_token_id
    prompts = [prompt_inputs(processor, text, images) for text, images in PROMPTS]
    answers = [greedy_answer(model, inputs, args.new_tokens, pad) for inputs in prompts]
    references = [answer_logits(model, inputs, answer) for inputs, answer in zip(prompts, answers)]

    rows = []
    for name in args.settings:
        quantized = copy.deepcopy(model)
        quantize_in_place(quantized, SETTINGS[name])
        for (text, images), inputs, answer, expected in zip(PROMPTS, prompts, answers, references):
            error, same_top = compare(expected, answer_logits(quantized, inputs, answer))
            own = greedy_answer(quantized, inputs, args.new_tokens, pad)
            rows.append({"setting": name, "prompt": text, "images": len(images), "relative_rms": error,
                         "same_top_token": same_top, "agreeing_tokens": agreeing_prefix(own, answer)})  # fmt: skip
            print(f"{name:14s} {text[:44]:44s} relative RMS {error:.4f}  same top token {same_top:4.0%}  "
                  f"greedy agrees for {rows[-1]['agreeing_tokens']:2d} of {args.new_tokens}", flush=True)  # fmt: skip
        del quantized

    layers = model.config.language_config.num_hidden_layers
    print(f"\n{cpu_name()}, {args.variant} dims, {layers} decoder layers, random weights, {args.new_tokens} tokens")
    summary = {}
    for name in args.settings:
        mine = [row for row in rows if row["setting"] == name]
        summary[name] = {key: sum(row[key] for row in mine) / len(mine)
                         for key in ("relative_rms", "same_top_token", "agreeing_tokens")}  # fmt: skip
        print(f"{name:14s} mean over {len(mine)} prompts: relative RMS {summary[name]['relative_rms']:.4f}, "
              f"same top token {summary[name]['same_top_token']:.0%}, "
              f"greedy agrees for {summary[name]['agreeing_tokens']:.1f} tokens")  # fmt: skip
    report = {"cpu": cpu_name(), "variant": args.variant, "decoder_layers": layers, "new_tokens": args.new_tokens,
              "rows": rows, "summary": summary}  # fmt: skip
    output = args.output or Path(__file__).parent / f"results-{args.variant}-cpu-quantized-error.json"
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {output}")
    return report


if __name__ == "__main__":
    main()
