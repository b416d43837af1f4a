"""Gemma architectures as data: the paper's Table 1 and the released checkpoints.

These are configurations only: keras_gemma ships no weights. Build one with
`GemmaBackbone.from_preset(name, load_weights=False)` (random weights), or
pass a checkpoint (directory or `.gguf` file) to `from_preset` for real ones.

Each entry holds `GemmaBackbone` constructor arguments. The released ones carry
keras-hub's preset names and the numbers of the published Hugging Face configs
(`intermediate_dim` counts the gate and up branches together: twice transformers'
`intermediate_size`; `layer_types` lists each layer's attention, as transformers'
`layer_types`).
"""

import types

_SLIDING, _FULL = "sliding_attention", "full_attention"


def _frozen(*parts, **config):
    """One read-only preset from `parts` (dicts) and `config`."""
    merged = {}
    for part in parts + (config,):
        merged.update(part)
    return types.MappingProxyType(merged)


def _layer_types(pattern, num_layers):
    """`pattern` repeated over `num_layers` layers."""
    return tuple(pattern[i % len(pattern)] for i in range(num_layers))


# === Gemma 1 ===
# Table 1 of "Gemma: Open Models Based on Gemini Research and Technology" (2024).
_GEMMA_2B = {
    "num_layers": 18,
    "num_query_heads": 8,
    "num_key_value_heads": 1,
    "hidden_dim": 2048,
    "intermediate_dim": 32768,
    "head_dim": 256,
    "layer_norm_epsilon": 1e-6,
    "rope_max_wavelength": 10000.0,
}
_GEMMA_7B = {
    "num_layers": 28,
    "num_query_heads": 16,
    "num_key_value_heads": 16,
    "hidden_dim": 3072,
    "intermediate_dim": 49152,
    "head_dim": 256,
    "layer_norm_epsilon": 1e-6,
    "rope_max_wavelength": 10000.0,
}
PAPER_VOCABULARY_SIZE = 256128  # Table 1 counts the embedding with this.
RELEASED_VOCABULARY_SIZE = 256000  # What the published checkpoints carry.

# === Gemma 2 ===
# "Gemma 2: Improving Open Language Models at a Practical Size" (2024): local
# (4096-token window) and global layers alternate, local first; norms after each
# sub-layer too; logits soft-capped. Queries scale by head_dim, except in 27B
# (hidden_dim / num_query_heads = 144).
_GEMMA2 = {
    "vocabulary_size": RELEASED_VOCABULARY_SIZE,
    "layer_norm_epsilon": 1e-6,
    "rope_max_wavelength": 10000.0,
    "use_post_attention_norm": True,
    "use_post_ffw_norm": True,
    "sliding_window_size": 4096,
    "attention_logit_soft_cap": 50.0,
    "final_logit_soft_cap": 30.0,
}
_GEMMA2_LAYERS = (_SLIDING, _FULL)
_GEMMA2_2B = _frozen(
    _GEMMA2,
    num_layers=26, num_query_heads=8, num_key_value_heads=4, hidden_dim=2304,
    intermediate_dim=18432, head_dim=256, query_pre_attn_scalar=256,
    layer_types=_layer_types(_GEMMA2_LAYERS, 26),
)
_GEMMA2_9B = _frozen(
    _GEMMA2,
    num_layers=42, num_query_heads=16, num_key_value_heads=8, hidden_dim=3584,
    intermediate_dim=28672, head_dim=256, query_pre_attn_scalar=256,
    layer_types=_layer_types(_GEMMA2_LAYERS, 42),
)
_GEMMA2_27B = _frozen(
    _GEMMA2,
    num_layers=46, num_query_heads=32, num_key_value_heads=16, hidden_dim=4608,
    intermediate_dim=73728, head_dim=128, query_pre_attn_scalar=144,
    layer_types=_layer_types(_GEMMA2_LAYERS, 46),
)

# === Gemma 3 (text) ===
# "Gemma 3 Technical Report" (2025): five local layers per global one, RMSNorm on
# queries and keys, no soft caps; RoPE base 10k on local layers and 1M on global
# ones, whose positions are scaled by 8 (linear) in 4B, 12B and 27B. Window 512 in
# 270M and 1B, 1024 above. Queries scale by head_dim, except in 27B
# (hidden_dim / num_query_heads = 168). 262144 tokens, as in the text checkpoints
# (the image-text ones add 64 embedding rows for image tokens).
_GEMMA3 = {
    "vocabulary_size": 262144,
    "layer_norm_epsilon": 1e-6,
    "rope_max_wavelength": 1_000_000.0,
    "local_rope_max_wavelength": 10000.0,
    "use_post_attention_norm": True,
    "use_post_ffw_norm": True,
    "use_query_key_norm": True,
}
_GEMMA3_LAYERS = (_SLIDING,) * 5 + (_FULL,)
_GEMMA3_270M = _frozen(
    _GEMMA3,
    num_layers=18, num_query_heads=4, num_key_value_heads=1, hidden_dim=640,
    intermediate_dim=4096, head_dim=256, query_pre_attn_scalar=256,
    sliding_window_size=512, layer_types=_layer_types(_GEMMA3_LAYERS, 18),
)
_GEMMA3_1B = _frozen(
    _GEMMA3,
    num_layers=26, num_query_heads=4, num_key_value_heads=1, hidden_dim=1152,
    intermediate_dim=13824, head_dim=256, query_pre_attn_scalar=256,
    sliding_window_size=512, layer_types=_layer_types(_GEMMA3_LAYERS, 26),
)
_GEMMA3_4B = _frozen(
    _GEMMA3,
    num_layers=34, num_query_heads=8, num_key_value_heads=4, hidden_dim=2560,
    intermediate_dim=20480, head_dim=256, query_pre_attn_scalar=256,
    sliding_window_size=1024, rope_scaling_factor=8.0,
    layer_types=_layer_types(_GEMMA3_LAYERS, 34),
)
_GEMMA3_12B = _frozen(
    _GEMMA3,
    num_layers=48, num_query_heads=16, num_key_value_heads=8, hidden_dim=3840,
    intermediate_dim=30720, head_dim=256, query_pre_attn_scalar=256,
    sliding_window_size=1024, rope_scaling_factor=8.0,
    layer_types=_layer_types(_GEMMA3_LAYERS, 48),
)
_GEMMA3_27B = _frozen(
    _GEMMA3,
    num_layers=62, num_query_heads=32, num_key_value_heads=16, hidden_dim=5376,
    intermediate_dim=43008, head_dim=128, query_pre_attn_scalar=168,
    sliding_window_size=1024, rope_scaling_factor=8.0,
    layer_types=_layer_types(_GEMMA3_LAYERS, 62),
)

# name -> backbone config. The paper's names use the paper's vocabulary; the
# released names (keras-hub's spelling) the checkpoints'. Pretrained and
# instruction-tuned checkpoints share their architecture.
PRESETS = types.MappingProxyType(
    {
        "gemma_2b": _frozen(_GEMMA_2B, vocabulary_size=PAPER_VOCABULARY_SIZE),
        "gemma_7b": _frozen(_GEMMA_7B, vocabulary_size=PAPER_VOCABULARY_SIZE),
        "gemma_2b_en": _frozen(_GEMMA_2B, vocabulary_size=RELEASED_VOCABULARY_SIZE),
        "gemma_instruct_2b_en": _frozen(_GEMMA_2B, vocabulary_size=RELEASED_VOCABULARY_SIZE),
        "gemma_7b_en": _frozen(_GEMMA_7B, vocabulary_size=RELEASED_VOCABULARY_SIZE),
        "gemma_instruct_7b_en": _frozen(_GEMMA_7B, vocabulary_size=RELEASED_VOCABULARY_SIZE),
        "gemma2_2b_en": _GEMMA2_2B,
        "gemma2_instruct_2b_en": _GEMMA2_2B,
        "gemma2_9b_en": _GEMMA2_9B,
        "gemma2_instruct_9b_en": _GEMMA2_9B,
        "gemma2_27b_en": _GEMMA2_27B,
        "gemma2_instruct_27b_en": _GEMMA2_27B,
        "gemma3_270m": _GEMMA3_270M,
        "gemma3_instruct_270m": _GEMMA3_270M,
        "gemma3_1b": _GEMMA3_1B,
        "gemma3_instruct_1b": _GEMMA3_1B,
        "gemma3_4b_text": _GEMMA3_4B,
        "gemma3_instruct_4b_text": _GEMMA3_4B,
        "gemma3_12b_text": _GEMMA3_12B,
        "gemma3_instruct_12b_text": _GEMMA3_12B,
        "gemma3_27b_text": _GEMMA3_27B,
        "gemma3_instruct_27b_text": _GEMMA3_27B,
    }
)


def backbone_config(name):
    """The `GemmaBackbone` constructor arguments of a named architecture (a
    new dict, `layer_types` a list)."""
    if name not in PRESETS:
        raise ValueError(
            f"Unknown preset {name!r}. Named presets (architectures only, no "
            f"weights): {', '.join(PRESETS)}. For weights, pass a checkpoint "
            "(a directory written by save_to_preset, a Hugging Face Transformers "
            "directory or a .gguf file)."
        )
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in PRESETS[name].items()
    }
