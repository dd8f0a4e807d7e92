"""DeepseekV2 language model: same logits as the original's math, cache, padding, generation, MoE paths."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping

from deepseek_vl2.models.configuration import DeepseekV2Config
import deepseek_vl2.models.cache as cache_module
import deepseek_vl2.models.kernels as kernels
import deepseek_vl2.models.language as language
from deepseek_vl2.models.cache import cache_capacity
from deepseek_vl2.models.kernels import Kernel, Op, matmuls_on
from deepseek_vl2.models.language import (
    DeepseekV2Cache,
    DeepseekV2Experts,
    DeepseekV2ForCausalLM,
    DeepseekV2RMSNorm,
    attend_one_query,
    expert_weight_conversions,
    positions_from_mask,
)

VOCAB = 300
PAD = 2


def make_config(**overrides) -> DeepseekV2Config:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=0,
        eos_token_id=1,
    )
    settings.update(overrides)
    return DeepseekV2Config(**settings)


CONFIGS = {
    "mha_gqa_bias": dict(use_mla=False, num_key_value_heads=2, attention_bias=True),
    "mha_dynamic_rope": dict(use_mla=False, max_position_embeddings=8, rope_scaling={"type": "dynamic", "factor": 2.0}),
    "mla": dict(),
    "mla_linear_rope": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "mla_q_lora_yarn": dict(
        q_lora_rank=24,
        attention_bias=True,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,  # differs from mscale_all_dim so that both the cos/sin and the softmax factor show
            "mscale_all_dim": 0.8,
        },
    ),
    "base_like_noaux_tc": dict(
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.0,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
    ),
    "group_limited_greedy": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights that keep activations O(1), with non-trivial norms and biases, so that mistakes show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 1:
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[-1]))
    return model


def make_model(experts="eager", **overrides) -> DeepseekV2ForCausalLM:
    model = DeepseekV2ForCausalLM(make_config(**overrides)).eval()
    model.set_experts_implementation(experts)
    return randomize(model)


# ----------------------------------------------------------------------------------------------------------------
# Independent reference: a direct transcription of the original modeling_deepseek.py inference math
# (rope cos/sin tables, eager softmax attention with expanded MLA keys/values, per-expert MoE loop).
# ----------------------------------------------------------------------------------------------------------------


def ref_rms_norm(x, weight, eps):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def ref_get_mscale(scale, mscale):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def ref_rope_tables(config, dim, seq_len):
    base, scaling = config.rope_theta, config.rope_scaling
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    t = torch.arange(seq_len).float()
    mscale = 1.0
    if scaling is not None and scaling["type"] == "linear":
        t = t / scaling["factor"]
    elif scaling is not None and scaling["type"] == "dynamic":
        factor, max_pos = scaling["factor"], config.max_position_embeddings
        if seq_len > max_pos:
            base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    elif scaling is not None and scaling["type"] == "yarn":
        factor, orig = scaling["factor"], scaling["original_max_position_embeddings"]
        freq_extra = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        freq_inter = 1.0 / (factor * base ** (torch.arange(0, dim, 2).float() / dim))

        def corr_dim(rot):
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        low = max(math.floor(corr_dim(scaling["beta_fast"])), 0)
        high = min(math.ceil(corr_dim(scaling["beta_slow"])), dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2).float() - low) / (high - low), 0, 1)
        inv_freq_mask = 1.0 - ramp
        inv_freq = freq_inter * (1 - inv_freq_mask) + freq_extra * inv_freq_mask
        mscale = ref_get_mscale(factor, scaling["mscale"]) / ref_get_mscale(factor, scaling["mscale_all_dim"])
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * mscale, emb.sin() * mscale


def ref_rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def ref_apply_rope(x, cos, sin, interleaved):
    if interleaved:
        b, h, s, d = x.shape
        x = x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
    return x * cos[None, None] + ref_rotate_half(x) * sin[None, None]


def ref_attention_probs(scores):
    seq = scores.shape[-1]
    causal = torch.full((seq, seq), torch.finfo(scores.dtype).min).triu(1)
    return F.softmax(scores + causal, dim=-1, dtype=torch.float32).to(scores.dtype)


def ref_linear(x, params, prefix):
    return F.linear(x, params[prefix + ".weight"], params.get(prefix + ".bias"))


def ref_mha(config, p, x, cos, sin):
    b, s, _ = x.shape
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = ref_linear(x, p, "q_proj").view(b, s, heads, hd).transpose(1, 2)
    k = ref_linear(x, p, "k_proj").view(b, s, kv_heads, hd).transpose(1, 2)
    v = ref_linear(x, p, "v_proj").view(b, s, kv_heads, hd).transpose(1, 2)
    q, k = ref_apply_rope(q, cos, sin, False), ref_apply_rope(k, cos, sin, False)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    probs = ref_attention_probs(q @ k.transpose(2, 3) / math.sqrt(hd))
    return ref_linear((probs @ v).transpose(1, 2).reshape(b, s, -1), p, "o_proj")


def ref_mla(config, p, x, cos, sin):
    b, s, _ = x.shape
    heads, vd = config.num_attention_heads, config.v_head_dim
    nope, rope = config.qk_nope_head_dim, config.qk_rope_head_dim
    if config.q_lora_rank is None:
        q = ref_linear(x, p, "q_proj")
    else:
        q = ref_linear(ref_rms_norm(ref_linear(x, p, "q_a_proj"), p["q_a_layernorm.weight"], 1e-6), p, "q_b_proj")
    q = q.view(b, s, heads, nope + rope).transpose(1, 2)
    q_nope, q_pe = q.split([nope, rope], dim=-1)
    compressed, k_pe = ref_linear(x, p, "kv_a_proj_with_mqa").split([config.kv_lora_rank, rope], dim=-1)
    k_pe = k_pe.view(b, s, 1, rope).transpose(1, 2)
    kv = ref_linear(ref_rms_norm(compressed, p["kv_a_layernorm.weight"], 1e-6), p, "kv_b_proj")
    k_nope, v = kv.view(b, s, heads, nope + vd).transpose(1, 2).split([nope, vd], dim=-1)
    q_pe, k_pe = ref_apply_rope(q_pe, cos, sin, True), ref_apply_rope(k_pe, cos, sin, True)
    q = torch.cat([q_nope, q_pe], dim=-1)
    k = torch.cat([k_nope, k_pe.expand(b, heads, s, rope)], dim=-1)
    scale = (nope + rope) ** -0.5
    if config.rope_scaling is not None and config.rope_scaling.get("mscale_all_dim", 0):
        scale *= ref_get_mscale(config.rope_scaling["factor"], config.rope_scaling["mscale_all_dim"]) ** 2
    probs = ref_attention_probs(q @ k.transpose(2, 3) * scale)
    return ref_linear((probs @ v).transpose(1, 2).reshape(b, s, -1), p, "o_proj")


def ref_mlp(config, x, gate, up, down):
    return F.linear(ACT(config)(F.linear(x, gate)) * F.linear(x, up), down)


def ACT(config):
    return {"silu": F.silu, "gelu": F.gelu}[config.hidden_act]


def ref_gate(config, p, x):
    n = x.shape[0]
    logits = F.linear(x.float(), p["gate.weight"].float())
    scores = logits.softmax(-1) if config.scoring_func == "softmax" else logits.sigmoid()
    experts, groups, k = config.n_routed_experts, config.n_group, config.num_experts_per_tok

    def keep_groups(values, group_scores):
        group_idx = torch.topk(group_scores, k=config.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(n, groups, experts // groups).reshape(n, -1)
        return values.masked_fill(~score_mask.bool(), 0.0)

    if config.topk_method == "greedy":
        weight, idx = torch.topk(scores, k=k, dim=-1, sorted=False)
    elif config.topk_method == "group_limited_greedy":
        group_scores = scores.view(n, groups, -1).max(dim=-1).values
        weight, idx = torch.topk(keep_groups(scores, group_scores), k=k, dim=-1, sorted=False)
    else:
        choice = scores + p["gate.e_score_correction_bias"].unsqueeze(0)
        group_scores = choice.view(n, groups, -1).topk(2, dim=-1)[0].sum(dim=-1)
        _, idx = torch.topk(keep_groups(choice, group_scores), k=k, dim=-1, sorted=False)
        weight = scores.gather(1, idx)
    if k > 1 and config.norm_topk_prob:
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20) * config.routed_scaling_factor
    else:
        weight = weight * config.routed_scaling_factor
    return idx, weight


def ref_moe_loop(config, gate_up, down, x, idx, weight):
    """Per-expert loop over stacked weights [E, 2I, H] / [E, H, I]: outputs weighted and summed in float32."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    inter = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        tokens, slots = torch.nonzero(idx == e, as_tuple=True)
        if len(tokens):
            y = ref_mlp(config, x[tokens], gate_up[e, :inter], gate_up[e, inter:], down[e])
            out.index_add_(0, tokens, y.float() * weight[tokens, slots, None])
    return out.to(x.dtype)


def ref_moe(config, p, x):
    b, s, h = x.shape
    flat = x.reshape(-1, h)
    idx, weight = ref_gate(config, p, flat)
    y = ref_moe_loop(config, p["experts.gate_up_proj"], p["experts.down_proj"], flat, idx, weight).view(b, s, h)
    if config.n_shared_experts:
        y = y + ref_mlp(
            config,
            x,
            p["shared_experts.gate_proj.weight"],
            p["shared_experts.up_proj.weight"],
            p["shared_experts.down_proj.weight"],
        )
    return y


def sub_params(state, prefix):
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@torch.no_grad()
def reference_logits(model, input_ids):
    config, state = model.config, model.state_dict()
    seq = input_ids.shape[1]
    dim = config.qk_rope_head_dim if config.use_mla else config.head_dim
    cos, sin = ref_rope_tables(config, dim, seq)
    h = F.embedding(input_ids, state["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        p = sub_params(state, f"model.layers.{i}.")
        attn = ref_mla if config.use_mla else ref_mha
        x = ref_rms_norm(h, p["input_layernorm.weight"], config.rms_norm_eps)
        h = h + attn(config, sub_params(p, "self_attn."), x, cos, sin)
        x = ref_rms_norm(h, p["post_attention_layernorm.weight"], config.rms_norm_eps)
        mlp = sub_params(p, "mlp.")
        if config.is_moe_layer(i):
            h = h + ref_moe(config, mlp, x)
        else:
            h = h + ref_mlp(config, x, mlp["gate_proj.weight"], mlp["up_proj.weight"], mlp["down_proj.weight"])
    h = ref_rms_norm(h, state["model.norm.weight"], config.rms_norm_eps)
    return F.linear(h, state["lm_head.weight"])


# ----------------------------------------------------------------------------------------------------------------


def random_ids(batch, seq, seed=0):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_original_math(name):
    model = make_model(**CONFIGS[name])
    ids = random_ids(2, 12)
    expected = reference_logits(model, ids)
    with torch.no_grad():
        logits = model(ids).logits
    assert expected.abs().mean() > 0.1  # the comparison is not between near-zero numbers
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_reference_sees_rope_scaling():
    """Sanity check of the comparison above: rope scaling and MoE routing change the logits noticeably."""
    ids = random_ids(1, 12)
    plain = reference_logits(make_model(), ids)
    yarn = make_model(**CONFIGS["mla_q_lora_yarn"])
    assert (reference_logits(yarn, ids) - plain).abs().max() > 1e-2
    dynamic = make_model(**CONFIGS["mha_dynamic_rope"])
    no_dynamic = make_model(use_mla=False, max_position_embeddings=8)
    assert (reference_logits(dynamic, ids) - reference_logits(no_dynamic, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_transformers_experts_implementations_match(experts):
    ids = random_ids(2, 10)
    eager = make_model(**CONFIGS["base_like_noaux_tc"])
    other = make_model(experts=experts, **CONFIGS["base_like_noaux_tc"])
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, eager(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cache_class", [DynamicCache, DeepseekV2Cache])
@pytest.mark.parametrize("name", ["mha_gqa_bias", "mla_q_lora_yarn", "base_like_noaux_tc"])
def test_incremental_decoding_matches_full_forward(name, cache_class, monkeypatch):
    monkeypatch.setattr(cache_module, "CACHE_BLOCK", 3)  # our cache's buffers then grow on most steps
    model = make_model(**CONFIGS[name])
    ids = random_ids(2, 11)
    with torch.no_grad():
        full = model(ids).logits
        cache = cache_class(config=model.config)
        pieces = [model(ids[:, :4], cache=cache).logits, model(ids[:, 4:7], cache=cache).logits]  # chunked prefill
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(7, 11)]  # one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    assert cache.get_seq_length() == 11


def test_mla_cache_holds_compressed_latent():
    model = make_model()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(random_ids(2, 5), cache=cache)
    latent, k_rope = cache.layers[0].keys, cache.layers[0].values
    assert latent.shape == (2, 1, 5, model.config.kv_lora_rank)
    assert k_rope.shape == (2, 1, 5, model.config.qk_rope_head_dim)


def test_default_cache_appends_in_place_and_masks_its_spare_room():
    model = make_model(use_mla=False)
    ids = random_ids(1, 9)
    with torch.no_grad():
        expected = model(ids).logits
        out = model(ids[:, :5])
        layer = out.cache.layers[0]
        assert isinstance(out.cache, DeepseekV2Cache) and out.cache.get_seq_length() == 5
        assert layer.keys.shape[-2] == 5, "a prefill holds just what it wrote"
        steps = [model(ids[:, 5:6], cache=out.cache).logits]
        buffer = layer.keys
        assert buffer.shape[-2] == cache_module.CACHE_BLOCK and buffer[..., 6:, :].abs().sum() == 0
        steps += [model(ids[:, t : t + 1], cache=out.cache).logits for t in range(6, 9)]
        assert layer.keys.data_ptr() == buffer.data_ptr(), "a decode step must not reallocate the cache"
        torch.testing.assert_close(torch.cat(steps, dim=1), expected[:, 5:], rtol=0, atol=1e-5)
        out.cache.crop(-2)
        assert out.cache.get_seq_length() == 7
        again = model(ids[:, 7:9], cache=out.cache).logits
        torch.testing.assert_close(again, expected[:, 7:], rtol=0, atol=1e-5)


def test_generate_uses_our_cache_and_beam_search_reorders_it():
    model = make_model(**CONFIGS["mla"])
    model.generation_config.pad_token_id = PAD
    ids = random_ids(2, 5)
    kwargs = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, num_beams=3)
    ours = model.generate(ids, return_dict_in_generate=True, **kwargs)
    assert isinstance(ours.cache, DeepseekV2Cache)
    plain = model.generate(ids, cache=DynamicCache(config=model.config), **kwargs)
    assert torch.equal(ours.sequences, plain)


@pytest.mark.parametrize(
    "prefill, chunk, decoded",  # crossing CACHE_BLOCKs of 4; a last chunk of one token; a one-token prompt
    [(6, None, 0), (6, None, 11), (7, None, 9), (8, 3, 9), (9, 4, 7), (1, None, 9)],
)
def test_cache_capacity_is_what_the_buffers_hold(prefill, chunk, decoded, monkeypatch):
    monkeypatch.setattr(cache_module, "CACHE_BLOCK", 4)
    model = make_model(**CONFIGS["mla"])
    ids = random_ids(1, prefill + decoded)
    cache = DeepseekV2Cache(config=model.config)
    chunk = chunk or prefill
    steps = [(start, min(start + chunk, prefill)) for start in range(0, prefill, chunk)]
    steps += [(t, t + 1) for t in range(prefill, prefill + decoded)]
    one_token_steps = 0
    with torch.no_grad():
        for start, end in steps:
            model(ids[:, start:end], cache=cache)
            one_token_steps += end - start == 1
            held = {buffer.shape[-2] for layer in cache.layers for buffer in (layer.keys, layer.values)}
            assert held == {cache_capacity(end, decoded=one_token_steps)}, (start, end)


def test_cache_capacity_refuses_more_decoded_than_written_tokens():
    with pytest.raises(ValueError, match="decoded"):
        cache_capacity(3, decoded=4)


@pytest.mark.parametrize("continued", [4, 7])  # within the buffers' spare room, and past it
@pytest.mark.parametrize("name", ["mha_gqa_bias", "mla_q_lora_yarn"])
def test_crop_then_prefill_gives_a_fresh_prefills_logits(name, continued, monkeypatch):
    monkeypatch.setattr(cache_module, "CACHE_BLOCK", 4)
    model = make_model(**CONFIGS[name])
    kept = 6
    earlier, later = random_ids(2, 12, seed=1), random_ids(2, kept + continued + 2, seed=2)
    later[:, :kept] = earlier[:, :kept]  # the prefix the two share
    with torch.no_grad():
        expected = model(later).logits[:, kept:]
        cache = DeepseekV2Cache(config=model.config)
        model(earlier[:, :9], cache=cache)
        for t in range(9, 12):  # decode steps: spare room, and positions past the prefix to forget
            model(earlier[:, t : t + 1], cache=cache)
        cache.crop(kept - cache.get_seq_length())
        assert cache.get_seq_length() == kept
        logits = [model(later[:, kept : kept + continued], cache=cache).logits]
        logits += [model(later[:, t : t + 1], cache=cache).logits for t in range(kept + continued, later.shape[1])]
    torch.testing.assert_close(torch.cat(logits, dim=1), expected, rtol=0, atol=1e-5)


def test_crop_refuses_a_positive_count():
    cache = DeepseekV2Cache(config=make_config())
    with pytest.raises(ValueError, match="negative number"):
        cache.crop(3)


def test_mla_default_cache_holds_compressed_latent():
    model = make_model()
    with torch.no_grad():
        cache = model(random_ids(2, 5)).cache
    latent, k_rope = cache.layers[0].keys, cache.layers[0].values
    assert latent.shape == (2, 1, 5, model.config.kv_lora_rank)
    assert k_rope.shape == (2, 1, 5, model.config.qk_rope_head_dim)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_one_query_attention_equals_sdpa(kv_heads, mask_kind):
    g = torch.Generator().manual_seed(kv_heads)
    query = torch.randn(2, 4, 1, 16, generator=g)
    key, value = torch.randn(2, kv_heads, 9, 16, generator=g), torch.randn(2, kv_heads, 9, 12, generator=g)
    mask = torch.rand(2, 1, 1, 9, generator=g) > 0.3
    mask[..., -1] = True
    mask = {"none": None, "bool": mask, "additive": torch.zeros(mask.shape).masked_fill(~mask, -1e9)}[mask_kind]
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3, enable_gqa=kv_heads < 4)
    split = [10, 6]  # the score as a sum over parts of the features, as MLA's latent and roped parts
    parts = attend_one_query(query.split(split, -1), key.split(split, -1), value, mask, 0.3)
    torch.testing.assert_close(parts, expected, rtol=0, atol=1e-5)


def test_one_token_cpu_forward_runs_on_native_gemv_and_restores_onednn(monkeypatch):
    model = make_model(**CONFIGS["mha_gqa_bias"])
    seen = []
    original = model.lm_head.forward
    monkeypatch.setattr(model.lm_head, "forward", lambda x: seen.append(torch.backends.mkldnn.enabled) or original(x))
    cache = DeepseekV2Cache(config=model.config)
    with torch.no_grad():
        model(random_ids(2, 4), cache=cache)  # prefill: oneDNN
        model(random_ids(2, 1), cache=cache)  # two rows: oneDNN
        model(random_ids(1, 3))
        model(random_ids(1, 1))  # one token: native
    assert seen == [True, True, True, False]
    assert torch.backends.mkldnn.enabled
    monkeypatch.setattr(model.lm_head, "forward", lambda x: 1 / 0)
    with pytest.raises(ZeroDivisionError), torch.no_grad():
        model(random_ids(1, 1))
    assert torch.backends.mkldnn.enabled, "restored after an error too"


@pytest.mark.parametrize("name", ["mha_gqa_bias", "base_like_noaux_tc"])
def test_bf16_one_token_decode_is_as_close_to_float32_as_the_plain_path(name, monkeypatch):
    exact = make_model(**CONFIGS[name])
    model = make_model(**CONFIGS[name]).to(torch.bfloat16)
    ids = random_ids(1, 8)

    def last_token_logits(cache):
        with torch.no_grad():
            model(ids[:, :7], cache=cache)
            return model(ids[:, 7:], cache=cache).logits.float()

    with torch.no_grad():
        expected = exact(ids).logits[:, 7:]
    fast = last_token_logits(DeepseekV2Cache(config=model.config))
    plain = {Op.MATMUL: Kernel.TORCH_DEFAULT, Op.ATTENTION: Kernel.SDPA}  # no GEMV switch, no one-query attention
    monkeypatch.setattr(language, "choose", lambda op, *args, **kw: plain.get(op) or kernels.choose(op, *args, **kw))
    monkeypatch.setattr(
        language,
        "matmuls_running",
        lambda op, *args, **kw: matmuls_on(plain[op]) if op in plain else kernels.matmuls_running(op, *args, **kw),
    )
    plain = last_token_logits(DynamicCache(config=model.config))
    plain_error = (plain - expected).abs().max()
    assert 0 < plain_error < 0.1  # bfloat16 rounding, for scale
    torch.testing.assert_close(fast, expected, rtol=0, atol=2 * plain_error.item())


def test_latent_space_attention_equals_expanded():
    model = make_model(**CONFIGS["mla_q_lora_yarn"])
    attention = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    heads, nope, rope, rank = 4, 16, 8, 32
    q_nope, q_rope = torch.randn(2, heads, 3, nope, generator=g), torch.randn(2, heads, 3, rope, generator=g)
    latent, k_rope = torch.randn(2, 1, 9, rank, generator=g), torch.randn(2, 1, 9, rope, generator=g)
    mask = torch.rand(2, 1, 3, 9, generator=g) > 0.3
    mask[..., 0] = True
    with torch.no_grad():
        expanded = attention.attend_expanded(q_nope, q_rope, latent, k_rope, mask)
        absorbed = attention.attend_in_latent_space(q_nope, q_rope, latent, k_rope, mask)
    torch.testing.assert_close(absorbed, expanded, rtol=0, atol=1e-5)


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


@pytest.mark.parametrize("name", ["mha_gqa_bias", "mla_q_lora_yarn"])
def test_left_padded_rows_match_rows_alone(name):
    model = make_model(**CONFIGS[name])
    rows = [random_ids(1, 9, seed=1)[0], random_ids(1, 4, seed=2)[0]]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        next_token = torch.tensor([[5], [6]])
        cache = DynamicCache(config=model.config)
        model(ids, attention_mask=mask, cache=cache)
        step = model(next_token, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), cache=cache)
        for i, row in enumerate(rows):
            alone = model(row[None]).logits
            assert torch.isfinite(batched[i]).all()
            torch.testing.assert_close(batched[i, -len(row) :], alone[0], rtol=0, atol=1e-5)
            alone_step = model(torch.cat([row, next_token[i]])[None]).logits[0, -1]
            torch.testing.assert_close(step.logits[i, -1], alone_step, rtol=0, atol=1e-5)


def test_positions_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask, 5).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert positions_from_mask(mask, 1).tolist() == [[2], [4]]


def test_left_padded_forward_rotates_by_real_token_positions(monkeypatch):
    model = make_model()
    rotary, seen = model.model.rotary_emb, []
    original = rotary.forward
    monkeypatch.setattr(rotary, "forward", lambda pos, *rest: seen.append(pos) or original(pos, *rest))
    ids, mask = left_pad([random_ids(1, 4)[0], random_ids(1, 2)[0]])
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert seen[0].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]


def greedy_without_cache(model, ids, steps):
    """Plain argmax loop recomputing the whole sequence each step: the generation ground truth."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("name", ["mha_gqa_bias", "mla"])
def test_generate_greedy_with_ids_and_embeds(name):
    model = make_model(**CONFIGS[name])
    model.generation_config.pad_token_id = PAD
    ids = random_ids(1, 6)
    expected = greedy_without_cache(model, ids, 6)
    from_ids = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(
        inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, eos_token_id=None
    )
    assert torch.equal(from_ids, expected)
    assert torch.equal(from_embeds, expected[:, 6:])


def test_generate_from_one_token_prompt():
    model = make_model()
    ids = random_ids(1, 1)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert torch.equal(out, greedy_without_cache(model, ids, 4))


def test_generate_left_padded_batch_with_embeds():
    model = make_model(**CONFIGS["base_like_noaux_tc"])
    model.generation_config.pad_token_id = PAD
    rows = [random_ids(1, 7, seed=3)[0], random_ids(1, 3, seed=4)[0]]
    ids, mask = left_pad(rows)
    embeds = model.get_input_embeddings()(ids)
    out = model.generate(
        inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None
    )
    for i, row in enumerate(rows):
        assert torch.equal(out[i], greedy_without_cache(model, row[None], 5)[0, len(row) :])


def test_generate_continues_from_caller_prefilled_cache():
    model = make_model(**CONFIGS["mla_q_lora_yarn"])
    model.generation_config.pad_token_id = PAD
    ids = random_ids(1, 8)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :5], cache=cache)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=4, do_sample=False, eos_token_id=None
    )
    assert torch.equal(out, greedy_without_cache(model, ids, 4))


def test_generate_sampling_runs_and_is_seeded():
    model = make_model(**CONFIGS["mha_gqa_bias"])
    model.generation_config.pad_token_id = PAD
    ids = random_ids(2, 5)
    kwargs = dict(max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9, eos_token_id=None)
    torch.manual_seed(0)
    first = model.generate(ids, **kwargs)
    torch.manual_seed(0)
    second = model.generate(ids, **kwargs)
    assert first.shape == (2, 11) and torch.equal(first, second)
    assert ((first >= 0) & (first < VOCAB)).all()


def test_prefill_computes_only_kept_logits_in_model_dtype():
    model = make_model().to(torch.bfloat16)
    with torch.no_grad():
        out = model(random_ids(2, 7), logits_to_keep=1)
    assert out.logits.shape == (2, 1, VOCAB) and out.logits.dtype == torch.bfloat16


def test_loss_is_next_token_cross_entropy():
    model = make_model()
    ids = random_ids(2, 6)
    with torch.no_grad():
        out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


# ---------------------------------------------------------------- experts --------------------------------------


def make_experts(seed=0):
    config = make_config(n_routed_experts=8, num_experts_per_tok=3)
    config._experts_implementation = "eager"
    experts = randomize(DeepseekV2Experts(config), seed)
    return config, experts


@pytest.mark.parametrize("tokens", [1, 5, 40])  # each expert in place (3 and 15 pairs), sorted segments (120 pairs)
def test_experts_equal_per_expert_loop(tokens):
    config, experts = make_experts()
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, config.hidden_size, generator=g)
    index = torch.rand(tokens, config.n_routed_experts, generator=g).argsort(-1)[:, :3]
    weights = torch.rand(tokens, 3, generator=g)
    expected = ref_moe_loop(config, experts.gate_up_proj.detach(), experts.down_proj.detach(), x, index, weights)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, index, weights), expected, rtol=0, atol=1e-5)
        pairs = experts._run_gathered(x, index).view(tokens, 3, -1)  # the accelerator path, run here on CPU
        torch.testing.assert_close((pairs * weights.unsqueeze(-1)).sum(1), expected, rtol=0, atol=1e-5)
        segments = experts._run_sorted(x, index, weights)
        torch.testing.assert_close(segments, expected, rtol=0, atol=1e-5)


def test_experts_on_cpu_read_weights_in_place(monkeypatch):
    config, experts = make_experts()
    monkeypatch.setattr(DeepseekV2Experts, "_run_gathered", lambda *args: 1 / 0)
    x, index = torch.randn(4, config.hidden_size), torch.randint(0, 8, (4, 3))
    with torch.no_grad():
        experts(x, index, torch.rand(4, 3))


def test_bf16_experts_paths_for_a_decode_step_agree():
    """A decode step may run either path (``kernels`` measures which is faster inside decode steps)."""
    config, experts = make_experts()
    experts.to(torch.bfloat16)
    x, index, weights = torch.randn(2, 64).to(torch.bfloat16), torch.tensor([[0, 3, 5], [5, 6, 7]]), torch.rand(2, 3)
    with torch.no_grad():
        each, by_expert = (experts._run(path, x, index, weights) for path in (Kernel.EACH_EXPERT, Kernel.SORTED))
    torch.testing.assert_close(each, by_expert, rtol=0, atol=2e-2)


def test_a_lone_pairs_expert_runs_on_gemv_a_shared_one_on_the_steps_kernel(monkeypatch, fresh_timer):
    """Inside a decode step still being tuned, with the step's products on oneDNN: a lone pair's expert runs on
    PyTorch's GEMV (not on a first answer that the tuning would never time), a shared expert once on oneDNN."""
    config, experts = make_experts()
    experts.to(torch.bfloat16)
    calls = []
    gate_up = DeepseekV2Experts._gate_up

    def spy(self, tokens, expert):
        calls.append((expert, tokens.shape[0] if tokens.ndim == 2 else 1, torch.backends.mkldnn.enabled))
        return gate_up(self, tokens, expert)

    monkeypatch.setattr(DeepseekV2Experts, "_gate_up", spy)
    x, index, weights = torch.randn(2, 64).to(torch.bfloat16), torch.tensor([[0, 3, 5], [5, 6, 7]]), torch.rand(2, 3)
    with torch.no_grad(), kernels.decode_step(torch.device("cpu"), torch.bfloat16, rows=2), matmuls_on(Kernel.ONEDNN):
        experts._run(Kernel.EACH_EXPERT, x, index, weights)
    assert sorted(calls) == [(0, 1, False), (3, 1, False), (5, 2, True), (6, 1, False), (7, 1, False)]


def count_host_syncs(monkeypatch):
    calls = []
    for method in ("tolist", "item", "cpu", "numpy"):
        original = getattr(torch.Tensor, method)

        def spy(self, *args, _original=original, **kwargs):
            calls.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, spy)
    return calls


def test_experts_decode_step_on_an_accelerator_has_no_host_sync(monkeypatch):
    config, experts = make_experts()
    experts.to("meta")  # not a CPU: the accelerator path (a meta tensor cannot be read on the host either)
    x, index, weights = (
        t.to("meta") for t in (torch.randn(2, 64), torch.tensor([[0, 3, 5], [5, 6, 7]]), torch.rand(2, 3))
    )
    calls = count_host_syncs(monkeypatch)
    with torch.no_grad():
        out = experts(x, index, weights)
    assert calls == [] and out.shape == (2, config.hidden_size)


def test_experts_prefill_has_one_host_sync(monkeypatch):
    config, experts = make_experts()
    x, index = torch.randn(30, config.hidden_size), torch.randint(0, 8, (30, 3))
    calls = count_host_syncs(monkeypatch)
    with torch.no_grad():
        experts(x, index, torch.rand(30, 3))
    assert len(calls) == 1


# ---------------------------------------------------------------- loading & config -----------------------------


class ConvertingLM(DeepseekV2ForCausalLM):
    """A test-only class name under which the expert converters are registered (the package registers them
    for the whole vision-language model)."""


register_checkpoint_conversion_mapping("ConvertingLM", expert_weight_conversions(), overwrite=True)


def test_per_expert_checkpoint_loads_into_stacked_experts(tmp_path):
    from safetensors.torch import save_file

    model = make_model(**CONFIGS["base_like_noaux_tc"])
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    inter = model.config.moe_intermediate_size
    for layer in range(1, model.config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up, down = state.pop(prefix + "gate_up_proj"), state.pop(prefix + "down_proj")
        for e in range(model.config.n_routed_experts):
            state[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, :inter].clone()
            state[f"{prefix}{e}.up_proj.weight"] = gate_up[e, inter:].clone()
            state[f"{prefix}{e}.down_proj.weight"] = down[e].clone()
    model.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded, info = ConvertingLM.from_pretrained(tmp_path, output_loading_info=True, experts_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_init_weights():
    model = DeepseekV2ForCausalLM(make_config(**CONFIGS["base_like_noaux_tc"], initializer_range=0.05))
    gate = model.model.layers[1].mlp.gate
    assert torch.equal(gate.e_score_correction_bias, torch.zeros(8))
    assert 0.03 < model.model.layers[1].mlp.experts.gate_up_proj.std() < 0.07
    assert 0.03 < gate.weight.std() < 0.07
    norm = model.model.layers[1].self_attn.kv_a_layernorm
    assert isinstance(norm, DeepseekV2RMSNorm) and torch.equal(norm.weight, torch.ones(32))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(rope_scaling={"type": "ntk-by-parts", "factor": 2.0}), "rope_scaling type"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(topk_method="random"), "topk_method"),
        (dict(topk_method="noaux_tc", n_group=3), "divisible by n_group"),
        (dict(use_mla=False, num_attention_heads=5), "not divisible by num_attention_heads"),
        (dict(kv_lora_rank=None), "kv_lora_rank"),
    ],
)
def test_bad_config_raises_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        DeepseekV2ForCausalLM(make_config(**overrides))


def test_needs_exactly_one_of_ids_and_embeds():
    model = make_model()
    with pytest.raises(ValueError, match="exactly one"):
        model()



def original_moe_infer(experts, x, idx, weights):
    """The original's ``moe_infer`` order: pairs sorted by expert, separate gate/up products per expert,
    outputs put back in slot order, then weighted and summed in float32."""
    inter = experts.gate_up_proj.shape[1] // 2
    order = idx.view(-1).argsort()
    tokens = x[order // idx.shape[1]]
    outputs, start = [], 0
    for expert, count in enumerate(torch.bincount(idx.view(-1), minlength=experts.num_experts).tolist()):
        if count:
            rows = tokens[start : start + count]
            gate = F.linear(rows, experts.gate_up_proj[expert, :inter])
            up = F.linear(rows, experts.gate_up_proj[expert, inter:])
            outputs.append(F.linear(F.silu(gate) * up, experts.down_proj[expert]))
            start += count
    in_slots = torch.empty_like(tokens)
    in_slots[order] = torch.cat(outputs)
    return in_slots.view(*idx.shape, -1).float().mul_(weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)


def test_prefill_experts_round_exactly_as_the_original_in_bfloat16():
    config = make_config(hidden_size=256, moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4)
    config._experts_implementation = "eager"
    experts = randomize(DeepseekV2Experts(config)).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(150, 256, generator=generator).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(16, generator=generator)[:4] for _ in range(150)])
    weights = torch.rand(150, 4, generator=generator)
    with torch.no_grad():
        assert torch.equal(experts(x, idx, weights), original_moe_infer(experts, x, idx, weights))
