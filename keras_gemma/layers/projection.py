"""Gemma's projections: the einsum layers, and the tied output projection."""

import math

import keras
from keras import ops

from keras_gemma import backend


def einsum_projection(equation, output_shape, kernel_initializer, dtype, name):
    """A bias-free projection with a fresh copy of `kernel_initializer`: one
    unseeded instance shared by several layers repeats its values, which would
    start, say, key and value kernels identical."""
    return Projection(
        equation,
        output_shape=output_shape,
        kernel_initializer=keras.initializers.get(
            keras.initializers.serialize(kernel_initializer)
        ),
        dtype=dtype,
        name=name,
    )


@keras.saving.register_keras_serializable(package="keras_gemma")
class Projection(keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` for equations of the form
    `<batch letters><contracted>,<kernel>-><batch letters><free>`, where the
    kernel is `<contracted><free>` or `<free><contracted>` (every Gemma
    projection). Same weights, LoRA and quantization as `EinsumDense` (a
    quantized layer runs EinsumDense's own quantized call); it computes some
    products differently, for speed (benchmarks/README.md): through
    `keras_gemma.backend.projection_matmul`, kernels contracted over two axes
    as one 2-D product (`_flat_matmul`), and adapters applied beside the
    frozen kernel instead of merged into it (`_low_rank`). With the speed
    routes off (`keras_gemma.backend`) it is EinsumDense.
    """

    def build(self, input_shape):
        super().build(input_shape)
        self._matmul_plan = _matmul_plan(self.equation)
        self._lora_plan = _lora_plan(self.equation)

    def quantize(self, mode=None, type_check=True, config=None):
        # EinsumDense refuses to quantize its subclasses unless told; only
        # `call`'s faster routes differ here, and a quantized layer does not
        # run `call`, so EinsumDense's quantization holds as it is.
        super().quantize(mode, type_check=False, config=config)

    def call(self, inputs, training=None):
        if (
            not backend.speed_routes_enabled()
            or self.bias is not None
            or self.activation is not keras.activations.linear
            or (self.lora_enabled and self._lora_plan is None)
        ):
            return super().call(inputs, training=training)
        if self.lora_enabled:
            # `_kernel`: EinsumDense's frozen kernel (`kernel` adds the adapter).
            return ops.add(self._product(inputs, self._kernel), self._low_rank(inputs))
        return self._product(inputs, self.kernel)

    def _product(self, inputs, kernel):
        """`einsum(equation, inputs, kernel)`, through a faster route where
        one applies."""
        if self._matmul_plan is not None:
            contracted, kernel_contracted_first = self._matmul_plan
            outputs = backend.projection_matmul(
                inputs, kernel, contracted, kernel_contracted_first
            )
            if outputs is not None:
                return outputs
            if contracted > 1 and kernel_contracted_first:
                return _flat_matmul(inputs, kernel, contracted)
        return ops.einsum(self.equation, inputs, kernel)

    def _low_rank(self, inputs):
        """The adapter's `(alpha / rank) * a @ b` applied to `inputs` without
        forming it: with the frozen kernel's product, the same function as
        EinsumDense's merged `kernel + (alpha / rank) * a @ b` (PEFT computes
        LoRA this way too). Speed: no full-size merged kernel and no
        full-size weight gradient on each call (b2l LoRA training 6-8%
        faster)."""
        first, second, b_first = self._lora_plan
        a, b = self.lora_kernel_a, self.lora_kernel_b
        low_rank = ops.einsum(first, inputs, b if b_first else a)
        low_rank = ops.multiply(low_rank, self.lora_alpha / self.lora_rank)
        return ops.einsum(second, low_rank, a if b_first else b)


def tied_logits(embedding, hidden_states, soft_cap=None, embeddings=None):
    """Float32 logits `(..., vocabulary)` of `hidden_states` `(..., hidden)`
    against the tied embedding table: the one output projection of every
    caller (`call`, generation, `score`, and fit's chunked loss).

    Args:
        embedding: the backbone's `keras.layers.ReversibleEmbedding`.
        hidden_states: final (normed) hidden states.
        soft_cap: float or None. `cap * tanh(logits / cap)`, in float32.
        embeddings: optional tensor to use for the float table instead of
            the layer's variable (the chunked loss differentiates it).

    A quantized table (or one with an adapter) goes through the layer's own
    `reverse=True` call, so every caller sees the same quantized
    arithmetic. A float table is one product in the compute dtype: through
    `keras_gemma.backend.projection_matmul` where that route applies, else an
    einsum (XLA reads the table faster through it than through the layer's
    `matmul(x, transpose(table))` for one token; benchmarks/README.md).
    """
    if (
        embedding.quantization_mode is not None
        or embedding.lora_enabled
        # Building the functional model: the layer call goes into its graph
        # (an op on the variable here would capture its current value).
        or isinstance(hidden_states, keras.KerasTensor)
    ):
        logits = embedding(hidden_states, reverse=True)
    else:
        table = embedding.embeddings if embeddings is None else embeddings
        logits = backend.projection_matmul(hidden_states, table, 1, False)
        if logits is None:
            dtype = embedding.compute_dtype
            hidden_states, table = ops.cast(hidden_states, dtype), ops.cast(table, dtype)
            if backend.speed_routes_enabled():
                logits = ops.einsum("...d,vd->...v", hidden_states, table)  # (..., vocabulary)
            else:  # what the layer's reverse call computes
                logits = ops.matmul(hidden_states, ops.transpose(table))
    # float32: the softmax and the loss need it whatever the compute dtype.
    logits = ops.cast(logits, "float32")
    if soft_cap is not None:
        logits = ops.tanh(logits / soft_cap) * soft_cap
    return logits


def _lora_plan(equation):
    """The two einsums that apply an adapter without merging it, or None.

    Keras' adapter for a kernel `<k...><last>` is `a` `<k...>r` times `b`
    `r<last>`. When `last` is an output axis, `inputs` meets `a` first and
    the rank axis `r` stands in the output for `last`; when it is contracted
    (`btf,df->btd`), `inputs` meets `b` first. Returns (first equation,
    second equation, whether `b` comes first)."""
    if "." in equation:
        return None
    inputs, rest = equation.split(",")
    kernel, outputs = rest.split("->")
    r = next(c for c in "rzyxwvuqpo" if c not in equation)
    last, a = kernel[-1], kernel[:-1] + r
    if last in outputs:
        middle = outputs.replace(last, r)
        return f"{inputs},{a}->{middle}", f"{middle},{r}{last}->{outputs}", False
    middle = inputs.replace(last, r)
    return f"{inputs},{r}{last}->{middle}", f"{middle},{a}->{outputs}", True


def _flat_matmul(inputs, kernel, contracted_axes):
    """`inputs` (batch..., contracted...) times `kernel` (contracted...,
    free...) as one 2-D product. Speed: for an einsum contracting two axes
    (the attention output) XLA on CPU copies the whole kernel on every call."""
    kernel_shape = tuple(kernel.shape)
    rows = math.prod(kernel_shape[:contracted_axes])
    free_shape = kernel_shape[contracted_axes:]
    shape = ops.shape(inputs)
    batch_shape = tuple(shape[: len(shape) - contracted_axes])
    outputs = ops.matmul(
        ops.reshape(inputs, (-1, rows)), ops.reshape(kernel, (rows, -1))
    )
    return ops.reshape(outputs, batch_shape + free_shape)


def _matmul_plan(equation):
    """(number of contracted axes, whether the kernel starts with them), or
    None when `equation` is not a plain matrix product of that form."""
    inputs, rest = equation.split(",")
    kernel, outputs = rest.split("->")
    contracted = "".join(c for c in inputs if c not in outputs)
    batch = inputs[: len(inputs) - len(contracted)]
    if not contracted or not inputs.endswith(contracted) or "." in equation:
        return None
    for first in (True, False):
        free = kernel[len(contracted):] if first else kernel[: -len(contracted)]
        if (kernel.startswith(contracted) if first else kernel.endswith(contracted)) and (
            outputs == batch + free and not set(free) & set(batch)
        ):
            return len(contracted), first
    return None
