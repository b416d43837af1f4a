"""A GGUF file's metadata and tensor index, read directly.

Speed: `gguf.GGUFReader` builds numpy views for every element of every
metadata array, 28 of the 45 s that loading the 270M Gemma 3 GGUF took (its
262144 tokens, scores and token types). Here scalar arrays are one
`np.frombuffer` each and strings one slice each: well under a second. The
tensors stay in a read-only memory map, in the layout `gguf.quants.dequantize`
takes. The format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

import mmap
import os
import struct

import numpy as np

_MAGIC = b"GGUF"
# GGUF metadata value types: numpy dtypes of the fixed-size ones.
_SCALARS = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9
# Tensor types stored as plain numpy elements; the others are blocks of bytes.
_ELEMENT_TYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


class GGUFTensorInfo:
    """One tensor: `name`, `shape` (ggml order, fastest dimension first),
    `tensor_type` (a `gguf.GGMLQuantizationType`) and `data` (a read-only
    view of the file, shaped as `gguf.quants.dequantize` expects)."""

    def __init__(self, name, shape, tensor_type, data):
        self.name, self.shape, self.tensor_type, self.data = name, shape, tensor_type, data


class GGUFFile:
    """`path`, `metadata` ({key: int, float, bool, str or list}) and
    `tensors` (a list of `GGUFTensorInfo`) of a GGUF file (versions 2 and 3).
    Raises `ValueError` naming the file if it is not a readable GGUF file."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                self._buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._read()
        except (ValueError, IndexError, struct.error, UnicodeDecodeError, OSError) as e:
            raise ValueError(f"{self.path} is not a readable GGUF file: {e}") from e

    def _read(self):
        from gguf.constants import GGML_QUANT_SIZES
        from gguf.constants import GGMLQuantizationType

        buffer = self._buffer
        if buffer[:4] != _MAGIC:
            raise ValueError("it does not start with 'GGUF'")
        version, tensor_count, metadata_count = struct.unpack_from("<IQQ", buffer, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (keras_gemma reads versions 2 and 3)")
        self._offset = 24
        self.metadata = {}
        for _ in range(metadata_count):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            dims = self._unpack("<I")
            shape = tuple(int(n) for n in struct.unpack_from(f"<{dims}Q", buffer, self._offset))
            self._offset += 8 * dims
            infos.append((name, shape, self._unpack("<I"), self._unpack("<Q")))
        alignment = int(self.metadata.get("general.alignment", 32))
        start = -(-self._offset // alignment) * alignment
        self.tensors = []
        for name, shape, type_id, offset in infos:
            tensor_type = GGMLQuantizationType(type_id)
            numpy_shape = tuple(reversed(shape))
            if type_id in _ELEMENT_TYPES:
                dtype = np.dtype(_ELEMENT_TYPES[type_id])
                count = int(np.prod(shape))
            else:  # blocks: each row's bytes
                block_size, type_size = GGML_QUANT_SIZES[tensor_type]
                numpy_shape = numpy_shape[:-1] + (numpy_shape[-1] // block_size * type_size,)
                dtype, count = np.dtype(np.uint8), int(np.prod(numpy_shape))
            begin = start + offset
            end = begin + count * dtype.itemsize
            if end > len(buffer):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            data = np.frombuffer(buffer, dtype, count, begin).reshape(numpy_shape)
            self.tensors.append(GGUFTensorInfo(name, shape, tensor_type, data))

    def _unpack(self, fmt):
        (value,) = struct.unpack_from(fmt, self._buffer, self._offset)
        self._offset += struct.calcsize(fmt)
        return value

    def _string(self):
        length = self._unpack("<Q")
        start = self._offset
        self._offset += length
        return self._buffer[start : self._offset].decode("utf-8")

    def _value(self, value_type):
        if value_type == _STRING:
            return self._string()
        if value_type in _SCALARS:
            dtype = np.dtype(_SCALARS[value_type])
            value = np.frombuffer(self._buffer, dtype, 1, self._offset)[0]
            self._offset += dtype.itemsize
            return value.item()
        if value_type != _ARRAY:
            raise ValueError(f"unknown metadata value type {value_type}")
        item_type, count = self._unpack("<I"), self._unpack("<Q")
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type])
            values = np.frombuffer(self._buffer, dtype, count, self._offset)
            self._offset += count * dtype.itemsize
            return values.tolist()
        if item_type == _STRING:
            raw = self._buffer
            strings = []
            offset = self._offset
            for _ in range(count):
                (length,) = struct.unpack_from("<Q", raw, offset)
                strings.append(raw[offset + 8 : offset + 8 + length].decode("utf-8"))
                offset += 8 + length
            self._offset = offset
            return strings
        return [self._value(item_type) for _ in range(count)]
