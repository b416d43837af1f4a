"""The tiny architectures, data and fit helper the workers here share
(imported after each worker has chosen its backend)."""

import keras
import numpy as np

BASE = dict(
    vocabulary_size=256, num_layers=2, num_query_heads=8, hidden_dim=32,
    intermediate_dim=64, head_dim=16,
)
ARCHITECTURES = {
    "multi_query": dict(num_key_value_heads=1),
    "grouped_query": dict(num_key_value_heads=2),
    "multi_head": dict(num_key_value_heads=8),
    # Gemma 3: query-key norm, a sliding window, post norms, soft caps off.
    "gemma3": dict(
        num_key_value_heads=2, use_query_key_norm=True, use_post_attention_norm=True,
        use_post_ffw_norm=True, query_pre_attn_scalar=16.0, sliding_window_size=4,
        layer_types=["sliding_attention", "full_attention"], local_rope_max_wavelength=10000.0,
    ),
}


def data(seed=0, rows=16, length=12):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(1, BASE["vocabulary_size"], size=(rows, length)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[1::3, length - 3 :] = 0  # some padded rows
    x = {"token_ids": token_ids, "padding_mask": padding_mask}
    y = np.roll(token_ids, -1, axis=1)
    return x, y, padding_mask.astype("float32")


def fit_losses(lm, x, y=None, sample_weight=None, batch_size=None):
    """One epoch of `fit` on the compiled `lm`, in order: the loss Keras
    reports after each batch."""
    losses = []
    callback = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"]))
    )
    lm.fit(x, y, sample_weight=sample_weight, batch_size=batch_size, epochs=1, shuffle=False,
           verbose=0, callbacks=[callback])
    return losses


def bytes_per_device(variables):
    """The largest number of bytes any one device holds of `variables` (JAX
    arrays)."""
    held = {}
    for variable in variables:
        for shard in variable.value.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())
