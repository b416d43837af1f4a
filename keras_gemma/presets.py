"""Gemma architectures as data: the paper's Table 1 and the released checkpoints.

These are configurations only: keras_gemma ships no weights. Build one with
`GemmaBackbone.from_preset(name, load_weights=False)` (random weights), or
pass a checkpoint directory to `from_preset` for real ones.
"""

import types

# Table 1 of "Gemma: Open Models Based on Gemini Research and Technology" (2024).
# `intermediate_dim` counts the gate and up branches together, as Table 1 does.
_GEMMA_2B = types.MappingProxyType(
    {
        "num_layers": 18,
        "num_query_heads": 8,
        "num_key_value_heads": 1,
        "hidden_dim": 2048,
        "intermediate_dim": 32768,
        "head_dim": 256,
        "layer_norm_epsilon": 1e-6,
        "rope_max_wavelength": 10000.0,
    }
)
_GEMMA_7B = types.MappingProxyType(
    {
        "num_layers": 28,
        "num_query_heads": 16,
        "num_key_value_heads": 16,
        "hidden_dim": 3072,
        "intermediate_dim": 49152,
        "head_dim": 256,
        "layer_norm_epsilon": 1e-6,
        "rope_max_wavelength": 10000.0,
    }
)
PAPER_VOCABULARY_SIZE = 256128  # Table 1 counts the embedding with this.
RELEASED_VOCABULARY_SIZE = 256000  # What the published checkpoints carry.
CONTEXT_LENGTH = 8192

# name -> (backbone config, description). Paper names use the paper's
# vocabulary; the released names (keras-hub's spelling) use the checkpoints'.
PRESETS = types.MappingProxyType(
    {
        "gemma_2b": (
            {**_GEMMA_2B, "vocabulary_size": PAPER_VOCABULARY_SIZE},
            "Gemma 2B as in the paper (Table 1), 256128-token vocabulary.",
        ),
        "gemma_7b": (
            {**_GEMMA_7B, "vocabulary_size": PAPER_VOCABULARY_SIZE},
            "Gemma 7B as in the paper (Table 1), 256128-token vocabulary.",
        ),
        "gemma_2b_en": (
            {**_GEMMA_2B, "vocabulary_size": RELEASED_VOCABULARY_SIZE},
            "Released Gemma 2B (pretrained) architecture.",
        ),
        "gemma_instruct_2b_en": (
            {**_GEMMA_2B, "vocabulary_size": RELEASED_VOCABULARY_SIZE},
            "Released Gemma 2B instruction-tuned architecture.",
        ),
        "gemma_7b_en": (
            {**_GEMMA_7B, "vocabulary_size": RELEASED_VOCABULARY_SIZE},
            "Released Gemma 7B (pretrained) architecture.",
        ),
        "gemma_instruct_7b_en": (
            {**_GEMMA_7B, "vocabulary_size": RELEASED_VOCABULARY_SIZE},
            "Released Gemma 7B instruction-tuned architecture.",
        ),
    }
)


def backbone_config(name):
    """The `GemmaBackbone` constructor arguments of a named architecture."""
    if name not in PRESETS:
        raise ValueError(
            f"Unknown preset {name!r}. Named presets (architectures only, no "
            f"weights): {', '.join(PRESETS)}. For weights, pass a checkpoint "
            "directory (keras_gemma/keras-hub preset or Hugging Face format)."
        )
    return dict(PRESETS[name][0])
