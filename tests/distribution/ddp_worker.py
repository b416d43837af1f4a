"""Run by test_other_backends.py: PyTorch's data parallelism
(`keras_gemma.distribution.torch_data_parallel`, DDP over gloo) in each of
two processes, or (without RANK) the same two AdamW steps in one process on
the whole batch. A PyTorch training loop, as Keras' PyTorch guide has it.
Prints the losses (process 0, averaged over both) as JSON, after `RESULT`."""

import faulthandler
import json
import os

os.environ["KERAS_BACKEND"] = "torch"
# A hung collective ends the process with every thread's stack on stderr
# (a normal run takes under 30 s), instead of a silent timeout.
faulthandler.dump_traceback_later(150, exit=True)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from cases import ARCHITECTURES  # noqa: E402
from cases import BASE  # noqa: E402

import keras_gemma  # noqa: E402

WORLD = 2


def train(module, parameters, batches):
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    losses = []
    for token_ids in batches:
        x = {"token_ids": torch.tensor(token_ids), "padding_mask": torch.ones(token_ids.shape, dtype=torch.int32)}
        logits = module(x)
        labels = torch.tensor(np.roll(token_ids, -1, axis=1)).long()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def main():
    keras.utils.set_random_seed(0)
    lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(**BASE, **ARCHITECTURES["multi_query"]), preprocessor=None
    )
    lm.backbone.enable_lora(4)
    # Two steps of 8 rows; with DDP each process takes its 4 of each step.
    batches = np.random.default_rng(0).integers(1, BASE["vocabulary_size"], size=(2, 8, 12)).astype("int32")
    if "RANK" not in os.environ:
        print("RESULT", json.dumps(train(lm, [v.value for v in lm.trainable_weights], batches)))
        return
    rank = int(os.environ["RANK"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    ddp = keras_gemma.distribution.torch_data_parallel(lm)
    local = batches[:, rank * 4 : (rank + 1) * 4]
    losses = torch.tensor(train(ddp, ddp.parameters(), local))
    torch.distributed.all_reduce(losses)  # equal halves: the mean of means
    if rank == 0:
        print("RESULT", json.dumps((losses / WORLD).tolist()), flush=True)
    # DDP's reducer holds the process group: freed after the group (when
    # main returns), its destructor hung about one run in four.
    del ddp
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
