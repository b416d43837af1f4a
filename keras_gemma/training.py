"""What `fit` optimizes by default: next-token cross-entropy over Gemma's
tied 256k vocabulary, computed in chunks of tokens.

The plain loss computes float32 logits for every token at once and keeps them
(and their gradient) for the backward pass: `tokens x vocabulary x 4` bytes,
8 GB for 2048 tokens of Gemma's 256k vocabulary. `ChunkedCrossEntropy`
computes the logits of one chunk of tokens at a time, from the final hidden
states, with the same function as every other caller
(`GemmaBackbone.logits`), and the gradient with respect to the hidden states
(and, when it trains, the embedding) in the same pass, so the backward pass
only scales it: the same matrix products as the plain computation, a
fraction of the memory.

`GemmaCausalLM.compile()` selects it for the default loss (and for an
equivalent `SparseCategoricalCrossentropy(from_logits=True)`), with
`ChunkedAccuracy` for the default metric. Then, in `fit`, the model's
training forward pass returns the final hidden states and `compute_loss`
calls `ChunkedCrossEntropy.from_hidden_states`; in `evaluate` and `predict`
the model returns logits and the loss is a plain sparse cross-entropy.
"""

import keras
from keras import ops

# Private Keras state (see keras_gemma/README.md): the scaling Keras' own
# losses apply under a `tf.distribute` strategy, so that the chunked loss
# scales its gradients as they do.
from keras.src.losses.loss import scale_loss_for_distribution

from keras_gemma import backend
from keras_gemma.layers.projection import tied_logits

# Logits per chunk: chunk x vocabulary float32 values (128 MB; a chunk's
# softmax and gradient take a few times that).
LOSS_CHUNK_ELEMENTS = 1 << 25
# Reductions with a chunked form: Keras' meaning of each.
_REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight")


@keras.saving.register_keras_serializable(package="keras_gemma")
class ChunkedCrossEntropy(keras.losses.SparseCategoricalCrossentropy):
    """Sparse categorical cross-entropy of the logits, which `fit` computes
    from the final hidden states a chunk of tokens at a time.

    On logits it is `keras.losses.SparseCategoricalCrossentropy(
    from_logits=True)`. `GemmaCausalLM` trains with it from hidden states
    (`from_hidden_states`): the same loss value and gradients, without float32
    logits for every token at once.

    Args:
        reduction: `"sum_over_batch_size"` (Keras' default: the weighted sum
            over the number of label positions, padding included), `"mean"`
            (the same), `"sum"` or `"mean_with_sample_weight"` (over the sum of
            the weights: the mean over real tokens).
        name: str. The loss name.
        chunk_size: int or None. Tokens per chunk; by default about 2**25
            logits per chunk.

    Example:
    ```python
    gemma_lm.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras_gemma.training.ChunkedCrossEntropy(chunk_size=256),
    )
    ```
    """

    def __init__(
        self,
        reduction="sum_over_batch_size",
        name="sparse_categorical_crossentropy",
        chunk_size=None,
        dtype=None,
    ):
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"ChunkedCrossEntropy reduces with one of {_REDUCTIONS}; got {reduction!r}."
            )
        super().__init__(from_logits=True, reduction=reduction, name=name, dtype=dtype)
        self.chunk_size = chunk_size

    def from_hidden_states(self, backbone, hidden_states, labels, sample_weight=None):
        """`(loss, correct, weight)`: the reduced loss of the tied logits of
        `hidden_states` `(batch, seq, hidden)` against `labels`, the weighted
        count of tokens whose argmax is the label, and the sum of weights."""
        if sample_weight is None:
            sample_weight = ops.ones(ops.shape(labels), "float32")
        totals = chunked_cross_entropy(
            backbone.token_embedding,
            hidden_states,
            labels,
            sample_weight,
            soft_cap=backbone.final_logit_soft_cap,
            chunk_size=self.chunk_size,
        )
        weight = ops.sum(ops.cast(sample_weight, "float32"))
        loss = totals[0]
        if self.reduction == "mean_with_sample_weight":
            loss = scale_loss_for_distribution(ops.divide_no_nan(loss, weight))
        elif self.reduction != "sum":
            loss = scale_loss_for_distribution(loss / ops.cast(ops.size(labels), "float32"))
        return loss, totals[1], weight

    def get_config(self):
        return {
            "reduction": self.reduction,
            "name": self.name,
            "chunk_size": self.chunk_size,
            "dtype": self.dtype,
        }


@keras.saving.register_keras_serializable(package="keras_gemma")
class ChunkedAccuracy(keras.metrics.SparseCategoricalAccuracy):
    """`keras.metrics.SparseCategoricalAccuracy` that can also be updated
    with counts (`update_from_counts`), as the chunked loss gives them."""

    def update_from_counts(self, correct, count):
        """Adds `correct` right predictions out of `count` (weighted)."""
        keras.metrics.Mean.update_state(
            self, ops.divide_no_nan(correct, count), sample_weight=count
        )


class Objective:
    """The chunked training of one `compile()`: its loss, and its accuracy
    metric or None (a metric of the model's own, not in Keras' compiled
    metrics: in fit it is updated from the chunked counts)."""

    def __init__(self, loss, accuracy):
        self.loss = loss
        self.accuracy = accuracy

    def applies(self, backbone):
        """Whether fit can take the chunked route with the backbone as it is
        now (a table quantized in a way the route cannot differentiate trains
        from full logits instead)."""
        return _table_and_scale(backbone.token_embedding) is not None

    def loss_from_hidden_states(self, backbone, hidden_states, labels, sample_weight):
        """The reduced loss of `hidden_states`' tied logits; updates the accuracy."""
        loss, correct, count = self.loss.from_hidden_states(
            backbone, hidden_states, labels, sample_weight
        )
        if self.accuracy is not None:
            self.accuracy.update_from_counts(correct, count)
        return loss

    def update_accuracy(self, labels, logits, sample_weight):
        """Updates the accuracy from full logits (`evaluate`)."""
        if self.accuracy is not None:
            self.accuracy.update_state(labels, logits, sample_weight)


def objective(loss, weighted_metrics, other_compile_arguments):
    """`(loss, weighted_metrics, Objective or None)` for `compile()`.

    The chunked route is taken for the default loss ("auto"), a
    `ChunkedCrossEntropy`, or a plain `SparseCategoricalCrossentropy` that
    means the same (`from_logits=True`, no `ignore_class`, a reduction
    above), when the only metric is accuracy ("auto", None, or
    `SparseCategoricalAccuracy` / "sparse_categorical_accuracy") and no
    `metrics` or `loss_weights` are given. Anything else trains from full
    logits, as keras-hub does.
    """
    if loss == "auto":
        loss = ChunkedCrossEntropy()
    elif _is_plain_sparse_cross_entropy(loss):
        loss = ChunkedCrossEntropy(reduction=loss.reduction, name=loss.name)
    if weighted_metrics == "auto":
        weighted_metrics = [ChunkedAccuracy()]
    chunked = (
        isinstance(loss, ChunkedCrossEntropy)
        and other_compile_arguments.get("metrics") is None
        and other_compile_arguments.get("loss_weights") is None
    )
    metrics = list(weighted_metrics or [])
    if not chunked or len(metrics) > 1 or not all(map(_is_accuracy, metrics)):
        return loss, weighted_metrics, None
    accuracy = None
    if metrics:
        name = metrics[0] if isinstance(metrics[0], str) else metrics[0].name
        accuracy = metrics[0] if isinstance(metrics[0], ChunkedAccuracy) else ChunkedAccuracy(name)
    return loss, None, Objective(loss, accuracy)


def _is_plain_sparse_cross_entropy(loss):
    return (
        type(loss) is keras.losses.SparseCategoricalCrossentropy
        and loss.get_config().get("from_logits")
        and loss.get_config().get("ignore_class") is None
        and loss.get_config().get("axis", -1) == -1
        and loss.reduction in _REDUCTIONS
    )


def _is_accuracy(metric):
    if isinstance(metric, str):
        return metric == "sparse_categorical_accuracy"
    return type(metric) in (keras.metrics.SparseCategoricalAccuracy, ChunkedAccuracy)


def _table_and_scale(embedding):
    """`(table, scale)` with the logits before the cap equal to
    `hidden @ (table / scale[:, None]).T` (a float table: scale None; int8 or
    per-channel int4: the integer values and their per-row scale, as Keras'
    quantized `reverse=True` call computes them), or None where the chunked
    route cannot differentiate the table's logits."""
    if embedding.lora_enabled:
        return None
    if embedding.quantization_mode is None:
        return embedding.embeddings, None
    if embedding.quantization_mode in ("int8", "int4"):
        scale = embedding.embeddings_scale
        if len(scale.shape) == 1:  # one scale per vocabulary row
            return embedding.embeddings, scale
    return None


def chunked_cross_entropy(
    embedding, hidden_states, labels, sample_weight, soft_cap=None, chunk_size=None
):
    """Weighted next-token cross-entropy and accuracy of tied-embedding logits.

    Args:
        embedding: the backbone's `ReversibleEmbedding`; logits are
            `tied_logits(embedding, hidden_states, soft_cap)`.
        hidden_states: `(batch, seq, hidden)` final hidden states.
        labels: int `(batch, seq)` target token ids.
        sample_weight: `(batch, seq)` weights (for example the padding mask).
        soft_cap: float or None. Final logit soft cap (`cap * tanh(x / cap)`).
        chunk_size: most tokens per chunk (per device, where a
            `keras.distribution` splits the batch); by default about 2**25
            logits per chunk. With a static token count the chunks are
            balanced, so little padding is computed.

    Returns:
        float32 `(2,)`: the weighted sum of per-token losses and the weighted
        number of tokens whose argmax is the label. Differentiable in its
        first entry with respect to `hidden_states`, and to the embedding
        table when that trains (a float table whose layer is trainable). A
        quantized table's gradient passes straight through its quantization,
        as in Keras' own quantized layers.
    """
    table_and_scale = _table_and_scale(embedding)
    if table_and_scale is None:
        raise ValueError(
            f"The chunked loss cannot differentiate logits of a {embedding.quantization_mode} "
            "embedding with these settings; compile with another loss to train from full logits."
        )
    table, scale = table_and_scale
    train_table = scale is None and embedding.trainable and table.trainable
    # A tensor, not a variable: custom gradients differentiate arguments.
    table = ops.convert_to_tensor(table)
    vocabulary, hidden = table.shape
    if chunk_size is None:
        chunk_size = max(1, LOSS_CHUNK_ELEMENTS // vocabulary)
    dtype = hidden_states.dtype
    labels = ops.cast(labels, "int32")
    sample_weight = ops.cast(sample_weight, "float32")
    blocks = _Blocks(labels, chunk_size, embedding)

    def chunk_pass(hidden_states, table):
        """Loss, correct count, and the gradients, one chunk at a time. The
        products run in the compute dtype of `hidden_states`, as the plain
        logits do; logits, softmax and sums are float32."""
        rows, targets, weights = (
            blocks.arrange(hidden_states),
            blocks.arrange(labels),
            blocks.arrange(sample_weight),
        )
        table = blocks.constrain(table, "table")
        backward_table = ops.cast(table, dtype)

        def chunk(i, totals, table_grad, after=None):
            x = blocks.constrain(blocks.take(rows, i), "rows")
            if after is not None:
                x = ops.where(after, x, ops.zeros_like(x))
            y, w = blocks.take(targets, i), blocks.take(weights, i)
            logits = tied_logits(embedding, x, soft_cap, embeddings=table)  # (c, vocabulary)
            logits = blocks.constrain(logits, "logits")
            cap_grad = None
            if soft_cap is not None:  # d cap*tanh(z/cap) / dz, before logits are overwritten
                cap_grad = 1.0 - ops.square(logits / soft_cap)
            losses, correct, logit_grad = _softmax_cross_entropy(logits, y, w)
            totals = totals + ops.stack(
                [ops.sum(w * losses), ops.sum(w * ops.cast(correct, "float32"))]
            )
            if cap_grad is not None:
                logit_grad = logit_grad * cap_grad
            if scale is not None:
                logit_grad = logit_grad / ops.cast(scale, "float32")[None, :]
            logit_grad = ops.cast(logit_grad, dtype)
            row_grad = ops.cast(backend.matmul(logit_grad, backward_table), "float32")
            if train_table:
                table_grad = table_grad + ops.cast(
                    backend.matmul(ops.transpose(logit_grad), x), "float32"
                )
                table_grad = blocks.constrain(table_grad, "table_grad")
            return totals, row_grad, table_grad

        totals = ops.zeros((2,), "float32")
        table_grad = ops.zeros((vocabulary, hidden), "float32") if train_table else None
        if isinstance(blocks.count, int):
            # A static number of chunks (always on JAX): a Python loop. In an
            # XLA while loop the embedding would be loop state, and since the
            # train step also returns it (donated, aliased), XLA copies it
            # into the loop: 2 GB more for Gemma's 256k x 2048 table.
            # Each chunk's input waits for the previous chunk's results (a
            # select that never changes a value), so XLA runs the chunks one
            # after another instead of holding all their logits at once.
            row_grads = []
            for i in range(blocks.count):
                after = None
                if row_grads:
                    after = ops.logical_and(totals[0] > -1.0, row_grads[-1][0, 0] > -1e30)
                totals, row_grad, table_grad = chunk(i, totals, table_grad, after)
                row_grads.append(row_grad)
            row_grads = blocks.join(row_grads)
        else:  # TensorFlow with a token count known only at run time

            def body(i, state):
                totals, row_grads, table_grad = state
                totals, row_grad, table_grad = chunk(i, totals, table_grad)
                row_grads = ops.slice_update(row_grads, (i * blocks.size, 0), row_grad)
                return totals, row_grads, table_grad

            state = (totals, ops.zeros(ops.shape(rows), "float32"), table_grad)
            if table_grad is None:
                state = state[:2] + (ops.zeros(()),)
            totals, row_grads, table_grad = ops.fori_loop(0, blocks.count, body, state)
            row_grads = blocks.join([row_grads])
        return totals, ops.reshape(row_grads, ops.shape(hidden_states)), table_grad

    if train_table:

        @ops.custom_gradient
        def loss_and_accuracy(hidden_states, table):
            totals, row_grads, table_grad = chunk_pass(hidden_states, table)

            def grad(*args, upstream=None):
                upstream = args[0] if upstream is None else upstream
                scale = upstream[0]
                return (
                    ops.cast(row_grads * scale, dtype),
                    ops.cast(table_grad * scale, table.dtype),
                )

            return totals, grad

        return loss_and_accuracy(hidden_states, table)

    table = ops.stop_gradient(table)  # a constant here (a read, not a variable)

    @ops.custom_gradient
    def loss_and_accuracy(hidden_states):
        totals, row_grads, _ = chunk_pass(hidden_states, table)

        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            return ops.cast(row_grads * upstream[0], dtype)

        return totals, grad

    return loss_and_accuracy(hidden_states)


class _Blocks:
    """Which tokens of a `(batch, seq)` batch each loss chunk takes.

    By default a chunk is a run of `size` consecutive tokens of the
    flattened batch. Where a distribution splits the batch over `shards`
    devices, a chunk is a run of positions of every example instead, so
    that its rows are split over the devices as the batch is (a run of
    consecutive tokens would sit on one device's examples, and XLA would
    compute that chunk whole on every device). Either way chunks hold about
    `chunk_size` tokens per device, balanced where shapes are static.
    """

    def __init__(self, labels, chunk_size, embedding):
        self.batch, self.length = shape = tuple(labels.shape)
        self.layouts = _loss_layouts(embedding)
        shards = self.layouts["shards"] if self.layouts else 1
        self.by_position = shards > 1 and None not in shape
        if self.by_position:
            per_device = max(1, self.batch // shards)
            step = max(1, chunk_size // per_device)
            self.count = max(1, -(-self.length // step))
            self.step = -(-self.length // self.count)
            self.size = self.batch * self.step
            return
        if None not in shape:
            self.tokens = self.batch * self.length
            self.count = max(1, -(-self.tokens // chunk_size))
            self.size = max(1, -(-self.tokens // self.count))
        else:  # known only at run time (TensorFlow)
            self.tokens = ops.shape(labels)[0] * ops.shape(labels)[1]
            self.size = chunk_size
            self.count = (self.tokens + chunk_size - 1) // chunk_size

    def constrain(self, tensor, role):
        """`tensor` (the chunk's "rows", its "logits", the "table" and its
        "table_grad") laid out as `_loss_layouts` says, where chunks go by
        position; else `tensor` itself."""
        if not self.by_position:
            return tensor
        return keras.distribution.distribute_tensor(tensor, self.layouts[role])

    def arrange(self, array):
        """`array` `(batch, seq, ...)` padded for the chunks: `(batch,
        count * step, ...)` by position, else flattened to tokens."""
        if self.by_position:
            pad = self.count * self.step - self.length
            return ops.pad(array, [[0, 0], [0, pad]] + [[0, 0]] * (len(array.shape) - 2))
        rows = ops.reshape(array, (-1,) + tuple(array.shape[2:]))
        pad = self.count * self.size - self.tokens
        return ops.pad(rows, [[0, pad]] + [[0, 0]] * (len(rows.shape) - 1))

    def take(self, arranged, i):
        """Chunk `i` of an arranged array, as `(size, ...)` rows."""
        rest = tuple(arranged.shape[2:] if self.by_position else arranged.shape[1:])
        if self.by_position:
            block = ops.slice(
                arranged, (0, i * self.step) + (0,) * len(rest), (self.batch, self.step) + rest
            )
            return ops.reshape(block, (self.size,) + rest)
        return ops.slice(arranged, (i * self.size,) + (0,) * len(rest), (self.size,) + rest)

    def join(self, row_grads):
        """The chunks' `(size, hidden)` row gradients (or, from the run-time
        loop, all of them at once) back in token order, padding dropped."""
        if self.by_position:
            blocks = [ops.reshape(g, (self.batch, self.step, -1)) for g in row_grads]
            joined = ops.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
            return joined[:, : self.length]
        joined = ops.concatenate(row_grads, axis=0) if len(row_grads) > 1 else row_grads[0]
        return joined[: self.tokens]


def _loss_layouts(embedding):
    """Under a `keras.distribution` that splits the batch: the layouts that
    keep each device's share of the loss to its own rows. A chunk's rows split
    over the data axis as the batch is; the table gathered over that axis
    (where a fully sharded layout splits it; any other split stays); the
    logits split like the rows and the table's vocabulary; the table's
    gradient laid out like the table, so it is reduced onto its shards.
    Without them XLA may keep the table's split and compute every row's
    logits on each device (8 times the logits' bytes on an (8, 1) mesh).
    None without such a distribution; "shards" is the data axis' size."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    mesh = distribution.device_mesh
    data = distribution.batch_dim_name
    if data not in mesh.axis_names:
        return None
    table = distribution.get_variable_layout(embedding.embeddings)
    gathered = tuple(None if axis == data else axis for axis in table.axes)
    layout = lambda axes: keras.distribution.TensorLayout(axes, mesh)
    return {
        "shards": mesh.shape[mesh.axis_names.index(data)],
        "rows": layout((data, None)),
        "table": layout(gathered),
        "logits": layout((data, gathered[0])),
        "table_grad": layout(tuple(table.axes)),
    }


def _softmax_cross_entropy(logits, labels, weights):
    """Per-row cross-entropy of float32 logits `(c, vocabulary)`, whether each
    row's first argmax is its label, and the gradient of
    `sum(weights * losses)` with respect to the logits,
    `weights * (softmax - one_hot)`. One exponential serves the
    log-normaliser and the softmax. (`keras_gemma.backend` may compute it in
    place, overwriting `logits`.)"""
    routed = backend.softmax_cross_entropy(logits, labels, weights)
    if routed is not None:
        return routed
    row_max = ops.max(logits, axis=-1)  # (c,)
    exp = ops.exp(logits - row_max[:, None])
    total = ops.sum(exp, axis=-1)  # (c,)
    label_logits = ops.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    losses = row_max + ops.log(total) - label_logits
    correct = _is_first_maximum(logits, label_logits, labels)
    is_label = ops.equal(ops.arange(logits.shape[-1], dtype="int32")[None, :], labels[:, None])
    softmax = exp * (1.0 / total)[:, None]
    logit_grad = ops.where(is_label, softmax - 1.0, softmax) * weights[:, None]
    return losses, correct, logit_grad


def _is_first_maximum(logits, label_logits, labels):
    """`argmax(logits, axis=-1) == labels` (ties go to the first index).

    Speed (XLA): one reduction asking whether any entry is larger than the
    label's, or equal to it at a smaller index, instead of Keras' `argmax`,
    which on CPU first rewrites -0.0 (jax-ml/jax#24280) in a select XLA does
    not fuse (190 against 20-30 ms for b2l's 128 x 256000 logits). Its
    comparisons are IEEE's (-0.0 equals 0.0), as Keras' argmax has them on
    accelerators.
    """
    if not backend.speed_routes_enabled():
        return ops.equal(ops.cast(ops.argmax(logits, axis=-1), "int32"), labels)
    ahead = ops.logical_or(
        ops.greater(logits, label_logits[:, None]),
        ops.logical_and(
            ops.equal(logits, label_logits[:, None]),
            ops.arange(logits.shape[-1], dtype="int32")[None, :] < labels[:, None],
        ),
    )
    return ops.logical_not(ops.any(ahead, axis=-1))
