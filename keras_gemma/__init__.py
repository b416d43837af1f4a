"""keras_gemma: Gemma as Keras 3 layers and models on JAX, TensorFlow and PyTorch."""

from keras_gemma import distribution
from keras_gemma import layers
from keras_gemma.chat import format_chat
from keras_gemma import planner
from keras_gemma import presets
from keras_gemma.models.gemma_backbone import GemmaBackbone
from keras_gemma.models.gemma_causal_lm import GemmaCausalLM
from keras_gemma.models.gemma_causal_lm_preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.models.gemma_tokenizer import GemmaTokenizer

__version__ = "0.1.0"

__all__ = [
    "GemmaBackbone",
    "GemmaCausalLM",
    "GemmaCausalLMPreprocessor",
    "GemmaTokenizer",
    "distribution",
    "format_chat",
    "layers",
    "planner",
    "presets",
]
