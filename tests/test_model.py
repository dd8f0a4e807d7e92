"""The vision-language model end to end on built checkpoints: loading, token layout, prefill, generation."""

import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from PIL import Image

from deepseek_vl2.models import DeepseekVLV2ForCausalLM

VARIANTS = ["tiny", "small", "base"]


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def conversation(prompt: str, n_images: int = 0) -> list[dict]:
    return [
        {"role": "<|User|>", "content": "<image>\n" * n_images + prompt},
        {"role": "<|Assistant|>", "content": ""},
    ]


def encode(processor, prompt: str, images: list[Image.Image]):
    return processor(conversations=conversation(prompt, len(images)), images=images, force_batchify=True)


def last_logits_full(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**inputs)
        mask = inputs.attention_mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = model.language(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
    return out.logits[:, -1]


def last_logits_incremental(model, inputs, chunk_size: int, attention_mask="given") -> torch.Tensor:
    mask = inputs.attention_mask if attention_mask == "given" else None
    embeds, cache = model.incremental_prefilling(
        input_ids=inputs.input_ids,
        attention_mask=mask,
        images=inputs.images,
        images_seq_mask=inputs.images_seq_mask,
        images_spatial_crop=inputs.images_spatial_crop,
        chunk_size=chunk_size,
    )
    full_mask = inputs.attention_mask if mask is not None else torch.ones_like(inputs.input_ids)
    position = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -1:]
    with torch.no_grad():
        out = model.language(
            inputs_embeds=embeds[:, -1:], attention_mask=full_mask, position_ids=position, cache=cache, use_cache=True
        )
    return out.logits[:, -1]


# ---------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("variant", VARIANTS)
def test_built_checkpoint_loads_cleanly_and_round_trips(variant, checkpoint_dir, tmp_path):
    path = checkpoint_dir(variant)
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "processor_config.json", "tokenizer.json"} <= files
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert any(".mlp.experts.0.gate_proj.weight" in name for name in index["weight_map"]), "published expert names"

    model, info = DeepseekVLV2ForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, "loading report must be clean"
    ids = torch.tensor([[5, 17, 33, 9, 60]])
    with torch.no_grad():
        before = model(input_ids=ids).logits

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "model.safetensors.index.json").read_text()) if (
        tmp_path / "model.safetensors.index.json"
    ).exists() else None
    reloaded, info = DeepseekVLV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    if saved is not None:
        assert set(saved["weight_map"]) == set(index["weight_map"]), "saved back in the published layout"
    with torch.no_grad():
        after = reloaded(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_loaded_weights_are_owned_not_views_of_the_checkpoint_files(checkpoint_dir):
    path = checkpoint_dir("small")
    model = DeepseekVLV2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    views = [name for name, p in model.named_parameters() if not p.untyped_storage().resizable()]
    assert views == [], f"parameters still viewing the memory-mapped files: {views[:5]}"
    if sys.platform == "linux":
        with open("/proc/self/maps") as maps:
            mapped = [line.split()[-1] for line in maps if str(path) in line]
        assert mapped == [], f"checkpoint files still mapped after loading: {mapped}"
    files = {}
    for file in path.glob("*.safetensors"):
        files.update(safetensors.torch.load_file(file))
    embeddings = model.language.model.embed_tokens.weight
    assert torch.equal(embeddings, files["language.model.embed_tokens.weight"]), "copied exactly"


def test_auto_classes_and_trust_remote_code(checkpoint_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

    path = checkpoint_dir("tiny")
    assert type(AutoConfig.from_pretrained(path)).__name__ == "DeepseekVLV2Config"
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert isinstance(model, DeepseekVLV2ForCausalLM)
    assert type(AutoProcessor.from_pretrained(path)).__name__ == "DeepseekVLV2Processor"


# ---------------------------------------------------------------------------------------------- image layout


def reference_image_embeds(model, inputs) -> torch.Tensor:
    """Direct transcription of the published layout rules, one image and one tile at a time."""
    embeds = model.get_input_embeddings()(inputs.input_ids).clone()
    newline, separator = model.image_newline, model.view_seperator
    for row in range(inputs.input_ids.shape[0]):
        pieces, tile = [], 0
        for w_tiles, h_tiles in inputs.images_spatial_crop[row].tolist():
            if w_tiles == 0 or h_tiles == 0:
                break
            feats = [model.projector(model.vision(inputs.images[row, tile + i][None]))[0] for i in range(1 + w_tiles * h_tiles)]
            tile += 1 + w_tiles * h_tiles
            side = int(feats[0].shape[0] ** 0.5)
            global_rows = [torch.cat([feats[0][r * side : (r + 1) * side], newline[None]]) for r in range(side)]
            local_rows = []
            for th in range(h_tiles):
                for r in range(side):
                    parts = [feats[1 + th * w_tiles + tw][r * side : (r + 1) * side] for tw in range(w_tiles)]
                    local_rows.append(torch.cat(parts + [newline[None]]))
            pieces += global_rows + [separator[None]] + local_rows
        if pieces:
            embeds[row][inputs.images_seq_mask[row]] = torch.cat(pieces)
    return embeds


@pytest.mark.parametrize("size", [(1, 1), (40, 30), (300, 1400), (1000, 600)])
def test_image_token_layout_matches_reference(loaded, size):
    model, processor = loaded("tiny")
    inputs = encode(processor, "Describe.", [picture(*size)])
    with torch.no_grad():
        ours = model.prepare_inputs_embeds(**inputs)
        reference = reference_image_embeds(model, inputs)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_mismatched_image_mask_is_a_clear_error(loaded):
    model, processor = loaded("tiny")
    inputs = encode(processor, "Describe.", [picture(64, 64)])
    inputs.images_seq_mask[0, 0] = True  # one position too many
    with pytest.raises(ValueError, match="image-token positions"):
        model.prepare_inputs_embeds(**inputs)


def test_image_inputs_of_the_wrong_shape_are_named(loaded):
    """Shape slips from a notebook must say what is wrong, not fail inside masked_scatter or unpacking."""
    model, processor = loaded("tiny")
    inputs = encode(processor, "Describe.", [picture(64, 64)])
    with pytest.raises(ValueError, match=r"images_seq_mask has shape \(1, \d+\) but input_ids"):
        model.prepare_inputs_embeds(**{**inputs, "images_seq_mask": inputs.images_seq_mask[:, 1:]})
    single = processor(conversations=conversation("Describe.", 1), images=[picture(64, 64)], force_batchify=False)
    with pytest.raises(ValueError, match="force_batchify=True"):
        model.prepare_inputs_embeds(**single)
    with pytest.raises(ValueError, match=r"images must be \(batch=1"):
        model.prepare_inputs_embeds(**{**inputs, "images": inputs.images[0]})
    with pytest.raises(ValueError, match=r"images_spatial_crop must be \(batch=1"):
        model.prepare_inputs_embeds(**{**inputs, "images_spatial_crop": inputs.images_spatial_crop[0]})


def test_leaving_out_an_image_input_is_an_error_not_a_text_only_answer(loaded):
    model, processor = loaded("tiny")
    inputs = encode(processor, "Describe.", [picture(64, 64)])
    for missing in ("images", "images_seq_mask", "images_spatial_crop"):
        with pytest.raises(ValueError, match=f"without {missing}"):
            model.prepare_inputs_embeds(**{**inputs, missing: None})
    text = encode(processor, "Hello.", [])  # a text-only batch: no image to lose
    with torch.no_grad():
        plain = model.get_input_embeddings()(text.input_ids)
        for missing in ("images", "images_seq_mask", "images_spatial_crop"):
            assert torch.equal(model.prepare_inputs_embeds(**{**text, missing: None}), plain)


# ---------------------------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_incremental_prefilling_equals_full_prefill(loaded, variant, chunk_size):
    model, processor = loaded(variant)
    inputs = encode(processor, "What is shown here, in detail?", [picture(500, 300)])
    full = last_logits_full(model, inputs)
    chunked = last_logits_incremental(model, inputs, chunk_size)
    assert (full - chunked).abs().max() <= 1e-5


def test_incremental_prefilling_left_padded_batch(loaded):
    model, processor = loaded("small")
    rows = [encode(processor, "Hi.", []), encode(processor, "A much longer question about this picture?", [picture(200, 500)])]
    batch = processor.batchify(rows)
    assert batch.attention_mask[0, 0] == 0, "shorter row is left padded"
    full = last_logits_full(model, batch)
    for chunk_size in (5, 33):
        chunked = last_logits_incremental(model, batch, chunk_size)
        assert (full - chunked).abs().max() <= 1e-5
    for row, single in enumerate(rows):
        assert (last_logits_full(model, single)[0] - full[row]).abs().max() <= 1e-4


def test_incremental_prefilling_without_mask_and_one_token_prompt(loaded):
    model, processor = loaded("tiny")
    inputs = encode(processor, "Count the boxes.", [])
    full = last_logits_full(model, inputs)
    assert (full - last_logits_incremental(model, inputs, 4, attention_mask=None)).abs().max() <= 1e-5
    one = inputs.input_ids[:, :1]
    embeds, cache = model.incremental_prefilling(input_ids=one, chunk_size=8)
    assert embeds.shape[1] == 1 and cache.get_seq_length() == 0
    tokens = model.generate(inputs_embeds=embeds, input_ids=one, cache=cache, max_new_tokens=3, do_sample=False)
    assert tokens.shape[1] >= 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_incremental_prefilling_rejects_bad_chunk_size(loaded, bad):
    model, processor = loaded("tiny")
    inputs = encode(processor, "Hi.", [])
    with pytest.raises(ValueError, match="chunk_size"):
        model.incremental_prefilling(input_ids=inputs.input_ids, chunk_size=bad)


# ---------------------------------------------------------------------------------------------- generation


def generation_kwargs(processor, **extra):
    tok = processor.tokenizer
    return dict(
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        max_new_tokens=6,
        do_sample=False,
        use_cache=True,
        **extra,
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_both_generate_call_styles_and_incremental_give_same_tokens(loaded, variant):
    model, processor = loaded(variant)
    inputs = encode(processor, "Describe the picture.", [picture(400, 400, seed=3)])
    kwargs = generation_kwargs(processor)
    n = inputs.input_ids.shape[1]
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**inputs)
        via_language = model.language.generate(inputs_embeds=embeds, attention_mask=inputs.attention_mask, **kwargs)
        via_model = model.generate(
            input_ids=inputs.input_ids,
            images=inputs.images,
            images_seq_mask=inputs.images_seq_mask,
            images_spatial_crop=inputs.images_spatial_crop,
            attention_mask=inputs.attention_mask,
            **kwargs,
        )
    embeds, cache = model.incremental_prefilling(**inputs, chunk_size=16)
    via_prefill = model.generate(
        inputs_embeds=embeds, input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, past_key_values=cache, **kwargs
    )
    assert via_language.shape[1] == 6
    assert via_model[:, n:].tolist() == via_language.tolist()
    assert via_prefill[:, n:].tolist() == via_language.tolist()


def test_generate_takes_a_whole_processor_output(loaded):
    """``generate(**inputs)``, like ``prepare_inputs_embeds(**inputs)``: display text and labels are not inputs."""
    model, processor = loaded("tiny")
    rows = [encode(processor, "Hi.", []), encode(processor, "What colour dominates?", [picture(300, 200, seed=1)])]
    batch = processor.batchify(rows)
    kwargs = generation_kwargs(processor)
    names = ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")
    with torch.no_grad():
        expected = model.generate(**{k: batch[k] for k in names}, **kwargs)
        assert model.generate(**batch, **kwargs).tolist() == expected.tolist()
    assert batch.sft_format and batch.labels is not None, "the caller's batch keeps its fields"


def test_batch_rows_generate_as_if_alone(loaded):
    model, processor = loaded("tiny")
    rows = [
        encode(processor, "Say something.", []),
        encode(processor, "What colour dominates?", [picture(300, 200, seed=1)]),
        encode(processor, "Compare these three.", [picture(100, 100, seed=2), picture(50, 300, seed=3), picture(640, 480, seed=4)]),
    ]
    kwargs = generation_kwargs(processor)
    batch = processor.batchify(rows)
    with torch.no_grad():
        together = model.generate(**{k: batch[k] for k in ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")}, **kwargs)
        n = batch.input_ids.shape[1]
        for row, single in enumerate(rows):
            alone = model.generate(**{k: single[k] for k in ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")}, **kwargs)
            m = single.input_ids.shape[1]
            expected = alone[0, m:].tolist()
            assert together[row, n : n + len(expected)].tolist() == expected


def test_bfloat16_on_cpu_generates(checkpoint_dir):
    from deepseek_vl2.models import DeepseekVLV2Processor

    path = checkpoint_dir("base")
    model = DeepseekVLV2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    processor = DeepseekVLV2Processor.from_pretrained(path)
    inputs = encode(processor, "Describe.", [picture(300, 300)]).to(model.device)
    assert inputs.images.dtype == torch.float32, "pixels keep their dtype; the model casts them"
    out = model.generate(**{k: inputs[k] for k in ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")}, **generation_kwargs(processor))
    assert out.shape[1] > inputs.input_ids.shape[1]


def test_sampling_settings_run(loaded):
    model, processor = loaded("tiny")
    inputs = encode(processor, "Tell a story.", [])
    torch.manual_seed(0)
    out = model.generate(
        input_ids=inputs.input_ids,
        attention_mask=inputs.attention_mask,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        repetition_penalty=1.1,
        max_new_tokens=5,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    assert 1 <= out.shape[1] - inputs.input_ids.shape[1] <= 5


# ---------------------------------------------------------------------------------------------- import hygiene


def test_import_prints_nothing_and_patches_nothing_outside_the_package():
    script = """
import collections, sys, torch, transformers
import transformers.models.auto
def snapshot():
    return {name: set(dir(mod)) for name, mod in [("collections", collections), ("torch", torch), ("nn.Module", torch.nn.Module), ("builtins", __builtins__ if isinstance(__builtins__, type(sys)) else sys.modules["builtins"])]}
before = snapshot()
import deepseek_vl2
after = snapshot()
# torch may gain submodule attributes as transformers lazily imports torch._dynamo; those are imports, not patches
changed = {k: sorted(a for a in after[k] ^ before[k] if not isinstance(getattr(torch, a, None), type(sys))) for k in before}
changed = {k: v for k, v in changed.items() if v}
print("CHANGED", changed, file=sys.stderr) if changed else None
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
