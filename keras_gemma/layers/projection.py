"""The einsum projections of Gemma's layers, and the one CPU matmul shortcut."""

import contextlib
import functools
import math

import keras
from keras import ops


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
    projection). Same weights, LoRA and quantization as `EinsumDense`; it
    computes some products differently, for speed: PyTorch's CPU products
    (`cpu_matmul`), kernels contracted over two axes (`_flat_matmul`), and
    adapters applied without merging them into the kernel (`_low_rank`)."""

    def build(self, input_shape):
        super().build(input_shape)
        self._matmul_plan = _matmul_plan(self.equation)
        self._lora_plan = _lora_plan(self.equation)

    def quantize(self, mode=None, type_check=True, config=None):
        # EinsumDense refuses to quantize its subclasses unless told; only
        # `call`'s faster routes differ here, and they step aside for
        # quantized kernels, so EinsumDense's quantization holds as it is.
        super().quantize(mode, type_check=False, config=config)

    def call(self, inputs, training=None):
        if (
            self.bias is not None
            or self.activation is not keras.activations.linear
            or self.quantization_mode is not None
            or (self.lora_enabled and self._lora_plan is None)
        ):
            return super().call(inputs, training=training)
        if self.lora_enabled:
            return ops.add(self._product(inputs, self._kernel), self._low_rank(inputs))
        return self._product(inputs, self.kernel)

    def _product(self, inputs, kernel):
        """`einsum(equation, inputs, kernel)`, through a faster route where
        one applies."""
        if self._matmul_plan is not None:
            contracted, kernel_contracted_first = self._matmul_plan
            outputs = cpu_matmul(inputs, kernel, contracted, kernel_contracted_first)
            if outputs is not None:
                return outputs
            if contracted > 1 and kernel_contracted_first:
                return _flat_matmul(inputs, kernel, contracted)
        return ops.einsum(self.equation, inputs, kernel)

    def _low_rank(self, inputs):
        """The adapter's `(alpha / rank) * a @ b` applied to `inputs` without
        forming it: with the frozen kernel's product, the same function as
        EinsumDense's merged `kernel + (alpha / rank) * a @ b` (PEFT computes
        LoRA this way too). Speed: the merged kernel costs a full-size add
        on every call and, in training, a full-size weight gradient (inputs
        times output gradient, then reduced to the adapters): for b2l's query
        kernel, 1 GFLOP per layer and step at batch 2, sequence 64, and a
        transposed 16 MB copy. b2l LoRA training (benchmarks/finetune.py's
        settings) runs 8% faster on JAX, 6% on TensorFlow and PyTorch."""
        first, second, b_first = self._lora_plan
        a, b = self.lora_kernel_a, self.lora_kernel_b
        low_rank = ops.einsum(first, inputs, b if b_first else a)
        low_rank = ops.multiply(low_rank, self.lora_alpha / self.lora_rank)
        return ops.einsum(second, low_rank, a if b_first else b)


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
    (the attention output, `btnh,nhd->btd`) XLA on CPU copies and transposes
    the whole kernel on every call: for b2l's 16 MB kernel, 1.5 ms against
    0.4 ms for the 2-D product in one decoding step, 2 of its ~100 ms."""
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


def cpu_matmul(inputs, kernel, contracted_axes, kernel_contracted_first):
    """`inputs` (batch..., contracted...) times `kernel` (contracted..., free...)
    or (free..., contracted...), or None where the shortcut does not apply.

    Speed, PyTorch only: on CPU torch's float32 matrix products reach about
    two thirds of numpy's (OpenBLAS) on the development machine, both for the
    matrix-vector products of decoding (26 against 34 GB/s of weights read;
    18 GB/s through `torch.einsum`'s batched path) and for a 512-token prefill
    (138 against 176 GFLOP/s). On float32 CPU tensors this multiplies numpy
    views of the same memory (no copies of the weights), in training too
    (`numpy_matmul`).
    """
    if keras.config.backend() != "torch":
        return None
    import torch

    if not isinstance(inputs, torch.Tensor):
        return None  # a symbolic call: no views to make
    weights = kernel.value
    batch_shape = tuple(inputs.shape[: inputs.ndim - contracted_axes])
    if kernel_contracted_first:
        free_shape = tuple(weights.shape[contracted_axes:])
        matrix = weights.reshape(math.prod(weights.shape[:contracted_axes]), -1)
    else:
        free_shape = tuple(weights.shape[: weights.ndim - contracted_axes])
        matrix = weights.reshape(math.prod(free_shape), -1).T
    outputs = numpy_matmul(inputs.reshape(-1, matrix.shape[0]), matrix)
    return None if outputs is None else outputs.reshape(*batch_shape, *free_shape)


def numpy_matmul(a, b):
    """`a @ b` for 2-D float32 CPU torch tensors, as numpy views of the same
    memory (OpenBLAS, no copies; a transposed operand is a Fortran-ordered
    view), or None where that does not apply. Under autograd the products of
    the backward pass go through numpy too (`_numpy_matmul_function`).

    Speed, PyTorch only, for the same reason as `cpu_matmul`: the chunked
    loss's products of b2l's 256k-vocabulary shapes ran at about 100 GFLOP/s
    through torch and 160 through numpy on the development machine. In b2l
    LoRA training (benchmarks/finetune.py's settings) the layers' products,
    forward and backward, ran at about 87 GFLOP/s through torch's `bmm` and
    111 through numpy, in the same step.
    """
    if keras.config.backend() != "torch":
        return None
    import torch

    if torch.compiler.is_compiling() or not all(
        isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.float32
        for t in (a, b)
    ):
        return None  # torch.compile's graph keeps torch's own products
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _numpy_matmul_function().apply(a, b)
    return _numpy_product(a, b)


def _numpy_product(a, b):
    import torch

    return torch.from_numpy(a.detach().numpy() @ b.detach().numpy())


@functools.cache
def _numpy_matmul_function():
    """A `torch.autograd.Function` for `a @ b` whose forward and backward
    products run through numpy. It keeps for the backward pass only what the
    gradients that are asked for need: for a frozen kernel (LoRA), the kernel
    and not the inputs, as torch's own product does."""
    import torch

    class NumpyMatmul(torch.autograd.Function):
        @staticmethod
        def forward(a, b):
            return _numpy_product(a, b)

        @staticmethod
        def setup_context(ctx, inputs, output):
            a, b = inputs
            ctx.save_for_backward(a if b.requires_grad else None, b if a.requires_grad else None)

        @staticmethod
        def backward(ctx, grad):
            a, b = ctx.saved_tensors
            # Differentiating the backward pass itself (`create_graph`)
            # needs torch's own products.
            product = torch.matmul if torch.is_grad_enabled() else _numpy_product
            grad_a = product(grad, b.mT) if ctx.needs_input_grad[0] else None
            grad_b = product(a.mT, grad) if ctx.needs_input_grad[1] else None
            return grad_a, grad_b

    return NumpyMatmul


@contextlib.contextmanager
def single_torch_thread():
    """Speed, PyTorch only: runs the block with one torch CPU thread, for
    inference that goes through `cpu_matmul`. torch's OpenMP workers spin after
    each operation and take the cores from OpenBLAS's threads: on the two-core
    development machine three 128 MB products took 12.8 ms alone, 23 ms
    between small torch operations, 12.4 ms with one torch thread. For b2l,
    one torch thread took a decoding step from 125 to 102 ms and the 512-token
    prefill from 387-422 to 498-525 tokens/s. The previous count is restored.
    """
    if keras.config.backend() != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
