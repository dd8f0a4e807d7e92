"""The memory planner: its numbers against real models, peaks measured on CPU, and the CLI.

Peaks are measured in child processes (this file run as a script): the growth of the resident set's
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) over the resident set just before
the call. glibc is told to return freed blocks to the system at once (``MALLOC_MMAP_THRESHOLD_``), so
the resident set follows the live tensors. Models are float32: CPU kernels for bfloat16 keep packed
weight copies that would blur the measurement.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import deepseek_vl2.models.cache as cache_module
from deepseek_vl2.models import DeepseekVLV2Config
from deepseek_vl2.planner import (
    decode_cache_positions,
    decoder_prefill_peak,
    default_reuse_budget,
    image_tiles_and_tokens,
    kv_cache_bytes_per_token,
    load_config,
    main,
    meta_model,
    plan_cpu_memory,
    plan_memory,
    vision_peak,
    weight_bytes,
)
from deepseek_vl2.testing.checkpoints import checkpoint_quantization, published_style_config
from deepseek_vl2.testing.published import published_config

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.20
PROMPT_LENGTHS = (512, 1024, 2048)
CHUNK_SIZE = 384
# Two built-checkpoint shapes, wide enough for activations to dwarf allocator noise, small enough to run fast.
SIZES = {
    "tiny-like": (
        "tiny",
        dict(hidden_size=512, intermediate_size=768, moe_intermediate_size=128, num_attention_heads=8,
             num_key_value_heads=8, n_routed_experts=8, num_experts_per_tok=4, num_hidden_layers=2),
    ),
    "small-like": (
        "small",
        dict(hidden_size=640, intermediate_size=960, moe_intermediate_size=160, num_attention_heads=10,
             kv_lora_rank=160, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
             num_experts_per_tok=4, num_hidden_layers=2),
    ),
}  # fmt: skip
VISION = dict(width=256, layers=2, heads=4)
IMAGE_CASES = (((768, 768), 1), ((1024, 768), 2), ((500, 500), 3))


def measured_config(size: str) -> DeepseekVLV2Config:
    variant, language = SIZES[size]
    settings = copy.deepcopy(published_style_config(variant, vocab_size=2048, bos_token_id=0, eos_token_id=1))
    settings["language_config"].update(language)
    settings["vision_config"].update(VISION)
    settings["projector_config"].update(input_dim=VISION["width"], n_embed=language["hidden_size"])
    return DeepseekVLV2Config(**settings)


# ---------------------------------------------------------------------------------------------- measuring (child)


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _peak_of(call, repeats: int = 2) -> int:
    """Bytes by which ``call()`` raises the resident high-water mark above the resident set before it.

    The smallest rise over ``repeats`` calls: a first call at a new size can also grow buffers the
    process keeps (allocator arenas, kernel caches), which are not the call's own peak.
    """
    import gc

    peaks = []
    for _ in range(repeats):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM to the current resident set
        before = _status("VmRSS")
        result = call()
        peaks.append(_status("VmHWM") - before)
        del result
    return min(peaks)


def _measure(size: str) -> list[dict]:
    from deepseek_vl2.models import DeepseekVLV2ForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = measured_config(size)
    model = DeepseekVLV2ForCausalLM(config).eval()
    vocab = config.language_config.vocab_size
    results = []
    with torch.no_grad():
        warm_up = torch.randint(3, vocab, (1, 64))
        model(input_ids=warm_up, use_cache=True, logits_to_keep=1)
        model.incremental_prefilling(input_ids=warm_up, chunk_size=16)
        for length in PROMPT_LENGTHS:
            ids = torch.randint(3, vocab, (1, length))
            mask = torch.ones_like(ids)
            full = _peak_of(lambda: model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1))
            chunked = _peak_of(
                lambda: model.incremental_prefilling(input_ids=ids, attention_mask=mask, chunk_size=CHUNK_SIZE)
            )
            results += [
                {"kind": "prefill", "tokens": length, "chunk_size": None, "bytes": full},
                {"kind": "prefill", "tokens": length, "chunk_size": CHUNK_SIZE, "bytes": chunked},
            ]
        if size == "tiny-like":
            results += [_measure_images(model, config, image_size, count) for image_size, count in IMAGE_CASES]
    return results


def _measure_images(model, config: DeepseekVLV2Config, image_size, count: int) -> dict:
    """Peak of ``prepare_inputs_embeds`` (pixels created inside) for ``count`` images of ``image_size``."""
    from deepseek_vl2.models.tiling import tile_grids, tile_size_for

    tiles, tokens = image_tiles_and_tokens(config, image_size, count)
    tile = tile_size_for(config.candidate_resolutions)
    length = tokens + 20
    ids = torch.randint(3, config.language_config.vocab_size, (1, length))
    image_mask = torch.zeros(1, length, dtype=torch.bool)
    image_mask[0, 10 : 10 + tokens] = True
    crops = torch.tensor([tile_grids([image_size] * count, config.candidate_resolutions)])

    def encode():
        return model.prepare_inputs_embeds(ids, torch.randn(1, tiles, 3, tile, tile), image_mask, crops)

    return {"kind": "images", "tiles": tiles, "tokens": length, "bytes": _peak_of(encode)}


# ---------------------------------------------------------------------------------------------- measured peaks


@pytest.fixture(scope="module")
def measured() -> dict[str, list[dict]]:
    """Peaks per size, measured in two child processes running side by side."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the resident high-water mark")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    children = {
        size: subprocess.Popen(
            [sys.executable, __file__, size], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for size in SIZES
    }
    results = {}
    for size, child in children.items():
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        results[size] = json.loads(out)
    return results


def within_tolerance(predicted: int, measured: int) -> bool:
    return abs(predicted - measured) <= TOLERANCE * measured


@pytest.mark.parametrize("size", SIZES)
def test_prefill_peak_prediction_within_20_percent(measured, size):
    config = measured_config(size).language_config
    rows = [row for row in measured[size] if row["kind"] == "prefill"]
    assert len(rows) == 2 * len(PROMPT_LENGTHS)
    report = []
    for row in rows:
        predicted = decoder_prefill_peak(config, row["tokens"], row["chunk_size"], torch.float32, device="cpu")
        report.append((row["tokens"], row["chunk_size"], predicted, row["bytes"]))
    misses = [r for r in report if not within_tolerance(r[2], r[3])]
    assert not misses, f"(tokens, chunk, predicted, measured) off by more than {TOLERANCE:.0%}: {misses}"
    full = {tokens: m for tokens, chunk, _, m in report if chunk is None}
    chunked = {tokens: m for tokens, chunk, _, m in report if chunk}
    assert chunked[PROMPT_LENGTHS[-1]] < 0.6 * full[PROMPT_LENGTHS[-1]], "chunking must cut the long prompt's peak"


def test_image_encoding_peak_prediction_within_20_percent(measured):
    config = measured_config("tiny-like")
    rows = [row for row in measured["tiny-like"] if row["kind"] == "images"]
    assert len(rows) == len(IMAGE_CASES)
    for row in rows:
        predicted = vision_peak(config, row["tiles"], row["tokens"], torch.float32)
        assert within_tolerance(predicted, row["bytes"]), (row, predicted)


# ---------------------------------------------------------------------------------------------- exact numbers


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_kv_cache_per_token_is_what_the_cache_holds(loaded, variant):
    model, _ = loaded(variant)
    config = model.config.language_config
    tokens = 37
    with torch.no_grad():
        cache = model(input_ids=torch.randint(3, 300, (1, tokens)), use_cache=True).cache
    held = sum(tensor.numel() * tensor.element_size() for layer in cache.layers for tensor in (layer.keys, layer.values))
    assert held == tokens * kv_cache_bytes_per_token(config, torch.float32)


@pytest.mark.parametrize("prompt, new_tokens", [(5, 1), (5, 4), (6, 3), (7, 2), (10, 20)])  # around blocks of 8
def test_decode_cache_positions_are_what_generation_leaves(loaded, prompt, new_tokens, monkeypatch):
    monkeypatch.setattr(cache_module, "CACHE_BLOCK", 8)
    model, _ = loaded("small")
    language = model.language
    ids = torch.randint(3, 300, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    settings = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        one_pass = language.generate(ids, return_dict_in_generate=True, **settings).cache
        embeds, chunked = model.incremental_prefilling(input_ids=ids, chunk_size=100)
        model.generate(inputs_embeds=embeds, input_ids=ids, cache=chunked, **settings)
    held = {layer.keys.shape[-2] for cache in (one_pass, chunked) for layer in cache.layers}
    assert max(held) == decode_cache_positions(prompt, prompt + new_tokens)


def test_weight_bytes_match_the_loaded_model(loaded):
    model, _ = loaded("small")
    planned = weight_bytes(meta_model(model.config, torch.float32))
    assert sum(planned.values()) == sum(p.numel() * p.element_size() for p in model.parameters())
    assert planned["embeddings"] == model.get_input_embeddings().weight.nbytes


@pytest.fixture
def published_config_file(tmp_path):
    def write(variant: str) -> Path:
        target = tmp_path / variant / "config.json"
        target.parent.mkdir()
        target.write_text(json.dumps(published_config(variant)))
        return target

    return write


@pytest.mark.parametrize(
    "variant, parameters, kv_per_token",
    [("tiny", 3.37e9, 12 * 2 * 1280 * 2), ("small", 16.15e9, 27 * 576 * 2), ("base", 27.48e9, 30 * 576 * 2)],
)
def test_published_sizes(published_config_file, variant, parameters, kv_per_token):
    plan = plan_memory(published_config_file(variant), "80GiB")
    assert plan.parameters == pytest.approx(parameters, rel=2e-3)
    assert plan.weight_total == 2 * plan.parameters
    assert plan.kv_bytes_per_token == kv_per_token


def test_the_report_shows_the_reuse_budget(published_config_file):
    plan = plan_memory(published_config_file("small"), "80GiB")
    language = DeepseekVLV2Config(**published_config("small")).language_config
    assert plan.reuse_budget == default_reuse_budget(language, torch.bfloat16) > plan.kv_cache
    assert [line for line in plan.report().splitlines() if line.strip().startswith("reuse")]


@pytest.mark.parametrize(
    "image_size, count",
    [((1024, 768), 1), ((300, 1400), 2), ((640, 480), 3), ((10, 10), 1), ((1, 10000), 1), ((3, 9000), 2), ((10000, 1), 3)],
)
def test_image_tokens_follow_the_processor(loaded, image_size, count):
    _, processor = loaded("tiny")
    config = DeepseekVLV2Config(**published_style_config("tiny", 640, 0, 1))
    images = [Image.new("RGB", image_size, "white")] * count
    conversation = [{"role": "<|User|>", "content": "<image>" * count + "Hi"}, {"role": "<|Assistant|>", "content": ""}]
    sample = processor(conversations=conversation, images=images, force_batchify=False)
    assert image_tiles_and_tokens(config, image_size, count) == (sample.images.shape[0], sum(sample.num_image_tokens))


# ---------------------------------------------------------------------------------------------- plans and CLI


def test_small_fits_a_40gb_gpu_but_not_a_24gb_one(published_config_file):
    path = published_config_file("small")
    big = plan_memory(path, "40GiB", images=2)
    assert big.offloaded == 0 and set(big.device_map.values()) == {0} and big.chunk_size is None
    assert big.weight_total + big.activation_peak < 40 * 2**30

    small = plan_memory(path, "24GiB", images=2)
    assert small.offloaded > 0 and small.device_map["vision"] == 0 and small.device_map["language.lm_head"] == "cpu"
    assert small.offloaded + sum(v for k, v in small.placed.items() if k == 0) == small.weight_total

    pair = plan_memory(path, "24GiB", gpus=2, images=2)
    assert pair.offloaded == 0 and set(pair.device_map.values()) == {0, 1}


@pytest.mark.parametrize("variant, bits", [("small", 8), ("tiny", 4)])  # small's test MLA has no int4 tiles
def test_cpu_plan_counts_the_weights_a_quantized_load_holds(checkpoint_dir, variant, bits):
    from deepseek_vl2.models import DeepseekVLV2ForCausalLM

    path = checkpoint_dir(variant)
    quantization = checkpoint_quantization(f"int{bits}")
    model = DeepseekVLV2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quantization)
    plan = plan_cpu_memory(path, "1GiB", quantization=quantization)
    assert plan.weight_total == sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.weights["embeddings"] == model.get_input_embeddings().weight.nbytes, "embeddings stay bf16"
    assert plan.weight_total < plan_cpu_memory(path, "1GiB").weight_total


def test_cpu_plan_verdicts_for_small_and_base(published_config_file):
    small, base = published_config_file("small"), published_config_file("base")
    plans = {(path.parent.name, q): plan_cpu_memory(path, "24GiB", quantization=q, images=1)
             for path in (small, base) for q in (None, "int8", "int4")}  # fmt: skip
    for variant in ("small", "base"):
        full, int8, int4 = (plans[variant, q] for q in (None, "int8", "int4"))
        assert int4.weight_total < int8.weight_total < 0.6 * full.weight_total
        assert int8.activation_peak == full.activation_peak, "activations stay in the model dtype"
        for plan in (full, int8, int4):
            verdict = [line for line in plan.report().splitlines() if line.startswith("Verdict")]
            assert verdict == [f"Verdict: {'fits in' if plan.needed <= 24 * 2**30 else 'does not fit in'} 24.00 GiB"
                               + verdict[0].split("24.00 GiB", 1)[1]]  # fmt: skip
    assert plans["small", None].needed > 24 * 2**30 >= plans["small", "int8"].needed


def test_cli_plans_a_quantized_cpu_load(published_config_file, capsys):
    small = str(published_config_file("small"))
    assert main(["--model", small, "--ram", "16GiB", "--quantize", "int4"]) == 0
    report = capsys.readouterr().out
    assert "int4 weights" in report and "Verdict: fits in 16.00 GiB of RAM" in report
    assert "--quantization int4" in report


def test_gpu_plans_hold_quantized_weights_whole_with_a_dequantized_matrix(published_config_file, capsys):
    small, base = published_config_file("small"), published_config_file("base")
    full = plan_memory(small, "24GiB", images=1)
    int8 = plan_memory(small, "24GiB", images=1, quantization="int8")
    assert full.offloaded > 0 and int8.offloaded == 0 and set(int8.device_map.values()) == {0}
    assert int8.weight_total == plan_cpu_memory(small, "24GiB", quantization="int8").weight_total
    language = load_config(small).language_config
    lm_head = language.vocab_size * language.hidden_size * 2  # the largest matrix, dequantized to bf16
    assert int8.dequantized_peak == lm_head and int8.activation_peak == full.activation_peak + lm_head
    assert main(["--model", str(small), "--gpu-memory", "24GiB", "--quantize", "int8", "--images", "1"]) == 0
    report = capsys.readouterr().out
    assert "in int8 weights, bfloat16 activations" in report and "Verdict: fits on 1 x 24.00 GiB GPU" in report
    assert 'device_map="cuda", quantization="int8")' in report and "--quantization int8" in report
    assert main(["--model", str(base), "--gpu-memory", "24GiB", "--quantize", "int8"]) == 0
    assert "quantized weights are not offloaded (try int4" in capsys.readouterr().out
    with pytest.raises(ValueError, match="whole on one GPU"):
        plan_memory(small, "24GiB", gpus=2, quantization="int8")


def test_long_prompts_get_a_chunk_size(published_config_file):
    path = published_config_file("small")
    roomy = plan_memory(path, "40GiB", text_tokens=16000, max_new_tokens=64)
    assert roomy.chunk_size is None and roomy.offloaded == 0
    tight = plan_memory(path, "32.5GiB", text_tokens=16000, max_new_tokens=64)
    assert tight.chunk_size is not None and tight.offloaded == 0
    overhead = 2**30
    assert tight.weight_total + tight.activation_peak + overhead <= 32.5 * 2**30
    assert tight.weight_total + tight.prefill_peak + overhead > 32.5 * 2**30, "one pass would not fit"
    assert decoder_prefill_peak(load_config(path).language_config, 16000, 512) < tight.prefill_peak


@pytest.mark.parametrize(
    "memory, plan_kwargs, expected",
    [
        (["--gpu-memory", "40GiB"], {"gpu_memory": "40GiB"},
         {"device": "cuda", "device_map": None, "max_memory": None, "offload_folder": None, "chunk_size": -1}),
        (["--gpu-memory", "24GiB", "--cpu-memory", "8GiB"], {"gpu_memory": "24GiB", "cpu_memory": "8GiB"},
         {"device": None, "device_map": "auto", "offload_folder": "offload", "chunk_size": -1}),
        (["--gpu-memory", "32.5GiB", "--text-tokens", "16000"], {"gpu_memory": "32.5GiB", "text_tokens": 16000},
         {"device": "cuda", "device_map": None, "chunk_size": 4096}),
    ],
)  # fmt: skip
def test_cli_advice_can_be_typed_as_the_loading_flags(published_config_file, capsys, memory, plan_kwargs, expected):
    from deepseek_vl2.cli import build_parser
    from deepseek_vl2.utils.sizes import parse_max_memory

    path = published_config_file("small")
    assert main(["--model", str(path), "--images", "2", *memory]) == 0
    (flags,) = [line.removeprefix("Flags:").split("  (")[0] for line in capsys.readouterr().out.splitlines()
                if line.startswith("Flags:")]  # fmt: skip
    args = build_parser().parse_args(["ask", "--demo", *flags.split()])
    assert args.dtype == "bfloat16" and {name: getattr(args, name) for name in expected} == expected
    if args.max_memory:
        plan = plan_memory(path, images=2, **plan_kwargs)
        budgets = parse_max_memory(args.max_memory)
        assert budgets.keys() == plan.max_memory.keys()
        assert all(0 <= plan.max_memory[device] - budgets[device] < 0.1 * 2**30 for device in budgets), "0.1 GiB steps"


def test_cli_prints_a_plan(published_config_file, capsys):
    folder = published_config_file("small").parent
    assert main(["--model", str(folder), "--gpu-memory", "40GiB", "--images", "2", "--image-size", "1024x768"]) == 0
    out = capsys.readouterr().out
    assert "16.15 B parameters" in out and "Verdict: fits on 1 x 40.00 GiB GPU" in out
    assert main(["--model", str(folder / "config.json"), "--gpu-memory", "24GiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["device_map"]["language.lm_head"] == "cpu" and plan["weight_total"] > 30 * 2**30


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu-memory", "lots"], "memory size"),
        (["--gpu-memory", "40GiB", "--image-size", "big"], "1024x768"),
        (["--gpu-memory", "40GiB", "--dtype", "int3"], "unknown dtype"),
        (["--gpu-memory", "40GiB", "--images", "-1"], "images must be"),
    ],
)
def test_cli_reports_bad_input_in_one_line(published_config_file, capsys, args, message):
    assert main(["--model", str(published_config_file("small")), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_reports_a_missing_config(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nothing" / "config.json"), "--gpu-memory", "40GiB"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_hub_ids_download_only_config_json(published_config_file, monkeypatch):
    import huggingface_hub

    local = published_config_file("small")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    plan = plan_memory("deepseek-ai/deepseek-vl2-small", "40GiB")
    assert calls == [("deepseek-ai/deepseek-vl2-small", "config.json")]
    assert plan.model == "deepseek-ai/deepseek-vl2-small"



@pytest.mark.parametrize("name", ["bf16", "BF16", "bfloat16", "fp16", "half", "float16", "fp32", "float", "Float32"])
def test_planner_and_chat_take_the_same_dtype_names(published_config_file, name):
    from deepseek_vl2.utils.checks import pick_dtype

    plan = plan_memory(published_config_file("tiny"), "80GiB", dtype=name)
    assert plan.dtype == str(pick_dtype(name)).removeprefix("torch.")


@pytest.mark.parametrize("dtype", ["int3", "float8", torch.float64, torch.int8])
def test_planner_and_chat_refuse_the_same_dtypes(published_config_file, dtype):
    from deepseek_vl2.utils.checks import pick_dtype

    with pytest.raises(ValueError, match="dtype"):
        pick_dtype(dtype)
    with pytest.raises(ValueError, match="dtype"):
        plan_memory(published_config_file("tiny"), "80GiB", dtype=dtype)


@pytest.mark.parametrize(
    "name, is_hub_id",
    [("deepseek-ai/deepseek-vl2-small", True), ("org/model.v2_b", True), ("./small", False), ("../small", False),
     ("~/small", False), ("/abs/small", False), ("a/b/c", False), ("my org/small", False), ("C:/small", False),
     ("org/", False), ("org\\small", False)],
)  # fmt: skip
def test_planner_and_loaders_agree_on_what_is_a_hub_id(tmp_path, monkeypatch, name, is_hub_id):
    import huggingface_hub

    from deepseek_vl2.utils.checkpoint import check_checkpoint_location

    class Downloaded(Exception):
        pass

    def fake_download(repo_id, filename, **kwargs):
        raise Downloaded(repo_id)

    monkeypatch.chdir(tmp_path)  # no such local paths
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(Downloaded if is_hub_id else ValueError):
        load_config(name)
    if is_hub_id:
        check_checkpoint_location(name, "config.json")  # left to the hub client
    else:
        with pytest.raises(FileNotFoundError, match="not a hub id"):
            check_checkpoint_location(name, "config.json")

if __name__ == "__main__":
    print(json.dumps(_measure(sys.argv[1])))
