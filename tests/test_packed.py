"""Weights packed for oneDNN: the same bits as PyTorch's own bf16 product, and a model that still behaves as one."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_language import CONFIGS, make_model, random_ids

from deepseek_vl2.models import DeepseekVLV2ForCausalLM, kernels, packed
from deepseek_vl2.models.cache import DeepseekV2Cache
from deepseek_vl2.models.kernels import Kernel, Op
from deepseek_vl2.models.packed import Linear, pack_weights, packed_modules, unpack_weights
from deepseek_vl2.quantization import DeepseekVL2QuantizationConfig
from deepseek_vl2.quantization.selection import quantize_in_place

pytestmark = pytest.mark.skipif(
    not packed.packing_available(), reason="this CPU has no native bf16 for oneDNN: nothing is packed here"
)
BF16 = torch.bfloat16


@pytest.fixture
def packing_on():
    packed.pack_by_default(True)
    yield
    packed.pack_by_default(None)


@pytest.fixture
def original_calls(monkeypatch):
    """Every product on PyTorch's default (oneDNN) call and the experts one at a time, as the original runs."""
    kernels.time_kernels(False)
    monkeypatch.setitem(kernels._RULES, Op.MATMUL, lambda device, dtype, rows: Kernel.TORCH_DEFAULT)
    monkeypatch.setitem(kernels._RULES, Op.EXPERTS, lambda device, dtype, pairs: Kernel.SORTED)
    yield
    kernels.time_kernels(False)


@pytest.mark.parametrize("shape", [(1,), (4,), (37,), (2, 3)])
def test_a_packed_linear_gives_pytorchs_own_bf16_product_bit_for_bit(shape, packing_on):
    linear = Linear(96, 80, bias=False).to(BF16)
    x = torch.randn(*shape, 96).to(BF16)
    strided = torch.randn(*shape, 2 * 96).to(BF16)[..., ::2]  # a view that is not contiguous
    expected, expected_strided = F.linear(x, linear.weight), F.linear(strided, linear.weight)
    linear.pack()
    assert linear.is_packed and linear.weight.is_meta and linear.weight.shape == (80, 96)
    assert torch.equal(linear(x), expected)
    assert torch.equal(linear(strided), expected_strided)


def test_a_linear_layer_with_a_bias_stays_as_it_is(packing_on):
    linear = Linear(96, 80, bias=True).to(BF16)
    linear.pack()
    assert not linear.is_packed and not linear.weight.is_meta


@pytest.mark.parametrize("name", ["mha_dynamic_rope", "mla", "group_limited_greedy"])
def test_a_packed_decoder_keeps_the_original_calls_bits_in_prefill_and_decode(name, packing_on, original_calls):
    model = make_model(**CONFIGS[name]).to(BF16)
    ids = random_ids(3, 11)

    def logits():
        cache = DeepseekV2Cache(config=model.config)
        with torch.no_grad():
            prefill = model(ids, cache=cache, use_cache=True).logits
            step = model(prefill[:, -1:].argmax(-1), cache=cache, use_cache=True).logits
            one_row = model(ids[:1, :5]).logits[:, -1]
        return prefill, step, one_row

    expected = logits()
    assert pack_weights(model) > 0
    for got, want in zip(logits(), expected):
        assert torch.equal(got, want)


def test_a_packed_model_keeps_its_parameters_shapes_and_state_dict(packing_on):
    model = make_model(**CONFIGS["mla"]).to(BF16)
    shapes = {name: (p.shape, p.dtype) for name, p in model.named_parameters()}
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = random_ids(2, 9)
    with torch.no_grad():
        expected = model(ids).logits
    assert pack_weights(model) > 0
    assert {name: (p.shape, p.dtype) for name, p in model.named_parameters()} == shapes
    packed_state = model.state_dict()
    assert list(packed_state) == list(state)
    assert all(torch.equal(packed_state[name], tensor) for name, tensor in state.items())
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model)(ids).logits, expected)
        assert model.cpu() is model and packed_modules(model) > 0  # staying on the CPU in bf16 keeps the packing
        as_float = copy.deepcopy(model).to(torch.float32)
        assert packed_modules(as_float) == 0
        assert all(torch.equal(as_float.state_dict()[name], tensor.float()) for name, tensor in state.items())


def test_loading_a_state_dict_into_a_packed_model_loads_its_values(packing_on):
    model, other = make_model().to(BF16), make_model().to(BF16)
    pack_weights(model)
    other_state = {name: tensor * 2 for name, tensor in other.state_dict().items()}
    model.load_state_dict(other_state)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in other_state.items())


def test_a_tied_lm_head_stays_as_it_is(packing_on):
    model = make_model(tie_word_embeddings=True).to(BF16)
    model.tie_weights()
    pack_weights(model)
    assert not model.lm_head.is_packed and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.o_proj.is_packed


def test_quantizing_a_packed_model_quantizes_its_values(checkpoint_dir):
    config = DeepseekVL2QuantizationConfig.from_short_form("int8")
    models = {}
    for packing in (False, True):
        packed.pack_by_default(packing)
        try:
            models[packing] = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint_dir("tiny"), dtype=BF16)
        finally:
            packed.pack_by_default(None)
        quantize_in_place(models[packing], config)
    plain_state, packed_state = models[False].state_dict(), models[True].state_dict()
    assert list(packed_state) == list(plain_state)
    assert all(torch.equal(packed_state[name], tensor) for name, tensor in plain_state.items())


def test_from_pretrained_packs_bf16_on_cpu_and_saves_what_it_loaded(checkpoint_dir, tmp_path, packing_on):
    path = checkpoint_dir("tiny")
    model = DeepseekVLV2ForCausalLM.from_pretrained(path, dtype=BF16).eval()
    assert packed_modules(model) > 0 and packed_modules(model.vision) == 0
    assert packed_modules(DeepseekVLV2ForCausalLM.from_pretrained(path, dtype=torch.float32)) == 0
    model.save_pretrained(tmp_path)
    reloaded = DeepseekVLV2ForCausalLM.from_pretrained(tmp_path, dtype=BF16).eval()
    ids = random_ids(1, 7, seed=3) % model.config.language_config.vocab_size
    with torch.no_grad():
        assert torch.equal(reloaded.language(ids).logits, model.language(ids).logits)
    unpack_weights(reloaded)
    assert packed_modules(reloaded) == 0 and not reloaded.language.lm_head.weight.is_meta


def test_packing_turned_off_leaves_every_weight_in_place(checkpoint_dir):
    packed.pack_by_default(False)
    try:
        model = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint_dir("tiny"), dtype=BF16)
    finally:
        packed.pack_by_default(None)
    assert packed_modules(model) == 0


def test_experts_stay_stacked_for_transformers_own_implementations(packing_on):
    model = make_model(experts="batched_mm").to(BF16)
    pack_weights(model)
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj")]
    assert experts and not any(m.is_packed for m in experts)
    assert model.model.layers[0].self_attn.o_proj.is_packed
