"""Random-weight checkpoints at a variant's real dimensions, in the published on-disk layout.

The tensors are the published names and shapes (``published_layout``), filled by ``bench``'s rule and
written one shard at a time, so that small's 32 GB and base's 55 GB never sit in memory. The folder also
gets the published config.json and a test tokenizer with the processor's settings; it is written under a
temporary name and renamed when complete, so an interrupted write is never mistaken for a checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from bench import build_processor, fill_random_tensor, random_pool
from safetensors.torch import save_file
from tqdm import tqdm

from deepseek_vl2.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM
from deepseek_vl2.planner import meta_model
from deepseek_vl2.quantization import DeepseekVL2QuantizationConfig
from deepseek_vl2.quantization.selection import check_shapes, quantization_targets, quantize_modules, quantize_target
from deepseek_vl2.testing.published import published_layout

SHARD_BYTES = 4 << 30
_LAYER = re.compile(r"^language\.model\.layers\.(\d+)\.")


def cache_folder(variant: str, layers: int | None, weights: str) -> Path:
    """Where the benchmarks keep the random-weight checkpoint of ``variant`` with ``weights`` ("bf16", "int8", ...)."""
    layers_part = f"-{layers}-layers" if layers else ""
    return Path.home() / ".cache" / "deepseek_vl2" / f"bench-{variant}{layers_part}-{weights}-random-weights"


def is_checkpoint(folder: Path) -> bool:
    return (folder / "model.safetensors.index.json").exists() or (folder / "model.safetensors").exists()


def published_tensors(variant: str, layers: int | None) -> tuple[dict, dict[str, list[int]]]:
    """(config.json, {name: shape}) of ``variant``, cut to its first ``layers`` decoder layers if given."""
    layout = published_layout(variant)
    config, tensors = layout["config"], layout["tensors"]
    if layers:
        config["language_config"]["num_hidden_layers"] = layers
        tensors = {n: s for n, s in tensors.items() if not (m := _LAYER.match(n)) or int(m.group(1)) < layers}
    return config, tensors


class ShardWriter:
    """Writes tensors into safetensors shards of about ``SHARD_BYTES`` as they come, then the index."""

    def __init__(self, folder: Path, total_bytes: int):
        self.folder, self.weight_map, self.pending, self.pending_bytes, self.written = folder, {}, {}, 0, 0
        self.progress = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="writing")

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.pending[name], self.pending_bytes = tensor, self.pending_bytes + tensor.nbytes
            if self.pending_bytes >= SHARD_BYTES:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        file = f"model-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        save_file(self.pending, self.folder / file, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self.pending, file))
        self.progress.update(self.pending_bytes)
        self.written += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        self.progress.close()
        index = {"metadata": {"total_size": self.written}, "weight_map": self.weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_folder(variant: str, folder: Path, write_weights) -> Path:
    """Run ``write_weights(partial folder)``, add the processor's files, and rename the folder into place."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_weights(partial)
    build_processor(variant, partial).to_json_file(partial / "processor_config.json")
    partial.rename(folder)
    return folder


def write_published_checkpoint(
    variant: str, layers: int | None, folder: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> Path:
    """Write the float checkpoint to ``folder`` unless one is there already; returns ``folder``."""
    if is_checkpoint(folder):
        return folder
    config, tensors = published_tensors(variant, layers)
    total = sum(torch.Size(shape).numel() for shape in tensors.values()) * dtype.itemsize
    print(f"writing a random-weight {variant} checkpoint ({total / 1e9:.1f} GB) to {folder} (once)", flush=True)

    def write_weights(partial: Path) -> None:
        generator, pool = random_pool(seed)
        writer = ShardWriter(partial, total)
        for name, shape in tensors.items():
            tensor = torch.empty(shape, dtype=dtype)
            fill_random_tensor(name, tensor, generator, pool)
            writer.add({name: tensor})
        writer.close()
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    return _write_folder(variant, folder, write_weights)


def _blocks(model: DeepseekVLV2ForCausalLM) -> list[str]:
    """Names of the parts that hold every parameter once: each decoder layer, then the rest."""
    layers = [f"language.model.layers.{index}" for index in range(len(model.language.model.layers))]
    return [*layers, "vision", "projector", "language.model.embed_tokens", "language.model.norm", "language.lm_head"]


def write_quantized_checkpoint(
    variant: str, layers: int | None, folder: Path, quantization: DeepseekVL2QuantizationConfig, seed: int = 0
) -> Path:
    """Write the random-weight model already quantized, as ``save_pretrained`` writes a quantized model.

    One part at a time is made in bfloat16, filled, quantized and written, so that neither the float nor
    the quantized model is ever whole in memory (base's bf16 checkpoint would take 55 GB of disk).
    """
    if is_checkpoint(folder):
        return folder
    config = DeepseekVLV2Config(**published_tensors(variant, layers)[0])
    model = meta_model(config, torch.bfloat16)
    targets = quantization_targets(model, quantization)
    check_shapes(targets, quantization)
    target_names = [name for name, _ in targets]
    del targets
    print(f"writing a random-weight {variant} checkpoint quantized to {quantization.settings()} to {folder} (once)",
          flush=True)  # fmt: skip

    def write_weights(partial: Path) -> None:
        generator, pool = random_pool(seed)
        stored = meta_model(config, torch.bfloat16)
        quantize_modules(stored, quantization)
        writer = ShardWriter(partial, sum(tensor.nbytes for tensor in stored.state_dict().values()))
        own = {}
        for name, param in model.named_parameters(recurse=False):
            own[name] = torch.empty_like(param, device="cpu")
            fill_random_tensor(name, own[name], generator, pool)
        writer.add(own)
        for prefix in _blocks(model):
            block = model.get_submodule(prefix).to_empty(device="cpu")
            for name, param in block.named_parameters(prefix=prefix):
                fill_random_tensor(name, param, generator, pool)
            for name in target_names:
                if name == prefix or name.startswith(prefix + "."):
                    quantize_target(model, name, model.get_submodule(name), quantization)
            block = model.get_submodule(prefix)
            writer.add({f"{prefix}.{name}": tensor for name, tensor in block.state_dict().items()})
            block.to("meta")
        writer.close()
        if set(writer.weight_map) != set(model.state_dict()):
            raise RuntimeError("the written tensors are not the quantized model's state dict")
        model.config.quantization_config = quantization
        model.config.save_pretrained(partial)

    return _write_folder(variant, folder, write_weights)
