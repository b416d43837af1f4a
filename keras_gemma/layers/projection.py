"""The einsum projections of Gemma's layers, and the one CPU matmul shortcut."""

import contextlib
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
    projection). Same weights, LoRA and quantization as `EinsumDense`; only the
    PyTorch inference path differs (see `cpu_matmul`)."""

    def build(self, input_shape):
        super().build(input_shape)
        self._matmul_plan = _matmul_plan(self.equation)

    def quantize(self, mode=None, type_check=True, config=None):
        # EinsumDense refuses to quantize its subclasses unless told; only
        # `call`'s PyTorch shortcut differs here, and it steps aside for
        # quantized kernels, so EinsumDense's quantization holds as it is.
        super().quantize(mode, type_check=False, config=config)

    def call(self, inputs, training=None):
        if (
            self._matmul_plan is not None
            and self.bias is None
            and self.activation is keras.activations.linear
            and self.quantization_mode is None
            and not self.lora_enabled
        ):
            contracted, kernel_contracted_first = self._matmul_plan
            outputs = cpu_matmul(inputs, self.kernel, contracted, kernel_contracted_first)
            if outputs is not None:
                return outputs
            if contracted > 1 and kernel_contracted_first:
                return _flat_matmul(inputs, self.kernel, contracted)
        return super().call(inputs, training=training)


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
    (138 against 176 GFLOP/s). Outside autograd, on float32 CPU tensors, this
    multiplies numpy views of the same memory (no copies of the weights).
    """
    if keras.config.backend() != "torch":
        return None
    import torch

    if (
        torch.is_grad_enabled()
        or not isinstance(inputs, torch.Tensor)
        or inputs.device.type != "cpu"
        or inputs.dtype != torch.float32
        or kernel.dtype != "float32"
    ):
        return None
    weights = kernel.value.numpy()
    batch_shape = inputs.shape[: inputs.ndim - contracted_axes]
    if kernel_contracted_first:
        free_shape = weights.shape[contracted_axes:]
        matrix = weights.reshape(math.prod(weights.shape[:contracted_axes]), -1)
    else:
        free_shape = weights.shape[: weights.ndim - contracted_axes]
        matrix = weights.reshape(math.prod(free_shape), -1).T
    rows = inputs.reshape(-1, matrix.shape[0]).numpy()
    return torch.from_numpy(rows @ matrix).reshape(*batch_shape, *free_shape)



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
