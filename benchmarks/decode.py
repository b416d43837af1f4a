"""Decode speed, b2l protocol (../shared/BENCHMARKS.md): keras_gemma vs keras-hub
(same backend) vs transformers (PyTorch eager), in one run, with the roofline.

b2l is the 2B architecture with 2 layers and the 256000 vocabulary, float32,
random weights (744.5 M parameters, 2.98 GB read per token). Batch 1, a
32-token prompt, 32 new tokens, greedy, no early stop; each system gets one
warm-up call (reported as "first call", compile included), then the best of 3
calls; keras_gemma and keras-hub runs alternate (A B A B) and the best of each
is kept. tokens/s = new tokens / wall time of a call (prefill included).

Roofline: tokens/s <= bandwidth / bytes read per token, with the bandwidth of
a jitted float32 matrix-vector product (256000 x 2048) measured at the start,
middle and end of each backend's run (best kept). numpy's (OpenBLAS) matvec
is measured too and shown, as a second estimate.

Also, per backend: batch 8 throughput, 512-token prefill (prompt tokens/s =
512 / time to the first new token), and int8/int4 weights (`quantize`): memory
of the weights and decode speed (4 new tokens, one call after the warm-up).

    python benchmarks/decode.py [--backends jax,tensorflow,torch] [--json out.json] [--plot out.png]
"""

import argparse
import json
import os
import subprocess
import sys
import time

B2L = dict(
    vocabulary_size=256000, num_layers=2, num_query_heads=8, num_key_value_heads=1,
    hidden_dim=2048, intermediate_dim=32768, head_dim=256,
)
PROMPT, NEW, REPEATS = 32, 32, 3


def inputs(batch, prompt, new):
    import numpy as np

    token_ids = np.zeros((batch, prompt + new), "int32")
    token_ids[:, :prompt] = np.random.RandomState(0).randint(4, 1000, (batch, prompt))
    token_ids[:, 0] = 2
    return {"token_ids": token_ids, "padding_mask": token_ids != 0}


def timed(fn, repeats=REPEATS):
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return first, best


def bandwidth():
    """(jitted matvec GB/s, numpy matvec GB/s): best of 5 each."""
    import numpy as np

    w = np.random.RandomState(1).rand(256000, 2048).astype("float32")
    x = np.ones((2048,), "float32")
    results = []
    try:
        import jax

        wj, xj = jax.device_put(w), jax.device_put(x)
        f = jax.jit(lambda w, x: w @ x)
        run = lambda: f(wj, xj).block_until_ready()  # noqa: E731
    except ImportError:
        run = None
    for fn in (run, lambda: w @ x):
        if fn is None:
            results.append(None)
            continue
        fn()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        results.append(w.nbytes / best / 1e9)
    return results


def weight_bytes(model):
    import numpy as np

    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)


def worker(backend, only=None):
    """All rows for one Keras backend (runs in its own process)."""
    os.environ["KERAS_BACKEND"] = backend
    import gc

    import keras
    import keras_hub

    import keras_gemma

    rows, bandwidths = [], [bandwidth()]

    def row(system, **fields):
        rows.append({"backend": backend, "system": system, **fields})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    ours = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**B2L), preprocessor=None)
    hub = keras_hub.models.GemmaCausalLM(keras_hub.models.GemmaBackbone(**B2L), preprocessor=None)
    hub.compile(sampler="greedy")
    ours.compile(sampler="greedy")
    models = {"keras_gemma": ours, "keras-hub": hub}

    def decode(model, batch=1, new=NEW, repeats=REPEATS):
        x = inputs(batch, PROMPT, new)
        return timed(lambda: model.generate(x, stop_token_ids=None), repeats)

    for batch in () if only == "quantized" else (1, 8):
        results = {name: [] for name in models}
        for _ in range(2):  # A B A B
            for name, model in models.items():
                results[name].append(decode(model, batch))
        if batch == 1:
            bandwidths.append(bandwidth())
            bandwidth_row(rows, row, bandwidths, keras, keras_hub)
        for name, runs in results.items():
            first = runs[0][0]
            best = min(b for _, b in runs)
            row(name, batch=batch, tokens_per_s=batch * NEW / best, first_call_s=first)

    for name, model in {} if only == "quantized" else models.items():  # 512-token prefill
        x = inputs(1, 512, 1)
        first, best = timed(lambda: model.generate(x, stop_token_ids=None))
        row(name, batch=1, prefill_tokens_per_s=512 / best, prefill_first_call_s=first)

    weights = weight_bytes(ours)
    row("keras_gemma", weight_gb=weights / 1e9)
    del models, hub, ours
    gc.collect()
    for mode in () if only == "float32" else ("int8", "int4"):
        try:
            lm = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**B2L), preprocessor=None)
            lm.quantize(mode)
            lm.compile(sampler="greedy")
            # 4 new tokens, one timed call: quantized decoding is slow on CPU.
            first, best = decode(lm, new=4, repeats=1)
            row(
                f"keras_gemma {mode}", batch=1, tokens_per_s=4 / best, first_call_s=first,
                weight_gb=weight_bytes(lm) / 1e9, weight_fraction=weight_bytes(lm) / weights,
            )
        except Exception as error:  # reported, not hidden
            row(f"keras_gemma {mode}", error=f"{type(error).__name__}: {error}"[:300])
        lm = None
        gc.collect()
    bandwidths.append(bandwidth())
    bandwidth_row(rows, row, bandwidths, keras, keras_hub)
    return rows


def bandwidth_row(rows, row, bandwidths, keras, keras_hub):
    """(Re)places the row with the best bandwidth measured so far."""
    rows[:] = [r for r in rows if r["system"] != "bandwidth"]
    jitted = [b[0] for b in bandwidths if b[0]]
    row("bandwidth", jitted_matvec_gb_s=max(jitted) if jitted else None,
        numpy_matvec_gb_s=max(b[1] for b in bandwidths), keras_version=keras.__version__,
        keras_hub_version=keras_hub.__version__)


def transformers_worker():
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(
        vocab_size=B2L["vocabulary_size"], hidden_size=2048, intermediate_size=16384,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
    )
    model = GemmaForCausalLM(config).eval()
    rows = []
    for batch in (1, 8):
        x = torch.tensor(inputs(batch, PROMPT, NEW)["token_ids"][:, :PROMPT], dtype=torch.long)

        def call():
            with torch.no_grad():
                model.generate(x, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)

        first, best = timed(call)
        rows.append({"backend": "torch", "system": "transformers (eager)", "batch": batch,
                     "tokens_per_s": batch * NEW / best, "first_call_s": first})
    x = torch.tensor(inputs(1, 512, 1)["token_ids"][:, :512], dtype=torch.long)
    first, best = timed(lambda: model.generate(x, max_new_tokens=1, do_sample=False))
    rows.append({"backend": "torch", "system": "transformers (eager)", "batch": 1,
                 "prefill_tokens_per_s": 512 / best})
    return rows


def table(rows):
    bytes_per_token = 744.5e6 * 4 / 1e9  # GB
    lines = []
    for backend in sorted({r["backend"] for r in rows}):
        rs = [r for r in rows if r["backend"] == backend]
        bw = next((r for r in rs if r["system"] == "bandwidth"), None)
        roof = bw["jitted_matvec_gb_s"] / bytes_per_token if bw and bw["jitted_matvec_gb_s"] else None
        roof_np = bw["numpy_matvec_gb_s"] / bytes_per_token if bw else None
        hub = next((r for r in rs if r["system"] == "keras-hub" and r.get("batch") == 1 and "tokens_per_s" in r), None)
        if bw:
            lines.append(f"\n{backend}: bandwidth {bw['jitted_matvec_gb_s']:.1f} GB/s jitted matvec "
                         f"(roofline {roof:.1f} tok/s), {bw['numpy_matvec_gb_s']:.1f} GB/s numpy "
                         f"(roofline {roof_np:.1f} tok/s)")
        else:
            lines.append(f"\n{backend}")
        lines.append("| system | batch | tokens/s | x keras-hub | roofline (jitted / numpy) | first call (s) | weights (GB) |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in rs:
            if "tokens_per_s" not in r:
                if "error" in r:
                    lines.append(f"| {r['system']} | | error: {r['error']} | | | | |")
                continue
            ratio = f"{r['tokens_per_s'] / hub['tokens_per_s']:.2f}" if hub and r.get("batch") == 1 else ""
            frac = ""
            if roof and r.get("batch") == 1:
                frac = f"{r['tokens_per_s'] / roof:.0%} / {r['tokens_per_s'] / roof_np:.0%}"
            weights = f"{r['weight_gb']:.2f}" if "weight_gb" in r else ""
            lines.append(f"| {r['system']} | {r['batch']} | {r['tokens_per_s']:.2f} | {ratio} | {frac} | "
                         f"{r['first_call_s']:.1f} | {weights} |")
        for r in rs:
            if "prefill_tokens_per_s" in r:
                lines.append(f"| {r['system']}: 512-token prefill | 1 | {r['prefill_tokens_per_s']:.0f} prompt tok/s | | | | |")
        for r in rs:
            if r.get("system") == "keras_gemma" and "weight_gb" in r and "tokens_per_s" not in r:
                lines.append(f"| keras_gemma float32 weights | | | | | | {r['weight_gb']:.2f} |")
    return "\n".join(lines)


def write_outputs(rows, json_path, plot_path):
    """Writes the rows as JSON (if asked) and returns pyplot, set up
    headless, when a plot is asked for (else None)."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    if not plot_path:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="jax,tensorflow,torch")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--only", choices=("float32", "quantized"),
        help="only the float32 rows, or only the int8/int4 rows (the slow ones on CPU)",
    )
    args = parser.parse_args()
    if args.worker:
        if args.worker == "transformers":
            rows = transformers_worker()
        else:
            rows = worker(args.worker, args.only)
        print(json.dumps(rows))
        return
    rows = []
    for name in args.backends.split(",") + ["transformers"]:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        # The worker's stderr (one JSON line per finished row) streams through.
        command = [sys.executable, __file__, "--worker", name]
        if args.only and name != "transformers":
            command += ["--only", args.only]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            sys.exit(f"{name} failed (exit code {done.returncode}); its output is above.")
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    print(table(rows))
    plt = write_outputs(rows, args.json, args.plot)
    if plt:
        bars = [r for r in rows if r.get("batch") == 1 and "tokens_per_s" in r]
        labels = [f"{r['system']}\n{r['backend']}" for r in bars]
        plt.figure(figsize=(max(6, len(bars) * 0.9), 4))
        plt.bar(labels, [r["tokens_per_s"] for r in bars])
        plt.ylabel("new tokens/s (b2l, batch 1)")
        plt.xticks(rotation=60, ha="right", fontsize=7)
        plt.tight_layout()
        plt.savefig(args.plot)


if __name__ == "__main__":
    main()
