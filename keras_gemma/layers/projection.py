"""The einsum projections of Gemma's layers, each with its own initializer."""

import keras


def einsum_projection(equation, output_shape, kernel_initializer, dtype, name):
    """A bias-free `keras.layers.EinsumDense` with a fresh copy of
    `kernel_initializer`: one unseeded instance shared by several layers repeats
    its values, which would start, say, key and value kernels identical."""
    return keras.layers.EinsumDense(
        equation,
        output_shape=output_shape,
        kernel_initializer=keras.initializers.get(
            keras.initializers.serialize(kernel_initializer)
        ),
        dtype=dtype,
        name=name,
    )
