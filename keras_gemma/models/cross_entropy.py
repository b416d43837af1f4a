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
            losses, correct, logit_grad = _softmax_cross_entropy(logits, y, w, soft_cap)
            totals = totals + ops.stack(
                [ops.sum(w * losses), ops.sum(w * ops.cast(correct, "float32"))]
            )
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
    """`ops.matmul(a, b)`; on PyTorch's CPU through numpy (`numpy_matmul`)."""
    outputs = numpy_matmul(a, b)
    return ops.matmul(a, b) if outputs is None else outputs


def _softmax_cross_entropy(logits, labels, weights, soft_cap):
    """Per-row cross-entropy of (optionally soft-capped) float32 logits
    `(c, vocabulary)`, whether each row's first argmax is its label, and the
    gradient of `sum(weights * losses)` with respect to the logits before
    the cap, `weights * (softmax - one_hot)`. One exponential serves the
    log-normaliser and the softmax."""
    if keras.config.backend() == "torch":
        import torch

        if not torch.compiler.is_compiling():  # torch.compile fuses the passes itself
            return _torch_softmax_cross_entropy(logits, labels, weights, soft_cap)
    if soft_cap is not None:
        squashed = ops.tanh(logits / soft_cap)
        logits = squashed * soft_cap
    row_max = ops.max(logits, axis=-1)  # (c,)
    exp = ops.exp(logits - row_max[:, None])
    total = ops.sum(exp, axis=-1)  # (c,)
    label_logits = ops.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    losses = row_max + ops.log(total) - label_logits
    correct = _is_first_maximum(logits, label_logits, labels)
    is_label = ops.equal(ops.arange(logits.shape[-1], dtype="int32")[None, :], labels[:, None])
    softmax = exp * (1.0 / total)[:, None]
    logit_grad = ops.where(is_label, softmax - 1.0, softmax) * weights[:, None]
    if soft_cap is not None:
        logit_grad = logit_grad * (1.0 - squashed * squashed)
    return losses, correct, logit_grad


def _torch_softmax_cross_entropy(logits, labels, weights, soft_cap):
    """`_softmax_cross_entropy` for eager PyTorch, overwriting `logits`.

    Speed: eager torch runs each elementwise operation as its own pass over
    the `(c, vocabulary)` block and allocates a fresh 131 MB result for each
    (b2l: 128 x 256000), which the allocator returns to the system and page-
    faults in again. The generic version's eight such passes took about 460
    ms of a 3.9 s b2l LoRA training step; here the block is updated in place
    and the one-hot term touches only the label entries. Its own argmax is
    also faster than the generic count (0 against 90 ms).
    """
    import torch

    rows = torch.arange(logits.shape[0], device=logits.device)
    labels = labels.long()
    cap_grad = None
    if soft_cap is not None:
        squashed = logits.div_(soft_cap).tanh_()
        cap_grad = 1.0 - squashed * squashed
        logits = squashed.mul_(soft_cap)
    label_logits = logits[rows, labels]
    correct = torch.argmax(logits, dim=-1) == labels
    row_max = torch.amax(logits, dim=-1)
    exp = logits.sub_(row_max[:, None]).exp_()
    total = torch.sum(exp, dim=-1)
    losses = row_max + torch.log(total) - label_logits
    logit_grad = exp.mul_((weights / total)[:, None])
    logit_grad.index_put_((rows, labels), -weights, accumulate=True)
    if cap_grad is not None:
        logit_grad.mul_(cap_grad)
    return losses, correct, logit_grad


def _is_first_maximum(logits, label_logits, labels):
    """`argmax(logits, axis=-1) == labels` (ties go to the first index).

    Speed, XLA (JAX, TensorFlow): Keras' `argmax` on a CPU first rewrites
    -0.0 as the smallest negative number (jax-ml/jax#24280), a select that
    XLA does not fuse well into the argmax reduction: 190 ms for b2l's
    128 x 256000 logits (about 6% of a training step), against 20-30 ms
    for one reduction that asks whether any entry is larger than the
    label's, or equal to it at a smaller index. Its comparisons are IEEE's
    (-0.0 equals 0.0), as Keras' argmax has them on accelerators.
    """
    ahead = ops.logical_or(
        ops.greater(logits, label_logits[:, None]),
        ops.logical_and(
            ops.equal(logits, label_logits[:, None]),
            ops.arange(logits.shape[-1], dtype="int32")[None, :] < labels[:, None],
        ),
    )
    return ops.logical_not(ops.any(ahead, axis=-1))
