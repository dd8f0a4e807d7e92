"""Weight-only int8/int4 quantization: kernels against dequantized weights, whole models, save/reload, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_model import encode, generation_kwargs, picture
from transformers import BitsAndBytesConfig

from deepseek_vl2.models import DeepseekV2Config, DeepseekVLV2ForCausalLM, DeepseekVLV2Processor, kernels
from deepseek_vl2.models.cache import DeepseekV2Cache
from deepseek_vl2.models.kernels import MIN_DEQUANTIZED_ROWS, Kernel, Op, quantized_kernel
from deepseek_vl2.models.language import DeepseekV2Experts
from deepseek_vl2.quantization import (
    DeepseekVL2QuantizationConfig,
    DeepseekVL2Quantizer,
    QuantizedExperts,
    QuantizedLinear,
    modules,
)
from deepseek_vl2.quantization.modules import QuantizedWeights
from deepseek_vl2.quantization.packing import (
    INT4_LAYOUTS,
    UNRECORDED_INT4_LAYOUT,
    dequantize,
    machine_int4_layout,
    pack_int4,
    quantize,
    repack_int4,
    unpack_int4,
)
from deepseek_vl2.quantization.selection import quantization_targets
from deepseek_vl2.testing.checkpoints import checkpoint_quantization

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object only: no GPU is needed to ask
ROOT = Path(__file__).resolve().parents[1]
# The settings the test checkpoints take (int4 in groups as wide as their experts).
SETTINGS = {name: checkpoint_quantization(name) for name in ("int8", "int4")}
INPUTS = ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")


def assert_products_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 products of the same weights summed in another order: a few float32 ulps of the largest term."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def fill(module, float_module) -> None:
    """Store in quantized ``module`` the quantized tensors of ``float_module``'s weights."""
    with torch.no_grad():
        for name in module.quantized_names:
            for stored_name, tensor in module.quantize_tensor(name, getattr(float_module, name)).items():
                getattr(module, stored_name).copy_(tensor)


@pytest.mark.parametrize("rows", [32, 48, 16, 1792, 80])
def test_int4_packing_is_the_cpu_kernels_own(rows):
    levels = torch.randint(0, 16, (rows, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(rows))
    packed = pack_int4(levels.to(torch.uint8))
    assert torch.equal(packed, torch._convert_weight_to_int4pack_for_cpu(levels, 1))
    assert torch.equal(unpack_int4(packed), levels.to(torch.uint8))


@pytest.mark.parametrize("layout", INT4_LAYOUTS, ids=lambda layout: layout.name)
def test_every_int4_layout_unpacks_what_it_packs_and_repacks_into_this_machines(layout):
    levels = torch.randint(0, 16, (3, 176, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_int4(levels, layout)
    assert torch.equal(unpack_int4(packed, layout), levels)
    assert torch.equal(repack_int4(packed, layout), pack_int4(levels))
    others = [pack_int4(levels, other) for other in INT4_LAYOUTS if other != layout]
    assert not any(torch.equal(packed, other) for other in others), "the layouts differ"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dequantizing_into_a_dtype_rounds_the_float32_values_once(bits, dtype):
    weight = torch.randn(3, 80, 128, generator=torch.Generator().manual_seed(bits)).to(dtype)
    quantized, scale = quantize(weight, bits, 32 if bits == 4 else None)
    if bits == 8:
        values = quantized.float() * scale.float().unsqueeze(-1)
    else:  # w = (level - 8) * scale + zero, per group of 32 input channels
        scales, zeros = scale.float().transpose(-3, -2).repeat_interleave(32, dim=-2).unbind(-1)
        values = (unpack_int4(quantized).float() - 8) * scales + zeros
    direct = dequantize(quantized, scale, bits, dtype)
    assert direct.dtype == dtype
    assert torch.equal(direct, values.to(dtype))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 5])
def test_quantized_linear_equals_the_product_with_its_dequantized_weight(bits, rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96)
    quantized = QuantizedLinear(linear, bits, 32 if bits == 4 else None)
    fill(quantized, linear)
    x = torch.randn(rows, 128)
    dequantized = quantized.dequantized("weight")
    assert_products_close(quantized(x), F.linear(x, dequantized, linear.bias))
    error = (dequantized - linear.weight).abs().max() / linear.weight.abs().max()
    assert 0 < error < (0.01 if bits == 8 else 0.15), "quantized, not copied, and close to the float weight"


@pytest.mark.parametrize("bits", [8, 4])
def test_a_bf16_prefill_product_runs_on_the_faster_of_the_kernel_and_the_dequantized_weight(bits, fresh_timer):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96).to(torch.bfloat16)
    quantized = QuantizedLinear(linear, bits, 32 if bits == 4 else None)
    fill(quantized, linear)
    dequantized = quantized.dequantized("weight").to(torch.bfloat16)
    for rows in (MIN_DEQUANTIZED_ROWS - 1, MIN_DEQUANTIZED_ROWS + 8):
        x = torch.randn(rows, 128).to(torch.bfloat16)
        with torch.no_grad():
            got, expected = quantized(x), F.linear(x, dequantized, linear.bias)
        torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02 * expected.abs().max().item())
    (measured,) = fresh_timer.measurements  # the few rows ran on the weight-only kernel untimed
    shapes = [tuple(quantized.weight.shape), (bits,)]
    assert measured.key.startswith(f"quantized_product size {MIN_DEQUANTIZED_ROWS} shapes {shapes}")
    assert set(measured.seconds) == {"weight_only", "dequantized"}


def experts_config() -> DeepseekV2Config:
    return DeepseekV2Config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    ("path", "tokens"), [(Kernel.EACH_EXPERT, 3), (Kernel.GATHERED, 3), (Kernel.SORTED, 40)]
)  # a decode step's 6 pairs on CPU, the same on CUDA, a prefill's 80 pairs grouped by expert
def test_quantized_experts_equal_float_experts_with_the_dequantized_weights(bits, path, tokens):
    torch.manual_seed(0)
    config = experts_config()
    float_experts = DeepseekV2Experts(config)
    torch.nn.init.normal_(float_experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(float_experts.down_proj, std=0.1)
    quantized = QuantizedExperts(config, bits, 32 if bits == 4 else None, like=float_experts)
    fill(quantized, float_experts)
    with torch.no_grad():
        for name in quantized.quantized_names:
            getattr(float_experts, name).copy_(quantized.dequantized(name))
        hidden = torch.randn(tokens, 64)
        index = torch.randint(0, 8, (tokens, 2))
        weights = torch.rand(tokens, 2)
        assert_products_close(quantized._run(path, hidden, index, weights), float_experts(hidden, index, weights))


@pytest.fixture(scope="module")
def quantized(checkpoint_dir):
    """``quantized(variant, setting)`` -> the float32 checkpoint loaded with ``SETTINGS[setting]``, cached."""
    cache = {}

    def get(variant: str, setting: str):
        if (variant, setting) not in cache:
            path = checkpoint_dir(variant)
            model = DeepseekVLV2ForCausalLM.from_pretrained(
                path, dtype=torch.float32, quantization_config=SETTINGS[setting]
            )
            cache[variant, setting] = model.eval()
        return cache[variant, setting]

    return get


def dequantized_twin(model, checkpoint: str) -> DeepseekVLV2ForCausalLM:
    """The float model of ``checkpoint`` with each quantized weight replaced by its dequantized values."""
    twin = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    config = model.config.quantization_config
    with torch.no_grad():
        for name, float_module in quantization_targets(twin, config):
            module = model.get_submodule(name)
            for tensor_name in module.quantized_names:
                getattr(float_module, tensor_name).copy_(module.dequantized(tensor_name))
    return twin


def test_every_decoder_weight_but_kv_b_and_routers_is_quantized(quantized):
    model = quantized("small", "int8")
    weights = {n: p for n, p in model.language.named_parameters() if not n.endswith("_scale")}
    float_names = {n for n, p in weights.items() if p.is_floating_point() and p.dim() > 1}
    kept = {n.rsplit(".", 1)[0].rsplit(".", 1)[-1] for n in float_names} - {"embed_tokens"}
    assert kept == {"kv_b_proj", "gate"}, float_names
    assert model.language.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.int8
    assert all(p.is_floating_point() for p in model.vision.parameters()), "the vision tower stays float by default"


@pytest.mark.parametrize(
    ("variant", "setting"), [("tiny", "int8"), ("tiny", "int4"), ("small", "int8"), ("base", "int8")]
)
def test_quantized_model_equals_the_float_model_with_dequantized_weights(quantized, checkpoint_dir, variant, setting):
    model = quantized(variant, setting)
    twin = dequantized_twin(model, checkpoint_dir(variant))
    processor = DeepseekVLV2Processor.from_pretrained(checkpoint_dir(variant))
    inputs = encode(processor, "Describe the picture.", [picture(400, 300, seed=2)])
    kwargs = {**generation_kwargs(processor, output_logits=True, return_dict_in_generate=True), "max_new_tokens": 8}
    with torch.no_grad():
        got = model.generate(**{k: inputs[k] for k in INPUTS}, **kwargs)
        expected = twin.generate(**{k: inputs[k] for k in INPUTS}, **kwargs)
    assert got.sequences.tolist() == expected.sequences.tolist()
    for step, (actual, reference) in enumerate(zip(got.logits, expected.logits)):
        assert_products_close(actual, reference), step


@pytest.mark.parametrize("setting", ["int8", "int4"])
def test_the_cuda_way_run_on_cpu_gives_the_dequantized_models_tokens(quantized, checkpoint_dir, setting, monkeypatch):
    """CUDA's rules (each product on its weight dequantized for the call, a decode step's experts gathered),
    run on CPU for want of a GPU: the same exactness as the CPU's weight-only kernels."""
    for bits in (8, 4):
        monkeypatch.setitem(kernels._QUANTIZED_KERNELS, ("cpu", bits), kernels._QUANTIZED_KERNELS["cuda", bits])
    monkeypatch.setitem(kernels._RULES, Op.EXPERTS, lambda device, dtype, pairs: kernels._experts(CUDA, dtype, pairs))
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(modules, "weight_only_linear", lambda *args: pytest.fail("a weight-only kernel ran"))
    gathered, real_gathered = [], QuantizedExperts._gathered_weights
    monkeypatch.setattr(
        QuantizedExperts, "_gathered_weights", lambda self, *args: gathered.append(1) or real_gathered(self, *args)
    )
    model = quantized("tiny", setting)
    twin = dequantized_twin(model, checkpoint_dir("tiny"))
    processor = DeepseekVLV2Processor.from_pretrained(checkpoint_dir("tiny"))
    inputs = encode(processor, "Describe the picture.", [picture(400, 300, seed=2)])
    kwargs = {**generation_kwargs(processor, output_logits=True, return_dict_in_generate=True), "max_new_tokens": 8}
    with torch.no_grad():
        got = model.generate(**{k: inputs[k] for k in INPUTS}, **kwargs)
        expected = twin.generate(**{k: inputs[k] for k in INPUTS}, **kwargs)
    assert gathered, "decode steps gathered their experts' quantized weights"
    assert got.sequences.tolist() == expected.sequences.tolist()
    for step, (actual, reference) in enumerate(zip(got.logits, expected.logits)):
        assert_products_close(actual, reference), step


def test_quantized_decode_steps_settle_their_kernels_apart_from_float_ones(checkpoint_dir, fresh_timer):
    model = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint_dir("tiny"), dtype=torch.bfloat16, quantization="int8")
    language = model.language.eval()
    cache = DeepseekV2Cache(config=language.config)
    ids = torch.randint(0, language.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        language(ids[:, :6], cache=cache)
        for _ in range(64):
            language(ids[:, 6:], cache=cache)
    (kind,) = kernels._tunings
    width = language.config.hidden_size
    assert kind.startswith(f"decode step of 1 rows of width {width} with int8 weights bfloat16")
    assert kernels._tunings[kind].done
    assert any(key.startswith(kind + "experts size") for key in fresh_timer.choices())


def test_save_and_reload_give_the_same_tensors_and_tokens(quantized, checkpoint_dir, tmp_path):
    model = quantized("tiny", "int4")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    layout = machine_int4_layout().name
    expected = {"quant_method": "deepseek_vl2_weight_only", "bits": 4, "group_size": 32, "quantize_vision": False}
    assert saved == {**expected, "int4_layout": layout}
    with safe_open(tmp_path / "model.safetensors", "pt") as stored:
        assert stored.get_slice("language.model.layers.1.mlp.experts.gate_up_proj").get_dtype() == "U8"
    reloaded = DeepseekVLV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()  # this folder only
    assert isinstance(reloaded.language.model.layers[1].mlp.experts, QuantizedExperts)
    state, state_again = model.state_dict(), reloaded.state_dict()
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[name], state_again[name]) for name in state)
    processor = DeepseekVLV2Processor.from_pretrained(checkpoint_dir("tiny"))
    inputs = encode(processor, "What is it?", [picture(200, 200, seed=5)])
    with torch.no_grad():
        tokens = [
            m.generate(**{k: inputs[k] for k in INPUTS}, **generation_kwargs(processor)) for m in (model, reloaded)
        ]
    assert tokens[0].tolist() == tokens[1].tolist()


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "saved-before-layouts-were-recorded"])
def test_an_int4_checkpoint_packed_on_another_kind_of_cpu_loads_repacked(quantized, tmp_path, recorded):
    model = quantized("tiny", "int4")
    model.save_pretrained(tmp_path)
    other = next(layout for layout in INT4_LAYOUTS if layout != machine_int4_layout())
    other = other if recorded else UNRECORDED_INT4_LAYOUT
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    if recorded:
        config["quantization_config"]["int4_layout"] = other.name
    else:
        del config["quantization_config"]["int4_layout"]
    config_file.write_text(json.dumps(config))
    stored = load_file(tmp_path / "model.safetensors")
    for name, module in model.named_modules():
        if isinstance(module, QuantizedWeights):
            for tensor_name in module.quantized_names:
                key = f"{name}.{tensor_name}"
                stored[key] = pack_int4(unpack_int4(stored[key]), other)
    save_file(stored, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded = DeepseekVLV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    state, state_again = model.state_dict(), reloaded.state_dict()
    assert all(torch.equal(state[name], state_again[name]) for name in state)
    assert reloaded.config.quantization_config.to_dict()["int4_layout"] == machine_int4_layout().name


QUANTIZE_AND_SAVE = """
import sys
import torch
from deepseek_vl2.models import DeepseekVLV2ForCausalLM
from deepseek_vl2.quantization.packing import machine_int4_layout
from deepseek_vl2.testing.checkpoints import checkpoint_quantization
config = checkpoint_quantization("int4")
model = DeepseekVLV2ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, quantization_config=config)
model.save_pretrained(sys.argv[2])
print(machine_int4_layout().name)
"""


def test_an_int4_checkpoint_saved_by_a_process_on_another_vector_width_loads_the_same(
    quantized, checkpoint_dir, tmp_path
):
    """PyTorch's dispatch is forced to another CPU capability in a child process, as on another machine."""
    other = "default" if machine_int4_layout().name == "32-halves" else "avx2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": other}
    command = [sys.executable, "-c", QUANTIZE_AND_SAVE, str(checkpoint_dir("tiny")), str(tmp_path)]
    layout = subprocess.run(command, capture_output=True, text=True, check=True, env=env, cwd=ROOT).stdout.split()[-1]
    assert layout != machine_int4_layout().name
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["int4_layout"] == layout
    reloaded = DeepseekVLV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    state, state_again = quantized("tiny", "int4").state_dict(), reloaded.state_dict()
    assert all(torch.equal(state[name], state_again[name]) for name in state)


@pytest.mark.parametrize("setting", ["int8", "int4"])
def test_a_row_decodes_alone_as_inside_a_batch(quantized, checkpoint_dir, setting):
    model = quantized("tiny", setting)
    processor = DeepseekVLV2Processor.from_pretrained(checkpoint_dir("tiny"))
    rows = [encode(processor, "Say something.", []), encode(processor, "Which colour?", [picture(300, 200, seed=1)])]
    batch = processor.batchify(rows)
    kwargs = {**generation_kwargs(processor), "max_new_tokens": 8}
    with torch.no_grad():
        together = model.generate(**{k: batch[k] for k in INPUTS}, **kwargs)
        for row, single in enumerate(rows):
            alone = model.generate(**{k: single[k] for k in INPUTS}, **kwargs)[0, single.input_ids.shape[1] :]
            start = batch.input_ids.shape[1]
            assert together[row, start : start + len(alone)].tolist() == alone.tolist()


def stored_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# Run in a fresh process: the peak of anonymous resident memory (the loaded tensors; the page cache of the
# memory-mapped shards is not counted) above the level before loading, sampled every millisecond.
MEASURE_LOAD = """
import sys, threading, time, torch
from deepseek_vl2.models import DeepseekVLV2ForCausalLM

def anonymous() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak, done = [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous())
        time.sleep(0.001)

base = anonymous()
sampler = threading.Thread(target=sample)
sampler.start()
model = DeepseekVLV2ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, quantization=sys.argv[2] or None)
done.set()
sampler.join()
stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(max(peak[0], anonymous()) - base, stored)
"""


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """A bf16 checkpoint whose routed experts dominate its size (~80 MB), in shards of 16 MB."""
    from deepseek_vl2.models import DeepseekVLV2Config
    from deepseek_vl2.testing.checkpoints import published_style_config

    settings = published_style_config("tiny", vocab_size=1024, bos_token_id=0, eos_token_id=1)
    wide = {"hidden_size": 256, "moe_intermediate_size": 256, "n_routed_experts": 64, "num_hidden_layers": 4}
    settings["language_config"].update(wide)
    settings["projector_config"]["n_embed"] = 256
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide")
    DeepseekVLV2ForCausalLM(DeepseekVLV2Config(**settings)).to(torch.bfloat16).save_pretrained(
        path, max_shard_size="16MB"
    )
    return path


def measure_load(path, quantization: str) -> tuple[int, int]:
    """(peak anonymous bytes of loading, bytes of the loaded tensors) in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", MEASURE_LOAD, str(path), quantization]
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=env, cwd=ROOT).stdout
    peak, stored = map(int, output.split()[-2:])
    return peak, stored


def test_loading_quantized_never_holds_the_float_model(wide_checkpoint):
    """Loading int8 peaks at the int8 model's size plus one layer's float experts (the largest group of tensors
    read together), well below the bf16 model's size."""
    float_peak, float_bytes = measure_load(wide_checkpoint, "")
    int8_peak, int8_bytes = measure_load(wide_checkpoint, "int8")
    language = json.loads((wide_checkpoint / "config.json").read_text())["language_config"]
    layer_experts = 3 * language["n_routed_experts"] * language["moe_intermediate_size"] * language["hidden_size"] * 2
    assert int8_bytes < 0.55 * float_bytes
    assert int8_peak <= int8_bytes + layer_experts, (int8_peak, int8_bytes, layer_experts)
    assert int8_peak < 0.6 * float_peak, (int8_peak, float_peak)


def test_short_form_is_the_config_and_float_loading_is_unchanged(quantized, loaded, checkpoint_dir):
    short = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint_dir("tiny"), dtype=torch.float32, quantization="int8")
    long_form = quantized("tiny", "int8")
    assert all(torch.equal(a, b) for a, b in zip(short.state_dict().values(), long_form.state_dict().values()))
    float_model, _ = loaded("tiny")
    assert not getattr(float_model, "is_quantized", False)
    assert not any(isinstance(m, (QuantizedLinear, QuantizedExperts)) for m in float_model.modules())


def test_vision_option_quantizes_the_vision_towers_linears(checkpoint_dir):
    config = DeepseekVL2QuantizationConfig(bits=8, quantize_vision=True)
    model = DeepseekVLV2ForCausalLM.from_pretrained(
        checkpoint_dir("tiny"), dtype=torch.float32, quantization_config=config
    )
    assert all(isinstance(m, QuantizedLinear) for n, m in model.vision.named_modules() if n.endswith(("qkv", "fc1")))
    assert all(p.is_floating_point() for p in model.projector.parameters())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"bits": 3}, "bits must be one of"),
        ({"bits": 4, "group_size": 16}, "group_size must be one of"),
        ({"bits": 8, "group_size": 64}, "for bits=4 only"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        DeepseekVL2QuantizationConfig(**settings)


def test_bad_loading_arguments_fail_before_loading(checkpoint_dir, quantized, tmp_path):
    path = checkpoint_dir("tiny")
    with pytest.raises(ValueError, match="quantization must be one of int8, int4"):
        DeepseekVLV2ForCausalLM.from_pretrained(path, quantization="int3")
    with pytest.raises(ValueError, match="not a multiple of group_size 64"):  # the experts are 32 wide
        DeepseekVLV2ForCausalLM.from_pretrained(
            path, quantization_config=DeepseekVL2QuantizationConfig(bits=4, group_size=64)
        )
    with pytest.raises(ValueError, match="kv_a_proj_with_mqa.weight .* not a multiple of 16"):  # 40 output channels
        DeepseekVLV2ForCausalLM.from_pretrained(checkpoint_dir("small"), quantization_config=SETTINGS["int4"])
    with pytest.raises(ValueError, match="do not support device_map placement 'auto'"):
        DeepseekVLV2ForCausalLM.from_pretrained(path, quantization="int8", device_map="auto")
    with pytest.raises(ValueError, match="not both"):
        DeepseekVLV2ForCausalLM.from_pretrained(path, quantization="int8", quantization_config=SETTINGS["int8"])
    quantized("tiny", "int8").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already quantized with"):
        DeepseekVLV2ForCausalLM.from_pretrained(tmp_path, quantization="int4")
    same = DeepseekVLV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization="int8")
    assert same.language.lm_head.weight.dtype == torch.int8, "the same settings load as saved"


def test_other_quantization_libraries_are_refused_by_name(checkpoint_dir):
    with pytest.raises(
        ValueError, match="BitsAndBytesConfig is not supported .* routed experts .* quantization='int8'"
    ):
        DeepseekVLV2ForCausalLM.from_pretrained(
            checkpoint_dir("tiny"), quantization_config=BitsAndBytesConfig(load_in_8bit=True)
        )
    with pytest.raises(ValueError, match="unsupported quantization_config"):
        DeepseekVLV2ForCausalLM.from_pretrained(checkpoint_dir("tiny"), quantization_config={"quant_method": "torchao"})


def test_a_device_without_a_kernel_is_named():
    assert quantized_kernel(CPU, 8) is Kernel.INT8_WEIGHT_ONLY
    assert quantized_kernel(CPU, 4) is Kernel.INT4_WEIGHT_ONLY
    assert quantized_kernel(CUDA, 8) is quantized_kernel(CUDA, 4) is Kernel.DEQUANTIZED
    DeepseekVL2Quantizer(SETTINGS["int4"], pre_quantized=False).validate_environment(device_map={"": "cuda"})
    supported = "supported are int8 on cpu, int4 on cpu, int8 on cuda, int4 on cuda"
    with pytest.raises(ValueError, match=f"no kernel for int4 weights on mps: {supported}"):
        quantized_kernel(torch.device("mps"), 4)
    with pytest.raises(ValueError, match="no kernel for int8 weights on xpu"):
        DeepseekVL2Quantizer(SETTINGS["int8"], pre_quantized=False).validate_environment(device_map={"": "xpu"})


def test_chat_api_and_cli_quantize_while_loading(checkpoint_dir, quantized, capsys):
    from deepseek_vl2.chat import DeepseekVL2Chat, GenerationSettings
    from deepseek_vl2.cli import main

    path = checkpoint_dir("tiny")
    chat = DeepseekVL2Chat.from_pretrained(path, dtype="fp32", device="cpu", quantization="int8")
    assert isinstance(chat.model.language.lm_head, QuantizedLinear)
    state, expected = chat.model.state_dict(), quantized("tiny", "int8").state_dict()
    assert all(torch.equal(state[name], expected[name]) for name in expected)
    common = [
        "--model_path",
        str(path),
        "--dtype",
        "fp32",
        "--max_new_tokens",
        "4",
        "--greedy",
        "--json",
        "--no-stream",
    ]
    assert main([*common, "--quantize", "int8"]) == 0
    answer = json.loads(capsys.readouterr().out)["answer"]
    settings = GenerationSettings(max_new_tokens=4, greedy=True)
    assert answer == chat.chat("Hello!", settings=settings).answer  # the CLI's prompt without images


def test_quantize_command_saves_a_checkpoint_that_loads_quantized(checkpoint_dir, quantized, tmp_path, capsys):
    from deepseek_vl2.chat import DeepseekVL2Chat
    from deepseek_vl2.cli import main

    out = tmp_path / "int4"
    command = ["quantize", "--model", str(checkpoint_dir("tiny")), "--bits", "4", "--group_size", "32"]
    assert main([*command, "--dtype", "fp32", "--out", str(out)]) == 0
    assert f"saved the int4 model to {out}" in capsys.readouterr().out
    chat = DeepseekVL2Chat.from_pretrained(out, dtype="fp32", device="cpu")  # the folder alone: weights, processor
    state, expected = chat.model.state_dict(), quantized("tiny", "int4").state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[name], expected[name]) for name in expected)
    assert main(["quantize", "--model", str(checkpoint_dir("tiny")), "--bits", "8", "--group_size", "32",
                 "--out", str(tmp_path / "bad")]) == 2  # fmt: skip
    assert "group_size is for bits=4 only" in capsys.readouterr().err


def test_quantizing_a_loaded_model_in_place_equals_quantizing_on_load(checkpoint_dir, quantized):
    from deepseek_vl2.quantization.selection import quantize_in_place

    model = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint_dir("tiny"), dtype=torch.float32)
    quantize_in_place(model, SETTINGS["int4"])
    state, expected = model.state_dict(), quantized("tiny", "int4").state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[name], expected[name]) for name in expected)
