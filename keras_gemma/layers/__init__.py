"""Gemma's layers, one per file, in the order the paper describes them."""

from keras_gemma.layers.rms_normalization import RMSNormalization
from keras_gemma.layers.rotary_embedding import RotaryEmbedding
from keras_gemma.layers.attention import GemmaAttention
from keras_gemma.layers.attention import causal_attention_mask
from keras_gemma.layers.feed_forward import GemmaFeedForward
from keras_gemma.layers.decoder_block import GemmaDecoderBlock

__all__ = [
    "RMSNormalization",
    "RotaryEmbedding",
    "GemmaAttention",
    "causal_attention_mask",
    "GemmaFeedForward",
    "GemmaDecoderBlock",
]
