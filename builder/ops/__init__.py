"""Pure op emitters: ``f(gb, name, inputs..., params) -> output value name``.

Architecture modules import emitters from here, not from the submodules.
"""

from builder.ops.attention import (
    AttentionInputs, StaticAttentionInputs, attention_inputs, decomposed_attention,
    group_query_attention, split_heads, static_attention_inputs, static_attention_mask,
    write_kv,
)
from builder.ops.conv import CONV_ACTIVATIONS, causal_conv, static_causal_conv
from builder.ops.embedding import embedding, embedding_quantized
from builder.ops.linear import linear, linear_transposed, matmul_nbits, quantized_initializers
from builder.ops.mlp import ACTIVATIONS, activate, plain_mlp, relu2, swiglu
from builder.ops.moe import interleave, moe
from builder.ops.norms import NORM_KINDS, norm, rms_norm, skip_rms_norm
from builder.ops.rotary import RopeCache, position_ids, rope_cache, rotary, rotary_decomposed
from builder.ops.softcap import softcap

__all__ = [
    "ACTIVATIONS", "AttentionInputs", "CONV_ACTIVATIONS", "NORM_KINDS", "RopeCache",
    "StaticAttentionInputs", "activate", "attention_inputs", "causal_conv",
    "decomposed_attention", "embedding", "embedding_quantized", "group_query_attention",
    "interleave", "linear", "linear_transposed", "matmul_nbits", "moe", "norm", "plain_mlp",
    "position_ids", "quantized_initializers", "relu2", "rms_norm", "rope_cache", "rotary",
    "rotary_decomposed", "skip_rms_norm", "softcap", "split_heads", "static_attention_inputs",
    "static_attention_mask", "static_causal_conv", "swiglu", "write_kv"]
