"""Every backend-specific route of keras_gemma, behind named functions.

The layers and models are written once in `keras.ops` and name no backend;
where a backend runs a step markedly faster another way, they call one of
the functions below, which take that route where it applies and otherwise do
what plain Keras does. Each route's reason is one line here; the measurements
behind it are in `benchmarks/README.md`.

One setting turns every speed route off, for debugging or to compare: the
environment variable `KERAS_GEMMA_SPEED_ROUTES=0` (read at import), or
`keras_gemma.backend.set_speed_routes(False)` at run time (taking effect for
functions compiled afterwards). The results are the same either way, up to
float rounding (`tests/test_backend.py`).

One function here is not for speed: `torch_distributed_data_parallel`, the
PyTorch half of `keras_gemma.distribution` (JAX and TensorFlow need nothing
backend-specific from us there).
"""

import contextlib
import functools
import itertools
import math
import os

import keras
from keras import ops

_speed_routes = os.environ.get("KERAS_GEMMA_SPEED_ROUTES", "1") != "0"


def speed_routes_enabled():
    """Whether the speed routes are on (the default)."""
    return _speed_routes


def set_speed_routes(enabled):
    """Turns every speed route on (`True`) or off (`False`).

    With them off, keras_gemma computes everything through Keras' own
    layers and `keras.ops`. Compiled generation functions are cached per
    model: call `compile()` again (or build the model anew) after switching.
    """
    global _speed_routes
    _speed_routes = bool(enabled)


@contextlib.contextmanager
def speed_routes(enabled):
    """Runs the block with the speed routes on or off, then restores them."""
    previous = _speed_routes
    set_speed_routes(enabled)
    try:
        yield
    finally:
        set_speed_routes(previous)


def _backend():
    return keras.config.backend()


# === Matrix products ===


def matmul(a, b):
    """`a @ b` for 2-D tensors.

    PyTorch CPU, float32: through numpy (OpenBLAS), which runs these products
    at 1.3-1.6x torch's rate on the development CPU, in training too.
    """
    outputs = _numpy_matmul(a, b)
    return ops.matmul(a, b) if outputs is None else outputs


def projection_matmul(inputs, kernel, contracted_axes, kernel_contracted_first):
    """`inputs` (batch..., contracted...) times `kernel` (contracted...,
    free...) or (free..., contracted...), or None where no faster route
    applies (the caller then runs its einsum).

    PyTorch CPU, float32: numpy views of the same memory (no copy of the
    weights), for the reason of `matmul`.
    """
    if not _speed_routes or _backend() != "torch":
        return None
    import torch

    if not isinstance(inputs, torch.Tensor):
        return None  # a symbolic call: no views to make
    weights = ops.convert_to_tensor(kernel)
    batch_shape = tuple(inputs.shape[: inputs.ndim - contracted_axes])
    if kernel_contracted_first:
        free_shape = tuple(weights.shape[contracted_axes:])
        matrix = weights.reshape(math.prod(weights.shape[:contracted_axes]), -1)
    else:
        free_shape = tuple(weights.shape[: weights.ndim - contracted_axes])
        matrix = weights.reshape(math.prod(free_shape), -1).T
    outputs = _numpy_matmul(inputs.reshape(-1, matrix.shape[0]), matrix)
    return None if outputs is None else outputs.reshape(*batch_shape, *free_shape)


def _numpy_matmul(a, b):
    """`a @ b` through numpy for 2-D float32 CPU torch tensors (a transposed
    operand is a Fortran-ordered view), or None where that does not apply.
    Under autograd the backward products go through numpy too."""
    if not _speed_routes or _backend() != "torch":
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
    requested gradients need: for a frozen kernel (LoRA), the kernel and not
    the inputs, as torch's own product does."""
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


# === Attention ===


def write_cache(cache, update, index):
    """`cache` `(b, 2, L, K, h)` with `update` `(b, 2, t, K, h)` written at
    position `index`, returned as the new cache.

    PyTorch outside autograd: written in place (`ops.slice_update` copies the
    whole cache, once per layer per token).
    """
    if _speed_routes and _backend() == "torch":
        import torch

        if not torch.is_grad_enabled():
            # A tensor index, so nothing waits on the device.
            positions = torch.arange(update.shape[2], device=cache.device) + index
            return cache.index_copy_(2, positions, update)
    return ops.slice_update(cache, [0, 0, index, 0, 0], update)


def scan_position_chunks():
    """Whether rematerialized chunks of positions run in `ops.scan` (True)
    or a Python loop (False).

    JAX: in a scan, since with a Python loop XLA ran every recomputation at
    once and kept a quarter of the memory saving. (The loop is the plain
    route: TensorFlow cannot differentiate layer variables through
    `recompute_grad` inside a while loop.)
    """
    return _speed_routes and _backend() == "jax"


# === The training loss ===


def softmax_cross_entropy(logits, labels, weights):
    """`(losses, correct, logit_grad)` for float32 logits `(c, vocabulary)`,
    computed in place over `logits` (which it overwrites), or None where this
    route does not apply.

    PyTorch eager: each elementwise operation would be its own pass with a
    fresh 131 MB result (b2l), 460 ms of a 3.9 s step; in place, about 100 ms.
    """
    if not _speed_routes or _backend() != "torch":
        return None
    import torch

    if torch.compiler.is_compiling():  # torch.compile fuses the passes itself
        return None
    rows = torch.arange(logits.shape[0], device=logits.device)
    labels = labels.long()
    label_logits = logits[rows, labels]
    correct = torch.argmax(logits, dim=-1) == labels
    row_max = torch.amax(logits, dim=-1)
    exp = logits.sub_(row_max[:, None]).exp_()
    total = torch.sum(exp, dim=-1)
    losses = row_max + torch.log(total) - label_logits
    logit_grad = exp.mul_((weights / total)[:, None])
    logit_grad.index_put_((rows, labels), -weights, accumulate=True)
    return losses, correct, logit_grad


def training_jit_compile(jit_compile):
    """The `jit_compile` to give `keras.Model.compile` for training.

    TensorFlow, "auto", outside a `tf.distribute` strategy: XLA (Keras'
    "auto" leaves it off on CPU; b2l LoRA training runs 3.2x faster with it).
    """
    if jit_compile != "auto" or not _speed_routes or _backend() != "tensorflow":
        return jit_compile
    import tensorflow as tf

    return True if not tf.distribute.has_strategy() else jit_compile


# === Generation ===


def inference_function(model, fn, static_argnames=(), donate_argnums=()):
    """`fn` compiled for inference with `model`'s weights: read, never
    written; the sampler's seed state advances. Keyword arguments named in
    `static_argnames` are compile-time constants (one trace per value);
    positional arguments in `donate_argnums` may be updated in place.

    JAX: `jax.jit` over the model's state (as keras-hub does). TensorFlow: a
    `tf.function` without XLA, whose own kernels run the one-token
    projections at memory speed where XLA's are 3.5x slower (b2l decoding).
    PyTorch: eager without autograd, with one torch thread (see
    `single_torch_thread`).
    """
    backend = _backend()
    if model.run_eagerly or backend not in ("jax", "tensorflow", "torch"):
        return fn
    if backend == "tensorflow":
        import tensorflow as tf

        jit_compile = False if _speed_routes else getattr(model, "jit_compile", True)
        return tf.function(fn, jit_compile=jit_compile)
    if backend == "torch":
        import torch

        def no_grad_fn(*args, **kwargs):
            with torch.no_grad(), single_torch_thread():
                return fn(*args, **kwargs)

        return no_grad_fn
    import jax

    @functools.partial(
        jax.jit,
        static_argnames=static_argnames,
        donate_argnums=tuple(i + 1 for i in donate_argnums),
    )
    def stateless_fn(state, *args, **kwargs):
        sampler_values, trainable_values, non_trainable_values = state
        mapping = itertools.chain(
            zip(model.sampler.variables, sampler_values),
            zip(model.trainable_variables, trainable_values),
            zip(model.non_trainable_variables, non_trainable_values),
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            outputs = fn(*args, **kwargs)
        sampler_values = [
            v if scope.get_current_value(v) is None else scope.get_current_value(v)
            for v in model.sampler.variables
        ]
        return outputs, sampler_values

    def jax_fn(*args, **kwargs):
        state = (
            [v.value for v in model.sampler.variables],
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        )
        outputs, sampler_values = stateless_fn(state, *args, **kwargs)
        for variable, value in zip(model.sampler.variables, sampler_values):
            variable.assign(value)
        return outputs

    return jax_fn


@contextlib.contextmanager
def single_torch_thread():
    """Runs the block with one torch CPU thread (PyTorch, speed routes on).

    torch's OpenMP workers spin after each operation and take the cores from
    the numpy products' OpenBLAS threads: one torch thread took a b2l
    decoding step from 125 to 102 ms. The previous count is restored on any
    exit; only generation runs under it.
    """
    if not _speed_routes or _backend() != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# === Distribution ===


def keras_distribution_available():
    """Whether `keras.distribution`'s meshes and layouts run here: Keras 3.15
    implements them for JAX only."""
    return _backend() == "jax"


def torch_distributed_data_parallel(model, **kwargs):
    """PyTorch: `torch.nn.parallel.DistributedDataParallel(model, **kwargs)`
    (`keras_gemma.distribution.torch_data_parallel`), with `model`'s
    variables, as they are now, registered as its torch parameters first.
    Not a speed route: a fix. keras-hub's Backbone and Task set attributes
    past torch's `__setattr__` while Keras builds them, so Keras' own
    parameter dict is never registered and `model.parameters()` is empty
    (keras-hub's models too), which DDP refuses."""
    if _backend() != "torch":
        raise RuntimeError(
            f"torch_data_parallel is PyTorch's route; this is the {_backend()} backend "
            "(JAX: keras.distribution; TensorFlow: tf.distribute.MirroredStrategy)."
        )
    import torch

    parameters = torch.nn.ParameterDict({v.path: v.value for v in model.variables})
    torch.nn.Module.__setattr__(model, "keras_gemma_parameters", parameters)
    return torch.nn.parallel.DistributedDataParallel(model, **kwargs)
