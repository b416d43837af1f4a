"""`keras-gemma`: generate text from the command line.

    keras-gemma generate "The capital of France is"
    keras-gemma generate --preset path/to/checkpoint --max-length 64 "Once upon"
"""

import argparse
import io
import sys

# Text for the demo tokenizer of the random model (no checkpoint is needed).
_DEMO_TEXT = [
    "Gemma is a family of lightweight, state-of-the-art open models built from "
    "the research and technology used to create Gemini models.",
    "The models are decoder-only transformers with rotary position embeddings, "
    "GeGLU feed-forward layers and RMSNorm, trained on up to 6T tokens of text.",
    "Keras runs the same model code on JAX, TensorFlow and PyTorch.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time there was a small model that wanted to be useful.",
]

DEMO_NOTICE = (
    "keras-gemma: no --preset given, so this generates from a small RANDOMLY "
    "INITIALISED Gemma (2 layers, untrained): the output is noise that shows the "
    "pipeline runs. Pass --preset DIR with a checkpoint for real text."
)


def demo_model(seed=0):
    """A tiny random Gemma with a SentencePiece vocabulary trained on the spot."""
    import keras
    import sentencepiece as spm

    from keras_gemma.models.gemma_backbone import GemmaBackbone
    from keras_gemma.models.gemma_causal_lm import GemmaCausalLM
    from keras_gemma.models.gemma_causal_lm_preprocessor import (
        GemmaCausalLMPreprocessor,
    )
    from keras_gemma.models.gemma_tokenizer import GemmaTokenizer

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_DEMO_TEXT),
        model_writer=proto,
        vocab_size=400,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        byte_fallback=True,
        minloglevel=2,
    )
    tokenizer = GemmaTokenizer(proto=proto.getvalue())
    keras.utils.set_random_seed(seed)
    backbone = GemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=1,
        hidden_dim=64,
        intermediate_dim=256,
        head_dim=16,
    )
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=256)
    return GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)


def _generate(args):
    from keras_gemma.models.gemma_causal_lm import GemmaCausalLM

    if args.preset is None:
        print(DEMO_NOTICE, file=sys.stderr)
        lm = demo_model()
    else:
        lm = GemmaCausalLM.from_preset(args.preset)
    lm.compile(sampler=args.sampler)
    text = lm.generate(
        args.prompt, max_length=args.max_length, strip_prompt=args.strip_prompt
    )
    print(text)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="keras-gemma", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="continue a prompt")
    generate.add_argument("prompt", help="the text to continue")
    generate.add_argument(
        "--preset",
        help="checkpoint directory (save_to_preset or Hugging Face Transformers); "
        "without it, a small random demo model",
    )
    generate.add_argument("--max-length", type=int, default=32, help="total tokens, prompt included")
    generate.add_argument("--sampler", default="greedy", help="greedy, top_k, top_p, random, beam")
    generate.add_argument("--strip-prompt", action="store_true", help="print only the new text")
    args = parser.parse_args(argv)
    return _generate(args)


if __name__ == "__main__":
    sys.exit(main())
