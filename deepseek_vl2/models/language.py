"""DeepSeek-V2 / DeepSeekMoE decoder, the language model of DeepSeek-VL2.

Gives the same numbers as the original ``modeling_deepseek.py`` inference path, on today's transformers:
plain multi-head attention (tiny) or multi-head latent attention (small, base) run through torch SDPA,
a KV cache that holds MLA's compressed latent rather than expanded keys and values, and routed experts
stored stacked per layer so that they run without a host sync per expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.integrations.moe import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg

from ..utils.checkpoint import PageReleaser
from .cache import BufferedLayer, DeepseekV2Cache, DeepseekV2GenerationMixin  # BufferedLayer: re-exported
from .configuration import DeepseekV2Config
from .kernels import Kernel, Op, attend_one_query, choose, decode_step, matmuls_on, matmuls_running, running, sdpa
from .packed import Linear, Packable, dense_of
from .scratch import reusing_scratch, scratch

ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


class StackExperts(MergeModulelist):
    """Stacks a layer's per-expert tensors, releasing the checkpoint pages read as loading goes.

    Without the release, every per-expert tensor read from the mapped file stays resident until loading
    ends, beside its stacked copy: the load's peak would be the experts' size above the weights'.
    """

    releaser = PageReleaser()  # one for the process: loading reads layer after layer

    def convert(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        stacked = super().convert(*args, **kwargs)
        self.releaser.read(sum(tensor.numel() * tensor.element_size() for tensor in stacked.values()))
        return stacked


def expert_weight_conversions() -> list[WeightConverter]:
    """Checkpoint-to-model converters: per-expert ``gate/up/down_proj.weight`` tensors -> stacked expert tensors."""
    return [
        WeightConverter(
            source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
            target_patterns="mlp.experts.gate_up_proj",
            operations=[StackExperts(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            source_patterns="mlp.experts.*.down_proj.weight",
            target_patterns="mlp.experts.down_proj",
            operations=[StackExperts(dim=0)],
        ),
    ]


class DeepseekV2RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype before the weight (as the original)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_settings(config: DeepseekV2Config) -> dict:
    """``config.rope_scaling`` with the original's defaults filled in (accepts ``type`` or ``rope_type``)."""
    scaling = dict(config.rope_scaling or {})
    rope_type = scaling.pop("type", scaling.pop("rope_type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
    if rope_type != "default" and "factor" not in scaling:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs a 'factor'")
    defaults = dict(
        factor=1.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1, mscale_all_dim=0
    )
    return {"rope_type": rope_type, **defaults, **scaling}


class DeepseekV2RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE, with the original's linear, dynamic-NTK and YaRN scaling.

    Stateless: frequencies are rebuilt on the fly (a few tiny ops per forward), so they are never cast to
    bf16 with the model nor left uninitialised by meta-device loading. Dynamic NTK uses the key length
    (cache + new tokens), as the original MLA code does.
    """

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.dim = config.qk_rope_head_dim if config.use_mla else config.head_dim
        self.base = config.rope_theta
        self.max_position_embeddings = config.max_position_embeddings
        self.settings = rope_settings(config)
        self.rope_type = self.settings["rope_type"]
        factor = self.settings["factor"]
        self.attention_scaling = 1.0
        if self.rope_type == "yarn":
            self.attention_scaling = yarn_mscale(factor, self.settings["mscale"]) / yarn_mscale(
                factor, self.settings["mscale_all_dim"]
            )

    def inverse_frequencies(self, seq_len: int, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
        base, factor = self.base, self.settings["factor"]
        if self.rope_type == "dynamic" and seq_len > self.max_position_embeddings:
            ntk_scale = factor * seq_len / self.max_position_embeddings - (factor - 1)
            base = base * ntk_scale ** (self.dim / (self.dim - 2))
        inv_freq = 1.0 / base**exponents
        if self.rope_type == "linear":
            inv_freq = inv_freq / factor
        elif self.rope_type == "yarn":
            inv_freq = self._yarn_blend(inv_freq, factor)
        return inv_freq

    def _yarn_blend(self, inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
        """Interpolated (``/factor``) low frequencies, original high frequencies, a linear ramp between."""

        def correction_dim(num_rotations: float) -> float:
            original_max = self.settings["original_max_position_embeddings"]
            return self.dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(self.base))

        low = max(math.floor(correction_dim(self.settings["beta_fast"])), 0)
        high = min(math.ceil(correction_dim(self.settings["beta_slow"])), self.dim - 1)
        if low == high:
            high += 0.001
        index = torch.arange(self.dim // 2, dtype=torch.float32, device=inv_freq.device)
        ramp = ((index - low) / (high - low)).clamp(0, 1)
        return inv_freq / factor * ramp + inv_freq * (1.0 - ramp)

    def forward(self, position_ids: torch.Tensor, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(cos, signed sin) of shape [batch, 1, seq, dim] for integer ``position_ids`` [batch, seq].

        The sin table's first half is negated, so that rotating needs only a roll (see ``apply_rotary``).
        """
        freqs = position_ids[:, None, :, None].float() * self.inverse_frequencies(seq_len, position_ids.device)
        cos, sin = freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``x`` [batch, heads, seq, dim].

    ``x cos + (-x2, x1) sin``, computed as ``x cos + (x2, x1) signed_sin``; the second product and the
    sum in place, each rounded as out of place, so that a prefill makes two large tensors, not four.
    """
    return (x * cos).add_(x.roll(x.shape[-1] // 2, dims=-1).mul_(signed_sin))


def interleaved_to_half(x: torch.Tensor) -> torch.Tensor:
    """Reorder (x0, x1, x2, x3, ...) to (x0, x2, ..., x1, x3, ...): MLA's rope weights pair adjacent dims."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


class DeepseekV2MultiHeadAttention(nn.Module):
    """Plain multi-head attention (with optional grouped KV heads) and rotate-half RoPE over the whole head."""

    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}"
            )
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {config.num_attention_heads} is not divisible by "
                f"num_key_value_heads {config.num_key_value_heads}"
            )
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        self.scaling = self.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(hidden, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(config.num_attention_heads * self.head_dim, hidden, bias=bias)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache: Cache | None = None):
        batch, seq_len, _ = hidden_states.shape
        heads_shape = (batch, seq_len, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(heads_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(heads_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(heads_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        one_query = choose(Op.ATTENTION, query.device, query.dtype, seq_len) is Kernel.ONE_QUERY
        if one_query and not self.training:  # only SDPA has dropout
            output = attend_one_query((query,), (key,), value, attention_mask, self.scaling)
        else:
            dropout = self.attention_dropout if self.training else 0.0
            output = sdpa(query, key, value, attention_mask, self.scaling, dropout)
        return self.o_proj(output.transpose(1, 2).reshape(batch, seq_len, -1))


class DeepseekV2LatentAttention(nn.Module):
    """Multi-head latent attention: keys and values come from one small per-token latent plus a shared roped key.

    The cache stores that latent (after ``kv_a_layernorm``) and the roped key part; prefill expands them with
    ``kv_b_proj``, a one-token decode step instead folds ``kv_b_proj`` into the query and output so that
    attention runs over the latent directly.
    """

    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        if config.kv_lora_rank is None:
            raise ValueError("use_mla=True needs kv_lora_rank to be set")
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.attention_dropout = config.attention_dropout
        hidden, bias, q_width = config.hidden_size, config.attention_bias, self.num_heads * config.q_head_dim

        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = Linear(hidden, q_width, bias=False)
        else:
            self.q_a_proj = Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = DeepseekV2RMSNorm(self.q_lora_rank)  # default eps, as in the original
            self.q_b_proj = Linear(self.q_lora_rank, q_width, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = DeepseekV2RMSNorm(self.kv_lora_rank)  # default eps, as in the original
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(self.num_heads * self.v_dim, hidden, bias=bias)

        self.scaling = config.q_head_dim**-0.5
        settings = rope_settings(config)
        if config.rope_scaling is not None and settings["mscale_all_dim"]:
            self.scaling *= yarn_mscale(settings["factor"], settings["mscale_all_dim"]) ** 2

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache: Cache | None = None):
        batch, seq_len, _ = hidden_states.shape
        if self.q_lora_rank is None:
            query = self.q_proj(hidden_states)
        else:
            query = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        query = query.view(batch, seq_len, self.num_heads, -1).transpose(1, 2)
        q_nope, q_rope = query.split([self.nope_dim, self.rope_dim], dim=-1)

        latent, k_rope = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).unsqueeze(1)  # [batch, 1, seq, kv_lora_rank]
        k_rope = k_rope.unsqueeze(1)  # [batch, 1, seq, rope_dim]

        cos, sin = position_embeddings
        q_rope = apply_rotary(interleaved_to_half(q_rope), cos, sin)
        k_rope = apply_rotary(interleaved_to_half(k_rope), cos, sin)
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx)

        # An offloaded kv_b_proj (accelerate's disk/CPU offload) has its weight only inside its own forward.
        absorb = seq_len == 1 and not self.kv_b_proj.weight.is_meta
        attend = self.attend_in_latent_space if absorb else self.attend_expanded
        output = attend(q_nope, q_rope, latent, k_rope, attention_mask)
        return self.o_proj(output.transpose(1, 2).reshape(batch, seq_len, -1))

    def attend_expanded(self, q_nope, q_rope, latent, k_rope, attention_mask) -> torch.Tensor:
        """Expand the latent to per-head keys/values with ``kv_b_proj``, then plain SDPA."""
        batch, _, kv_len, _ = latent.shape
        kv = self.kv_b_proj(latent).view(batch, kv_len, self.num_heads, -1).transpose(1, 2)
        k_nope, value = kv.split([self.nope_dim, self.v_dim], dim=-1)
        key = torch.cat((k_nope, k_rope.expand(-1, self.num_heads, -1, -1)), dim=-1)
        query = torch.cat((q_nope, q_rope), dim=-1)
        dropout = self.attention_dropout if self.training else 0.0
        return sdpa(query, key, value, attention_mask, self.scaling, dropout)

    def attend_in_latent_space(self, q_nope, q_rope, latent, k_rope, attention_mask) -> torch.Tensor:
        """The same attention with ``kv_b_proj`` absorbed: q_nope.W_k scores the latent, W_v maps the result."""
        kv_b = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_key, w_value = kv_b.split([self.nope_dim, self.v_dim], dim=1)
        queries = q_nope.shape[2]
        with matmuls_running(Op.LATENT_QUERY, q_nope.device, q_nope.dtype, queries):
            q_latent = torch.matmul(q_nope, w_key)  # [batch, heads, seq, rank]
        one_query = choose(Op.ATTENTION, q_latent.device, q_latent.dtype, queries) is Kernel.ONE_QUERY
        if one_query and not self.training:  # only SDPA has dropout
            output = attend_one_query((q_latent, q_rope), (latent, k_rope), latent, attention_mask, self.scaling)
        else:
            query = torch.cat((q_latent, q_rope), dim=-1)  # [batch, heads, seq, rank + rope]
            key = torch.cat((latent, k_rope), dim=-1)  # [batch, 1, kv_len, rank + rope]
            dropout = self.attention_dropout if self.training else 0.0
            output = sdpa(query, key, latent, attention_mask, self.scaling, dropout)
        return torch.matmul(output, w_value.transpose(1, 2))


class DeepseekV2MLP(nn.Module):
    """Gated feed-forward block: dense layers and the shared experts."""

    def __init__(self, config: DeepseekV2Config, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeepseekV2MoEGate(nn.Module):
    """Router: scores every routed expert in float32 and picks ``num_experts_per_tok`` of them per token."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        if config.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func {config.scoring_func!r} is not supported; expected one of {SCORING_FUNCS}")
        if config.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method {config.topk_method!r} is not supported; expected one of {TOPK_METHODS}")
        if config.topk_method != "greedy" and (not config.n_group or config.n_routed_experts % config.n_group):
            raise ValueError(
                f"topk_method {config.topk_method!r} needs n_routed_experts ({config.n_routed_experts}) "
                f"divisible by n_group ({config.n_group})"
            )
        self.top_k = config.num_experts_per_tok
        self.scoring_func, self.topk_method = config.scoring_func, config.topk_method
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if self.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(config.n_routed_experts))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[tokens, hidden] -> (expert indices [tokens, top_k], float32 routing weights [tokens, top_k])."""
        logits = F.linear(hidden_states.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.scoring_func == "softmax" else logits.sigmoid()
        if self.topk_method == "greedy":
            weights, indices = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        elif self.topk_method == "group_limited_greedy":
            group_scores = scores.unflatten(-1, (self.n_group, -1)).amax(dim=-1)
            kept = self._keep_best_groups(scores, group_scores)
            weights, indices = torch.topk(kept, self.top_k, dim=-1, sorted=False)
        else:  # noaux_tc: the bias steers the choice only; weights are the unbiased scores
            choice = scores + self.e_score_correction_bias.float()
            group_scores = choice.unflatten(-1, (self.n_group, -1)).topk(2, dim=-1).values.sum(dim=-1)
            indices = torch.topk(self._keep_best_groups(choice, group_scores), self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, indices)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, weights * self.routed_scaling_factor

    def _keep_best_groups(self, scores: torch.Tensor, group_scores: torch.Tensor) -> torch.Tensor:
        """Zero the scores of experts outside each token's ``topk_group`` best groups (zero, as the original)."""
        best_groups = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        expert_mask = group_mask.repeat_interleave(scores.shape[-1] // self.n_group, dim=-1)
        return scores.masked_fill(~expert_mask, 0.0)


@use_experts_implementation
class DeepseekV2Experts(Packable, nn.Module):
    """A layer's routed experts, stacked: ``gate_up_proj`` [E, 2I, H] (gate rows, then up), ``down_proj`` [E, H, I].

    Packed (``models.packed``), each expert's matrices are packed one by one; only for the eager
    implementation (this module's own forward), as transformers' others read the stacked tensors.
    """

    packed_names = ("gate_up_proj", "down_proj")

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.num_experts = config.n_routed_experts
        intermediate = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * intermediate, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, intermediate))
        self.act_fn = ACT2FN[config.hidden_act]

    def pack(self) -> None:
        if self.config._experts_implementation in (None, "eager"):
            super().pack()

    def forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """[tokens, hidden] routed by ``top_k_index``/``top_k_weights`` [tokens, top_k] -> [tokens, hidden].

        The path (each expert in place, gathered weights, or sorted segments) is chosen by ``kernels``.
        """
        with running(Op.EXPERTS, hidden_states.device, hidden_states.dtype, top_k_index.numel()) as path:
            return self._run(path, hidden_states, top_k_index, top_k_weights)

    def _run(self, path: Kernel, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        if path is Kernel.SORTED:
            return self._run_sorted(hidden_states, top_k_index, top_k_weights)
        if path is Kernel.EACH_EXPERT:
            expert_outputs = self._run_each_expert(hidden_states, top_k_index)
        else:
            expert_outputs = self._run_gathered(hidden_states, top_k_index)
        # Weighted sum in the routing weights' float32, as the original (the multiply does the upcast).
        weighted = expert_outputs.view(*top_k_index.shape, -1) * top_k_weights.unsqueeze(-1)
        return weighted.sum(dim=1).to(hidden_states.dtype)

    def _gate_up(self, tokens: torch.Tensor, expert: int) -> torch.Tensor:
        """``tokens`` through one expert's gate and up projections, its weights read in place."""
        packed = self.packed("gate_up_proj")
        return F.linear(tokens, self.gate_up_proj[expert]) if packed is None else packed[expert].linear(tokens)

    def _down(self, tokens: torch.Tensor, expert: int) -> torch.Tensor:
        packed = self.packed("down_proj")
        return F.linear(tokens, self.down_proj[expert]) if packed is None else packed[expert].linear(tokens)

    def _expert(self, tokens: torch.Tensor, expert: int) -> torch.Tensor:
        gate, up = self._gate_up(tokens, expert).chunk(2, dim=-1)
        return self._down(self.act_fn(gate) * up, expert)

    def _run_each_expert(self, hidden_states, top_k_index) -> torch.Tensor:
        """Each hit expert once, its weights where they lie, its pairs found from one host read of the routing.

        A lone pair's expert runs one GEMV (PyTorch's, which reads one row's unpacked weights faster than
        oneDNN on the CPUs measured; packed weights run oneDNN's product regardless); an expert shared by
        several of a step's tokens runs one product of their rows on the step's kernel for its other
        products, reading its weights once. Not a question of its own: one asked only inside this path
        would keep its untimed first answer while this path is being timed.
        """
        top_k = top_k_index.shape[1]
        slots_of: dict[int, list[int]] = {}
        for slot, expert in enumerate(top_k_index.reshape(-1).tolist()):
            slots_of.setdefault(expert, []).append(slot)
        outputs: list[torch.Tensor | None] = [None] * top_k_index.numel()
        for expert, slots in slots_of.items():
            if len(slots) == 1:
                with matmuls_on(Kernel.NATIVE_GEMV):
                    outputs[slots[0]] = self._expert(hidden_states[slots[0] // top_k], expert)
            else:
                rows = self._expert(hidden_states[[slot // top_k for slot in slots]], expert)
                for slot, row in zip(slots, rows):
                    outputs[slot] = row
        return torch.stack(outputs)

    def _gathered_weights(self, expert_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [pairs, 2I, H], down [pairs, H, I]): the weights of each pair's expert, copied."""
        if self.is_packed:
            ids = expert_ids.tolist()
            return tuple(dense_of([self.packed(name)[e] for e in ids]) for name in self.packed_names)
        return self.gate_up_proj[expert_ids], self.down_proj[expert_ids]

    def _run_gathered(self, hidden_states, top_k_index) -> torch.Tensor:
        """Gather each pair's expert weights and use batched matmuls (no host sync)."""
        gate_up_proj, down_proj = self._gathered_weights(top_k_index.reshape(-1), hidden_states.dtype)
        tokens = hidden_states.repeat_interleave(top_k_index.shape[1], dim=0).unsqueeze(-1)
        gate, up = torch.bmm(gate_up_proj, tokens).squeeze(-1).chunk(2, dim=-1)
        return torch.bmm(down_proj, (self.act_fn(gate) * up).unsqueeze(-1)).squeeze(-1)

    def _run_sorted(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """Sort (token, expert) pairs by expert, run each hit expert once on its segment (one host sync).

        Each segment gathers its own tokens and writes its float32-weighted output back to the pairs' slots,
        so no whole-prompt copy of the tokens or outputs in expert order is ever made; the sum over a
        token's experts then runs in the original's order (slot by slot).
        """
        top_k = top_k_index.shape[1]
        slots = top_k_index.reshape(-1).argsort()  # (token, expert) pair slots, grouped by expert
        weights = top_k_weights.reshape(-1, 1)
        counts = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts).tolist()  # the host sync
        shape = (top_k_index.numel(), hidden_states.shape[-1])
        weighted = scratch("expert pair outputs", shape, weights.dtype, hidden_states.device)  # every row written
        start = 0
        for expert, count in enumerate(counts):
            if count:
                segment = slots[start : start + count]
                output = self._expert(hidden_states[segment // top_k], expert)
                weighted.index_copy_(0, segment, output * weights[segment])
                start += count
        return weighted.view(*top_k_index.shape, -1).sum(dim=1).to(hidden_states.dtype)


class DeepseekV2MoE(nn.Module):
    """Routed experts plus always-on shared experts."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.gate = DeepseekV2MoEGate(config)
        self.experts = DeepseekV2Experts(config)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = DeepseekV2MLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        top_k_index, top_k_weights = self.gate(tokens)
        output = self.experts(tokens, top_k_index, top_k_weights).view_as(hidden_states)
        if self.shared_experts is not None:
            output = output + self.shared_experts(hidden_states)
        return output


class DeepseekV2DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        attention_class = DeepseekV2LatentAttention if config.use_mla else DeepseekV2MultiHeadAttention
        self.self_attn = attention_class(config, layer_idx)
        self.mlp = DeepseekV2MoE(config) if config.is_moe_layer(layer_idx) else DeepseekV2MLP(config)
        self.input_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache: Cache | None = None):
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DeepseekV2PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV2Config
    base_model_prefix = "model"
    _no_split_modules = ["DeepseekV2DecoderLayer"]
    _supports_sdpa = True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Our own experts forward (``"eager"``) unless another is asked for.

        It picks per device and token count; transformers' ``grouped_mm`` default loops over all experts for
        every decoded token on CPU.
        """
        return super().get_correct_experts_implementation(requested_experts or "eager")

    def _init_weights(self, module):
        super()._init_weights(module)  # linears, embeddings (normal), RMSNorms (ones)
        std = self.config.initializer_range
        if isinstance(module, DeepseekV2Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, DeepseekV2MoEGate):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.topk_method == "noaux_tc":
                init.zeros_(module.e_score_correction_bias)


def positions_from_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Positions of the last ``seq_len`` tokens counted over real tokens only, so left-padded rows start at 0."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, -seq_len:]


class DeepseekV2Model(DeepseekV2PreTrainedModel):
    """Embeddings, decoder layers and the final norm."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DeepseekV2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeepseekV2RotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DeepseekV2Cache(config=self.config)

        seq_len = inputs_embeds.shape[1]
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                position_ids = positions_from_mask(attention_mask, seq_len)
            else:
                position_ids = torch.arange(past_len, past_len + seq_len, device=inputs_embeds.device).unsqueeze(0)
        # Keys beyond the past and new tokens (a BufferedLayer's spare room) must be masked explicitly.
        kv_length = cache.get_mask_sizes(seq_len, 0)[0] if cache is not None else seq_len
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            allow_is_causal_skip=kv_length == past_len + seq_len,
        )
        position_embeddings = self.rotary_emb(position_ids, past_len + seq_len, inputs_embeds.dtype)

        hidden_states = inputs_embeds
        with reusing_scratch():
            for layer in self.layers:
                hidden_states = layer(hidden_states, position_embeddings, mask, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class DeepseekV2ForCausalLM(DeepseekV2PreTrainedModel, DeepseekV2GenerationMixin):
    """The decoder with its LM head; generates through transformers' ``GenerationMixin``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekV2Config):
        super().__init__(config)
        self.model = DeepseekV2Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear):
        self.lm_head = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits in the model dtype, for the last ``logits_to_keep`` positions only (0 keeps all)."""
        tokens = input_ids if inputs_embeds is None else inputs_embeds
        num_tokens = tokens.shape[:2].numel() if tokens is not None else 0
        device = self.model.norm.weight.device  # the LM head's (its weight may be packed, on meta)
        dtype = self.model.embed_tokens.weight.dtype  # the activations', also where the decoder is quantized
        bits = getattr(self.lm_head, "bits", None)  # a quantized LM head: its decoder's products are too
        model = f"width {self.config.hidden_size}" + (f" with int{bits} weights" if bits else "")
        model += " packed" if getattr(self.lm_head, "is_packed", False) else ""  # its products' speeds differ
        with decode_step(device, dtype, num_tokens, model):
            with matmuls_running(Op.MATMUL, device, dtype, num_tokens, role="layers"):
                outputs = self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=cache,
                    inputs_embeds=inputs_embeds,
                    use_cache=use_cache,
                )
            hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
            rows = hidden_states.shape[:2].numel()
            with matmuls_running(Op.MATMUL, device, dtype, rows, role="lm_head"):
                logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


__all__ = [
    "BufferedLayer",
    "DeepseekV2Cache",
    "DeepseekV2Experts",
    "DeepseekV2ForCausalLM",
    "DeepseekV2GenerationMixin",
    "DeepseekV2Model",
    "DeepseekV2PreTrainedModel",
    "DeepseekV2RMSNorm",
    "DeepseekV2RotaryEmbedding",
    "expert_weight_conversions",
]
