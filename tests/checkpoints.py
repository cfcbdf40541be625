"""Tiny random Hugging Face checkpoints and the transformers reference (test-only: uses torch).

Each checkpoint is made by transformers itself with a fixed seed, saved as bf16 safetensors, with a
byte-level tokenizer so that onnxruntime-genai can load the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from builder.testing import hf_greedy, hf_logits, hf_model  # noqa: F401  (the tests' imports)

VOCAB = 256

# The tests run in two xdist workers on two cores: torch's default of one thread per core in each
# worker oversubscribes them, and training (train_previous_token) then ran 20x slower or worse
# whenever both workers trained at once (measured: a tiny Gemma 3 trains in 11 s with one thread
# each, and had not finished after 120 s with the default)
torch.set_num_threads(1)

# One entry per architecture and variant the tests build. head_dim is a multiple of 16, which
# GroupQueryAttention on CPU requires. max_position_embeddings 512: the QNN builds' C follows it
# (the default C = 2048 or max_position_embeddings when that is smaller), so that the many
# default-length QNN tests run 512 rows; the tests of the default C itself give a checkpoint 4096
# (test_qnn.py::test_mission_command). The shipped example keeps 256.
TINY = {
    "qwen3": dict(
        arch="Qwen3ForCausalLM", config="Qwen3Config", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, tie_word_embeddings=True, max_position_embeddings=512),
    "llama": dict(
        arch="LlamaForCausalLM", config="LlamaConfig", vocab_size=VOCAB, hidden_size=128,
        intermediate_size=192, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        head_dim=16, tie_word_embeddings=False, max_position_embeddings=512,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        rope_theta=500000.0),
    "mistral": dict(
        arch="MistralForCausalLM", config="MistralConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, tie_word_embeddings=False, max_position_embeddings=512,
        sliding_window=8),  # shorter than the test sequences: the window really binds
    # Phi-3-mini 4k's layout (max_position_embeddings == original_max_position_embeddings).
    "phi3": dict(
        arch="Phi3ForCausalLM", config="Phi3Config", vocab_size=VOCAB, hidden_size=128,
        intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False, max_position_embeddings=512,
        original_max_position_embeddings=512, sliding_window=None),
    # LongRoPE with a tiny original context: prompts of 12 + 10 decode steps cross it.
    "phi3_longrope": dict(
        arch="Phi3ForCausalLM", config="Phi3Config", vocab_size=VOCAB, hidden_size=128,
        intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False, max_position_embeddings=64,
        original_max_position_embeddings=16, sliding_window=None,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(16)],
                      "long_factor": [1.5 + 0.4 * i for i in range(16)]}),
    # Qwen3-MoE: 8 experts, top 2 renormalized; layer 2 dense (mlp_only_layers)
    "qwen3_moe": dict(
        arch="Qwen3MoeForCausalLM", config="Qwen3MoeConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[2],
        tie_word_embeddings=False, max_position_embeddings=512),
    # every other layer sparse (decoder_sparse_step 2), top 3 not renormalized
    "qwen3_moe_step2": dict(
        arch="Qwen3MoeForCausalLM", config="Qwen3MoeConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=6,
        num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[],
        tie_word_embeddings=True, max_position_embeddings=512),
    "mixtral": dict(
        arch="MixtralForCausalLM", config="MixtralConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
        max_position_embeddings=512, sliding_window=None),
    # Phi-4-mini's shape: partial rotary (48 of 64 dims), tied embeddings, LongRoPE.
    "phi4mini": dict(
        arch="Phi3ForCausalLM", config="Phi3Config", vocab_size=VOCAB, hidden_size=128,
        intermediate_size=192, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        tie_word_embeddings=True, max_position_embeddings=64, partial_rotary_factor=0.75,
        original_max_position_embeddings=16, sliding_window=None,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(24)],
                      "long_factor": [1.5 + 0.2 * i for i in range(24)]}),
    # The architectures that state their differences in builder/models, each with its
    # distinguishing features switched on so that they bind on the tests' 12-token prompts
    # (``vectors``: biases and norm weights random too, else a zero bias or a unit norm weight
    # would hide them). tests/test_architectures.py shows each feature moves transformers'
    # logits.
    "qwen2": dict(
        arch="Qwen2ForCausalLM", config="Qwen2Config", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False, max_position_embeddings=512, vectors=True),
    # alternating local (8-token window) and global layers, both soft-caps binding,
    # query_pre_attn_scalar != head_dim
    "gemma2": dict(
        arch="Gemma2ForCausalLM", config="Gemma2Config", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, query_pre_attn_scalar=20, sliding_window=8, attn_logit_softcapping=2.0,
        final_logit_softcapping=4.0, tie_word_embeddings=True, max_position_embeddings=512,
        vectors=True),
    # local layers with their own rotary base, q/k norms, query_pre_attn_scalar != head_dim
    "gemma3": dict(
        arch="Gemma3ForCausalLM", config="Gemma3TextConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, query_pre_attn_scalar=48, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0,
                                            "factor": 4.0}},
        tie_word_embeddings=True, max_position_embeddings=512, vectors=True),
    "smollm3": dict(
        arch="SmolLM3ForCausalLM", config="SmolLM3Config", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        no_rope_layers=[1, 0, 1], tie_word_embeddings=True, max_position_embeddings=512,
        vectors=True),
    # Granite 3.x's multipliers
    "granite": dict(
        arch="GraniteForCausalLM", config="GraniteConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        embedding_multiplier=12.0, attention_multiplier=0.03, residual_multiplier=0.5,
        logits_scaling=4.0, tie_word_embeddings=True, max_position_embeddings=512,
        vectors=True),
    "olmo2": dict(
        arch="Olmo2ForCausalLM", config="Olmo2Config", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False, max_position_embeddings=512, vectors=True),
    # The families with LayerNorms, MLPs without a gate, parallel blocks and interleaved rotary
    # (tests/test_families.py), each with the features that set it apart binding
    "phi": dict(
        arch="PhiForCausalLM", config="PhiConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        qk_layernorm=True, tie_word_embeddings=False, max_position_embeddings=512,
        vectors=True),
    "starcoder2": dict(
        arch="Starcoder2ForCausalLM", config="Starcoder2Config", vocab_size=VOCAB,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, tie_word_embeddings=True,
        max_position_embeddings=512, vectors=True),
    # Pythia's layout with rotary on 24 of 32 dims (not a multiple of 16: RotaryEmbedding ops)
    "gpt_neox": dict(
        arch="GPTNeoXForCausalLM", config="GPTNeoXConfig", vocab_size=VOCAB, hidden_size=128,
        intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                         "partial_rotary_factor": 0.75},
        tie_word_embeddings=False, max_position_embeddings=512, vectors=True),
    "stablelm": dict(
        arch="StableLmForCausalLM", config="StableLmConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        use_qkv_bias=True, use_parallel_residual=True, tie_word_embeddings=False,
        max_position_embeddings=512, vectors=True),
    "cohere": dict(
        arch="CohereForCausalLM", config="CohereConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        use_qk_norm=True, logit_scale=0.5, tie_word_embeddings=True,
        max_position_embeddings=512, vectors=True),
    "cohere2": dict(
        arch="Cohere2ForCausalLM", config="Cohere2Config", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=8, logit_scale=0.5, tie_word_embeddings=True,
        max_position_embeddings=512, vectors=True),
    # partial (0.5) interleaved rotary, packed gate/up, q/k/v biases; GLM-4-0414's post-norms
    "glm": dict(
        arch="GlmForCausalLM", config="GlmConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, tie_word_embeddings=False, max_position_embeddings=512, vectors=True),
    "glm4": dict(
        arch="Glm4ForCausalLM", config="Glm4Config", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, tie_word_embeddings=False, max_position_embeddings=512, vectors=True),
    "olmo3": dict(
        arch="Olmo3ForCausalLM", config="Olmo3Config", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=8, tie_word_embeddings=False, max_position_embeddings=512, vectors=True),
    # three sliding layers that rotate, a global one without rotary
    "exaone4": dict(
        arch="Exaone4ForCausalLM", config="Exaone4Config", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=8, tie_word_embeddings=False, max_position_embeddings=512, vectors=True),
    "ernie4_5": dict(
        arch="Ernie4_5ForCausalLM", config="Ernie4_5Config", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, use_bias=True, tie_word_embeddings=True, max_position_embeddings=512,
        vectors=True),
    "nemotron": dict(
        arch="NemotronForCausalLM", config="NemotronConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        max_position_embeddings=512, vectors=True),
    "arcee": dict(
        arch="ArceeForCausalLM", config="ArceeConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False, max_position_embeddings=512, vectors=True),
    "helium": dict(
        arch="HeliumForCausalLM", config="HeliumConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, attention_bias=True, tie_word_embeddings=False, max_position_embeddings=512,
        vectors=True),
    # q/k norms after rotary
    # ... and the released checkpoints' fixed-alpha NTK rotary
    "hunyuan": dict(
        arch="HunYuanDenseV1ForCausalLM", config="HunYuanDenseV1Config", vocab_size=VOCAB,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0,
                         "factor": 1.0},
        max_position_embeddings=512, vectors=True),
    # q/k norms over the whole projection; 8 experts, top 2 renormalized
    "olmoe": dict(
        arch="OlmoeForCausalLM", config="OlmoeConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False,
        max_position_embeddings=512, vectors=True),
    # Granite's multipliers; 4 experts stacked in the checkpoint, top 2
    "granitemoe": dict(
        arch="GraniteMoeForCausalLM", config="GraniteMoeConfig", vocab_size=VOCAB,
        hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        embedding_multiplier=12.0, attention_multiplier=0.03, residual_multiplier=0.5,
        logits_scaling=4.0, tie_word_embeddings=True, max_position_embeddings=512,
        vectors=True),
    # hybrids (test_hybrids). LFM2: conv layers (3 taps, no biases, as released) around one
    # attention layer; the MLP's width 192 becomes 128 (block_auto_adjust_ff_dim)
    "lfm2": dict(
        arch="Lfm2ForCausalLM", config="Lfm2Config", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        layer_types=["conv", "conv", "full_attention", "conv"], conv_L_cache=3,
        block_multiple_of=32, tie_word_embeddings=True, max_position_embeddings=512,
        vectors=True),
    # and with biases, 4 taps, attention layers given by full_attn_idxs
    "lfm2_bias": dict(
        arch="Lfm2ForCausalLM", config="Lfm2Config", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
        full_attn_idxs=[1], conv_L_cache=4, conv_bias=True, block_multiple_of=32,
        tie_word_embeddings=False, max_position_embeddings=512, vectors=True),
    # Qwen3.5 (text): Gated DeltaNet layers (2 key heads, 4 value heads, 4 taps) and gated
    # attention (head_dim 64: 16 rotary dims at partial_rotary_factor 0.25)
    "qwen3_5": dict(
        arch="Qwen3_5ForCausalLM", config="Qwen3_5TextConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        tie_word_embeddings=True, max_position_embeddings=512, vectors=True),
    # Qwen3.5-MoE: Qwen3.5's layers with 4 experts (top 2) and a gated shared expert in every
    # layer
    "qwen3_5_moe": dict(
        arch="Qwen3_5MoeForCausalLM", config="Qwen3_5MoeTextConfig", vocab_size=VOCAB,
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        tie_word_embeddings=False, max_position_embeddings=512, vectors=True),
    # Granite 4.0-H: Mamba2 layers (8 heads of 16 in 2 groups, a state of 16, 4 taps) and
    # rotary attention, Granite's multipliers, 4 experts (top 2) beside a shared MLP
    "granitemoehybrid": dict(
        arch="GraniteMoeHybridForCausalLM", config="GraniteMoeHybridConfig", vocab_size=VOCAB,
        hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["mamba", "attention", "mamba", "mamba"],
        num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=48,
        mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
        position_embedding_type="rope", embedding_multiplier=2.0, attention_multiplier=0.2,
        residual_multiplier=0.5, logits_scaling=2.0, tie_word_embeddings=True,
        max_position_embeddings=512, vectors=True),
    # and Granite 4.0-H-Micro's kind: no experts, attention without rotary, one group
    "granitemoehybrid_dense": dict(
        arch="GraniteMoeHybridForCausalLM", config="GraniteMoeHybridConfig", vocab_size=VOCAB,
        hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, layer_types=["mamba", "attention", "mamba"],
        num_local_experts=0, shared_intermediate_size=64, mamba_n_heads=4, mamba_n_groups=1,
        mamba_d_state=16, mamba_d_conv=3, mamba_expand=1, position_embedding_type="nope",
        tie_word_embeddings=False, max_position_embeddings=512, vectors=True),
    # GPT-OSS: attention sinks, 6-token windows on every other layer, YaRN past 64 positions,
    # 4 stacked experts with biases (top 2), a router bias, and a SwiGLU clamp low enough to
    # bind on random weights
    "gpt_oss": dict(
        arch="GptOssForCausalLM", config="GptOssConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
        swiglu_limit=0.5, max_position_embeddings=512, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                         "original_max_position_embeddings": 64}, vectors=True),
    # the plugin tutorial's third example (not built in): GPT-2's key names, rotary on 8 of 16
    "gptj": dict(
        arch="GPTJForCausalLM", config="GPTJConfig", vocab_size=VOCAB, n_embd=64, n_layer=2,
        n_head=4, rotary_dim=8, n_positions=512, tie_word_embeddings=False, vectors=True),
}


HYBRIDS = ["lfm2", "lfm2_bias", "qwen3_5", "qwen3_5_moe", "granitemoehybrid",
           "granitemoehybrid_dense", "gpt_oss"]  # (and GPT-OSS: test_hybrids)
# the families of tests/checkpoints.py's last block
FAMILIES = ["phi", "starcoder2", "gpt_neox", "stablelm", "cohere", "cohere2", "glm", "glm4",
            "olmo3", "exaone4", "ernie4_5", "nemotron", "hunyuan", "arcee", "helium"]


def make_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer with 256 tokens and no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # (a set's order: not the same each run)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])
    fast.save_pretrained(folder)


def train_previous_token(model, seed: int = 0, steps: int = 250, length: int = 48) -> None:
    """Train ``model`` briefly on a task whose answers are certain: the next token is a fixed
    permutation of the token *before* the current one. Solving it takes attention over the
    cache (a previous-token head), and every logit vector ends with a clear winner (top-2 margin
    of several units at each step after the first), which random checkpoints lack."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(VOCAB, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (16, length + 1), generator=g)
        target = perm[x[:, :-1]]
        target[:, 0] = -100  # the token before the first one is not in the sequence
        logits = model(input_ids=x[:, 1:]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def make_checkpoint(folder: Path, name: str, *, seed: int = 0, shard: bool = False,
                    trained: bool = False, **overrides) -> Path:
    """Write a tiny checkpoint of variant ``name`` into ``folder``: random, or ``trained`` for
    clear winners (see ``train_previous_token``)."""
    spec = dict(TINY[name])
    spec.update(overrides)
    arch, config_name = spec.pop("arch"), spec.pop("config")
    vectors = spec.pop("vectors", False)
    spec.setdefault("bos_token_id", 1)
    spec.setdefault("eos_token_id", 2)
    spec.setdefault("pad_token_id", 0)
    config = getattr(transformers, config_name)(**spec)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config)
    if trained:
        train_previous_token(model, seed)
    else:
        with torch.no_grad():  # larger than default init: logits with larger margins
            for p in model.parameters():
                if p.dim() >= 2:  # (3: the experts of MoE models, stacked)
                    p.normal_(0.0, 0.08)
                elif vectors:  # biases and norm weights around their initial values
                    p.add_(torch.randn_like(p) * 0.3)
    model = model.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size="100KB" if shard else "10GB")
    make_tokenizer(folder)
    return folder


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def plant_outlier(src: Path, dst: Path, layer: int, channels: tuple[int, ...] = (5,)) -> Path:
    """A copy of checkpoint ``src`` whose MLP ``channels`` in ``layer`` are 1024x larger (their
    up rows) and whose down-projection columns for them are 1024x smaller: the same model in
    float (powers of two are exact in bf16), but that layer's MLP now carries outlier channels
    whose down-projection weights are too small for their blocks' scales."""
    import shutil

    import ml_dtypes  # (safetensors.numpy reads bf16 as ml_dtypes.bfloat16)
    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    up, down = (f"model.layers.{layer}.mlp.{p}_proj.weight" for p in ("up", "down"))
    tensors[up], tensors[down] = tensors[up].copy(), tensors[down].copy()
    for c in channels:
        tensors[up][c] = (tensors[up][c].astype(np.float32) * 1024).astype(ml_dtypes.bfloat16)
        tensors[down][:, c] = (tensors[down][:, c].astype(np.float32) / 1024).astype(
            ml_dtypes.bfloat16)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


if __name__ == "__main__":  # regenerate the shipped example: python tests/checkpoints.py
    import argparse
    import shutil

    p = argparse.ArgumentParser(description="Write the shipped tiny example checkpoint (a "
                                "random Qwen3, 256 tokens; the folder is replaced).")
    p.add_argument("folder", nargs="?", default="examples/tiny-qwen3", type=Path)
    target = p.parse_args().folder
    shutil.rmtree(target, ignore_errors=True)
    make_checkpoint(target, "qwen3", shard=True, max_position_embeddings=256)
