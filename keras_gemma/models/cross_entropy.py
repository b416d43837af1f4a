"""Next-token cross-entropy over a tied 256k vocabulary, in chunks of tokens.

The plain loss computes float32 logits for every token at once and keeps them
(and their gradient) for the backward pass: `tokens x vocabulary x 4` bytes,
8 GB for 2048 tokens of Gemma's 256k vocabulary. Here logits exist for one
chunk of tokens at a time, and the gradient with respect to the hidden states
(and, when it trains, the embedding) is computed in the same pass, so the
backward pass only scales it: the same matrix products as the plain
computation, a fraction of the memory.
"""

import keras
from keras import ops

from keras_gemma.layers.projection import numpy_matmul

# Logits per chunk: chunk x vocabulary float32 values (128 MB; a chunk's
# softmax, one-hot and gradient take a few times that).
_CHUNK_ELEMENTS = 1 << 25


def chunked_cross_entropy(
    hidden_states,
    embeddings,
    labels,
    sample_weight,
    soft_cap=None,
    train_embeddings=True,
    chunk_size=None,
):
    """Weighted next-token cross-entropy and accuracy of tied-embedding logits.

    Args:
        hidden_states: `(batch, seq, hidden)` final hidden states.
        embeddings: `(vocabulary, hidden)` token embeddings; the logits are
            `hidden_states @ embeddings.T`, in float32.
        labels: int `(batch, seq)` target token ids.
        sample_weight: `(batch, seq)` weights (for example the padding mask).
        soft_cap: float or None. Final logit soft cap (`cap * tanh(x / cap)`).
        train_embeddings: bool. Whether to return a gradient for `embeddings`
            (full fine-tuning); without it the embedding is a constant here.
        chunk_size: most tokens per chunk; by default about 2**25 logits per
            chunk. With a static token count the chunks are balanced, so
            little padding is computed.

    Returns:
        float32 `(2,)`: the weighted sum of per-token losses and the weighted
        number of tokens whose argmax is the label. Differentiable in its
        first entry with respect to `hidden_states` (and `embeddings`).
    """
    # A tensor, not a variable: custom gradients differentiate arguments.
    embeddings = ops.convert_to_tensor(embeddings)
    vocabulary, hidden = embeddings.shape
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // vocabulary)
    dtype = hidden_states.dtype
    flat_labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    flat_weights = ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
    tokens = flat_labels.shape[0]  # None when only known at run time
    if tokens is not None:
        chunks = max(1, -(-tokens // chunk_size))
        chunk_size = max(1, -(-tokens // chunks))
    else:
        tokens = ops.shape(flat_labels)[0]
        chunks = (tokens + chunk_size - 1) // chunk_size
    pad = chunks * chunk_size - tokens

    def chunk_pass(flat_hidden, table):
        """Loss, correct count, and the gradients, one chunk at a time. The
        products run in the compute dtype of `hidden_states`, as the plain
        logits do; logits, softmax and sums are float32."""
        table = ops.cast(table, dtype)
        rows = ops.pad(flat_hidden, [[0, pad], [0, 0]])
        targets = ops.pad(flat_labels, [[0, pad]])
        weights = ops.pad(flat_weights, [[0, pad]])

        def chunk(start, totals, table_grad, after=None):
            x = ops.slice(rows, (start, 0), (chunk_size, hidden))
            if after is not None:
                x = ops.where(after, x, ops.zeros_like(x))
            y = ops.slice(targets, (start,), (chunk_size,))
            w = ops.slice(weights, (start,), (chunk_size,))
            logits = ops.cast(_matmul(x, ops.transpose(table)), "float32")  # (c, vocabulary)
            if soft_cap is not None:
                squashed = ops.tanh(logits / soft_cap)
                logits = squashed * soft_cap
            # Few passes over the (c, vocabulary) block: one exponential
            # serves the log-normaliser and the softmax.
            row_max = ops.max(logits, axis=-1)  # (c,)
            exp = ops.exp(logits - row_max[:, None])
            total = ops.sum(exp, axis=-1)  # (c,)
            log_norm = row_max + ops.log(total)
            label_logits = ops.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
            correct = ops.cast(_is_first_maximum(logits, label_logits, y), "float32")
            totals = totals + ops.stack(
                [ops.sum(w * (log_norm - label_logits)), ops.sum(w * correct)]
            )
            # d(sum of w * loss) / d logits = w * (softmax - one_hot).
            is_label = ops.equal(ops.arange(vocabulary, dtype="int32")[None, :], y[:, None])
            softmax = exp * (1.0 / total)[:, None]
            logit_grad = ops.where(is_label, softmax - 1.0, softmax) * w[:, None]
            if soft_cap is not None:
                logit_grad = logit_grad * (1.0 - squashed * squashed)
            logit_grad = ops.cast(logit_grad, dtype)
            row_grad = ops.cast(_matmul(logit_grad, table), "float32")  # (c, hidden)
            if train_embeddings:
                table_grad = table_grad + ops.cast(
                    _matmul(ops.transpose(logit_grad), x), "float32"
                )
            return totals, row_grad, table_grad

        totals = ops.zeros((2,), "float32")
        table_grad = ops.zeros((vocabulary, hidden), "float32") if train_embeddings else None
        if isinstance(chunks, int):
            # A static number of chunks (always on JAX): a Python loop. In an
            # XLA while loop the embedding would be loop state, and since the
            # train step also returns it (donated, aliased), XLA copies it
            # into the loop: 2 GB more for Gemma's 256k x 2048 table.
            # Each chunk's input waits for the previous chunk's results (a
            # select that never changes a value), so XLA runs the chunks one
            # after another instead of holding all their logits at once.
            row_grads = []
            for i in range(chunks):
                after = None
                if row_grads:
                    after = ops.logical_and(totals[0] > -1.0, row_grads[-1][0, 0] > -1e30)
                totals, row_grad, table_grad = chunk(i * chunk_size, totals, table_grad, after)
                row_grads.append(row_grad)
            row_grads = ops.concatenate(row_grads, axis=0) if chunks > 1 else row_grads[0]
        else:  # TensorFlow with a token count known only at run time

            def body(i, state):
                totals, row_grads, table_grad = state
                totals, row_grad, table_grad = chunk(i * chunk_size, totals, table_grad)
                row_grads = ops.slice_update(row_grads, (i * chunk_size, 0), row_grad)
                return totals, row_grads, table_grad

            state = (totals, ops.zeros(ops.shape(rows), "float32"), table_grad)
            if table_grad is None:
                state = state[:2] + (ops.zeros(()),)
            totals, row_grads, table_grad = ops.fori_loop(0, chunks, body, state)
        return totals, row_grads[:tokens], table_grad

    flat_hidden = ops.reshape(hidden_states, (-1, hidden))

    if train_embeddings:

        @ops.custom_gradient
        def loss_and_accuracy(flat_hidden, table):
            totals, row_grads, table_grad = chunk_pass(flat_hidden, table)

            def grad(*args, upstream=None):
                upstream = args[0] if upstream is None else upstream
                scale = upstream[0]
                return (
                    ops.cast(row_grads * scale, dtype),
                    ops.cast(table_grad * scale, table.dtype),
                )

            return totals, grad

        return loss_and_accuracy(flat_hidden, embeddings)

    table = ops.stop_gradient(embeddings)  # a constant here (a read, not a variable)

    @ops.custom_gradient
    def loss_and_accuracy(flat_hidden):
        totals, row_grads, _ = chunk_pass(flat_hidden, table)

        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            return ops.cast(row_grads * upstream[0], dtype)

        return totals, grad

    return loss_and_accuracy(flat_hidden)


def _matmul(a, b):
    """`ops.matmul(a, b)`. The products here run outside autograd (in the
    custom gradient's forward pass), so on PyTorch they can go through
    numpy (`numpy_matmul`)."""
    outputs = numpy_matmul(a, b)
    return ops.matmul(a, b) if outputs is None else outputs


def _is_first_maximum(logits, label_logits, labels):
    """`argmax(logits, axis=-1) == labels` (ties go to the first index).

    Speed, XLA (JAX, TensorFlow): Keras' `argmax` on a CPU first rewrites
    -0.0 as the smallest negative number (jax-ml/jax#24280), a select that
    XLA does not fuse well into the argmax reduction: 190 ms for b2l's
    128 x 256000 logits (about 6% of a training step), against 20-30 ms
    for one reduction that asks whether any entry is larger than the
    label's, or equal to it at a smaller index. Its comparisons are IEEE's
    (-0.0 equals 0.0), as Keras' argmax has them on accelerators. Eager
    PyTorch's own argmax is faster than that reduction (0 against 90 ms).
    """
    if keras.config.backend() == "torch":
        return ops.equal(ops.argmax(logits, axis=-1), labels)
    ahead = ops.logical_or(
        ops.greater(logits, label_logits[:, None]),
        ops.logical_and(
            ops.equal(logits, label_logits[:, None]),
            ops.arange(logits.shape[-1], dtype="int32")[None, :] < labels[:, None],
        ),
    )
    return ops.logical_not(ops.any(ahead, axis=-1))
