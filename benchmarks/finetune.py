"""Fine-tuning speed and memory, b2l protocol (../shared/BENCHMARKS.md):
keras_gemma vs keras-hub on each backend, in one run.

b2l (the 2B architecture with 2 layers and the 256000 vocabulary, float32,
random weights), LoRA rank 4 on query and value, AdamW, the default
`compile()` loss and metrics, preprocessed random tokens.

- Speed: batch 2, sequence 64. Both models live in one process per backend;
  rounds alternate (A B A B), each round times `STEPS` `train_on_batch` calls
  after a warm-up call (the first call, compile included, is reported), and
  the best round of each is kept. Model-FLOPs utilisation = tokens/s x 2.978
  GFLOP per token (forward 2 x 744.5 M matmul parameters, backward the same
  for input gradients) / the float32 matmul rate measured in the same worker
  (best of a jitted JAX and a numpy product, before and after the rounds).
  Beside it, the utilisation the step would have if it did nothing but its
  matrix products, each at the best rate measured for its shape
  (`products_ceiling_s`): what this machine allows at these shapes.
- Memory: batch 1, sequence 2048: each system in its own process, two
  training steps; the process's peak resident memory during those steps
  (Linux VmHWM, reset after the model is built; weights, 3 GB, and the
  libraries included), and the step time.

    python benchmarks/finetune.py [--backends jax,tensorflow,torch] [--json out.json] [--plot out.png]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import B2L, write_outputs  # noqa: E402

FLOP_PER_TOKEN = 2.978e9
BATCH, SEQ, STEPS, ROUNDS = 2, 64, 5, 2
LONG_SEQ = 2048


def matmul_rate():
    """float32 GFLOP/s of a (512, 2048) x (2048, 16384) product: best of a
    jitted JAX product and numpy's, 5 tries each."""
    import numpy as np

    a = np.random.RandomState(0).rand(512, 2048).astype("float32")
    b = np.random.RandomState(1).rand(2048, 16384).astype("float32")
    flop = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    runs = [lambda: a @ b]
    try:
        import jax

        aj, bj = jax.device_put(a), jax.device_put(b)
        f = jax.jit(lambda x, y: x @ y)
        runs.append(lambda: f(aj, bj).block_until_ready())
    except ImportError:
        pass
    best = float("inf")
    for run in runs:
        run()
        for _ in range(5):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return flop / best / 1e9


def products_ceiling_s(rows):
    """Seconds that the matrix products of one b2l LoRA training step on
    `rows` tokens take on their own: each weight's forward product and,
    where the step needs it, its input-gradient product, every one at the
    best of 3 runs over numpy and jitted JAX in either operand layout. A step
    built on these libraries' products takes longer than that, so FLOP /
    this time / the matmul rate bounds its model-FLOPs utilisation.
    (The attention score products and the rank-4 adapters, under 1% of the
    work, are left out.)"""
    import numpy as np

    rng = np.random.RandomState(0)
    hidden, layers = B2L["hidden_dim"], B2L["num_layers"]
    heads = B2L["num_query_heads"] * B2L["head_dim"]
    kv = B2L["num_key_value_heads"] * B2L["head_dim"]
    branch = B2L["intermediate_dim"] // 2
    # (inputs, outputs, forward products, input-gradient products) per step.
    # The first layer's query, key and value need no input gradient: the
    # embedding below them is frozen.
    weights = [
        (hidden, heads, layers, layers - 1), (hidden, kv, 2 * layers, 2 * layers - 2),
        (heads, hidden, layers, layers), (hidden, branch, 2 * layers, 2 * layers),
        (branch, hidden, layers, layers), (hidden, B2L["vocabulary_size"], 1, 1),
    ]
    try:
        import jax

        product = jax.jit(lambda a, m: a @ m)
        swapped = jax.jit(lambda a, m: (m.T @ a.T).T)
    except ImportError:
        jax = None

    def best(a, m):
        candidates = [lambda: a @ m, lambda: (m.T @ a.T).T]
        if jax:
            aj, mj = jax.device_put(a), jax.device_put(m)
            candidates += [lambda f=f: f(aj, mj).block_until_ready() for f in (product, swapped)]
        times = []
        for run in candidates:
            run()
            for _ in range(3):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
        return min(times)

    total = 0.0
    for k, n, forward, backward in weights:
        # The vocabulary is stored (vocabulary, hidden), as the embedding.
        w = rng.rand(k, n).astype("float32") if n < 100_000 else rng.rand(n, k).astype("float32").T
        total += forward * best(rng.rand(rows, k).astype("float32"), w)
        total += backward * best(rng.rand(rows, n).astype("float32"), w.T)
        del w
    return total


def batch(batch_size, seq):
    import numpy as np

    rng = np.random.RandomState(0)
    token_ids = rng.randint(4, B2L["vocabulary_size"], (batch_size, seq + 1)).astype("int32")
    x = {"token_ids": token_ids[:, :-1], "padding_mask": np.ones((batch_size, seq), bool)}
    return x, token_ids[:, 1:], np.ones((batch_size, seq), "float32")


def build(system):
    import keras

    if system == "keras_gemma":
        import keras_gemma as package
    else:
        import keras_hub
        package = keras_hub.models
    model = package.GemmaCausalLM(package.GemmaBackbone(**B2L), preprocessor=None)
    model.backbone.enable_lora(4)
    # Default loss and metrics. keras_gemma compiles TensorFlow training with
    # XLA by default; Keras' default for keras-hub on a CPU-only machine is
    # no XLA, so "keras-hub (XLA)" is keras-hub with `jit_compile=True`.
    jit = {"jit_compile": True} if system == "keras-hub (XLA)" else {}
    model.compile(optimizer=keras.optimizers.AdamW(1e-4), **jit)
    return model


def reset_peak_rss():
    """Linux: restart the process's resident-memory high-water mark (VmHWM),
    so that building the model (random initialisation peaks at about 9 GB
    for b2l) does not hide the training peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_gb():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) / 1e6


def speed_worker(backend):
    os.environ["KERAS_BACKEND"] = backend
    import keras_hub  # noqa: F401

    rows, rates = [], [matmul_rate()]
    ceiling_s = products_ceiling_s(BATCH * SEQ)
    names = ["keras_gemma", "keras-hub"] + (["keras-hub (XLA)"] if backend == "tensorflow" else [])
    models = {name: build(name) for name in names}
    x, y, w = batch(BATCH, SEQ)
    first, best = {}, {name: float("inf") for name in models}
    for name, model in models.items():
        start = time.perf_counter()
        model.train_on_batch(x, y, sample_weight=w)
        first[name] = time.perf_counter() - start
    for _ in range(ROUNDS):  # A B A B
        for name, model in models.items():
            model.train_on_batch(x, y, sample_weight=w)  # warm-up
            start = time.perf_counter()
            for _ in range(STEPS):
                logs = model.train_on_batch(x, y, sample_weight=w, return_dict=True)
            float(logs["loss"])
            best[name] = min(best[name], (time.perf_counter() - start) / STEPS)
    rates.append(matmul_rate())
    rate = max(rates)
    for name, model in models.items():
        tokens_per_s = BATCH * SEQ / best[name]
        rows.append({
            "backend": backend, "system": name, "batch": BATCH, "seq": SEQ,
            "tokens_per_s": tokens_per_s, "first_step_s": first[name],
            "mfu": tokens_per_s * FLOP_PER_TOKEN / (rate * 1e9), "matmul_gflop_s": rate,
            "products_ceiling_mfu": BATCH * SEQ * FLOP_PER_TOKEN / ceiling_s / (rate * 1e9),
        })
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def memory_worker(backend, system):
    os.environ["KERAS_BACKEND"] = backend
    import keras_hub  # noqa: F401

    model = build(system)
    x, y, w = batch(1, LONG_SEQ)
    reset_peak_rss()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        logs = model.train_on_batch(x, y, sample_weight=w, return_dict=True)
        float(logs["loss"])
        times.append(time.perf_counter() - start)
    row = {
        "backend": backend, "system": system, "batch": 1, "seq": LONG_SEQ,
        "peak_gb": peak_rss_gb(), "step_s": times[-1], "first_step_s": times[0],
    }
    print(json.dumps(row), file=sys.stderr, flush=True)
    return [row]


def table(rows):
    lines = []
    for backend in sorted({r["backend"] for r in rows}):
        rs = [r for r in rows if r["backend"] == backend]
        speed = {r["system"]: r for r in rs if r.get("seq") == SEQ}
        memory = {r["system"]: r for r in rs if r.get("seq") == LONG_SEQ}
        rate = next((r["matmul_gflop_s"] for r in speed.values()), None)
        if rate:
            ceiling = next(iter(speed.values()))["products_ceiling_mfu"]
            lines.append(f"\n{backend}: float32 matmul {rate:.0f} GFLOP/s; the step's matrix products "
                         f"alone, each at its best measured rate, would be {ceiling:.0%} MFU")
        else:
            lines.append(f"\n{backend}")
        lines.append(f"| system | tokens/s (b{BATCH} s{SEQ}) | x keras-hub | MFU | first step (s) | "
                     f"peak GB (b1 s{LONG_SEQ}) | x keras-hub | step (s, s{LONG_SEQ}) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for name in ("keras_gemma", "keras-hub", "keras-hub (XLA)"):
            s, m = speed.get(name), memory.get(name)
            if not (s or m):
                continue
            hs, hm = speed.get("keras-hub"), memory.get("keras-hub")
            cells = [name]
            cells += [f"{s['tokens_per_s']:.1f}", f"{s['tokens_per_s'] / hs['tokens_per_s']:.2f}" if hs else "",
                      f"{s['mfu']:.0%}", f"{s['first_step_s']:.1f}"] if s else ["", "", "", ""]
            cells += [f"{m['peak_gb']:.1f}", f"{m['peak_gb'] / hm['peak_gb']:.2f}" if hm else "",
                      f"{m['step_s']:.1f}"] if m else ["", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_worker(*args):
    command = [sys.executable, os.path.abspath(__file__), "--worker", *args]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed (exit code {done.returncode}); its output is above.")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="jax,tensorflow,torch")
    parser.add_argument("--only", choices=("speed", "memory"), help="only one of the two parts")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, backend, *system = args.worker
        rows = speed_worker(backend) if kind == "speed" else memory_worker(backend, *system)
        print(json.dumps(rows))
        return
    rows = []
    for backend in args.backends.split(","):
        if args.only != "memory":
            print(f"{backend}: speed ...", file=sys.stderr, flush=True)
            rows += run_worker("speed", backend)
        if args.only != "speed":
            for system in ("keras_gemma", "keras-hub"):
                print(f"{backend}: memory, {system} ...", file=sys.stderr, flush=True)
                rows += run_worker("memory", backend, system)
    print(table(rows))
    plt = write_outputs(rows, args.json, args.plot)
    if plt:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, seq, title in (
            (axes[0], "tokens_per_s", SEQ, f"training tokens/s (batch {BATCH}, seq {SEQ})"),
            (axes[1], "peak_gb", LONG_SEQ, f"peak memory GB (batch 1, seq {LONG_SEQ})"),
        ):
            bars = [r for r in rows if r.get("seq") == seq and key in r]
            ax.bar([f"{r['system']}\n{r['backend']}" for r in bars], [r[key] for r in bars])
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="x", labelsize=7, rotation=60)
        fig.tight_layout()
        fig.savefig(args.plot)


if __name__ == "__main__":
    main()
