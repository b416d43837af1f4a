"""A minimal safetensors reader that memory-maps tensors as numpy arrays.

The `safetensors` package's numpy loader cannot return bfloat16, the dtype of
the released Gemma checkpoints; this reader can (via `ml_dtypes`), reads only
the header until a tensor is asked for, and needs no deep-learning framework.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """The tensors of one `.safetensors` file, by name.

    `shapes` maps every tensor name to its shape (read from the header only);
    `get(name)` returns a read-only memory-mapped numpy array.
    """

    def __init__(self, path):
        self.path = str(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{self.path} is not a safetensors file (too short).")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise ValueError(
                    f"{self.path} is not a safetensors file (header length "
                    f"{header_len} exceeds the file size {size})."
                )
            try:
                header = json.loads(f.read(header_len))
            except ValueError as e:
                raise ValueError(f"{self.path} has an unreadable header: {e}") from e
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = header
        self.shapes = {name: tuple(e["shape"]) for name, e in header.items()}
        for name, entry in header.items():
            if entry["dtype"] not in _DTYPES:
                raise ValueError(
                    f"{self.path}: tensor {name!r} has dtype {entry['dtype']}, "
                    f"which keras_gemma cannot read (supported: {', '.join(_DTYPES)})."
                )
            begin, end = entry["data_offsets"]
            if self._data_start + end > size:
                raise ValueError(
                    f"{self.path}: tensor {name!r} runs past the end of the file "
                    "(truncated download?)."
                )

    def get(self, name):
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        shape = tuple(entry["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if (end - begin) != count * dtype.itemsize:
            raise ValueError(
                f"{self.path}: tensor {name!r} has {end - begin} bytes, but its "
                f"shape {shape} and dtype {entry['dtype']} need {count * dtype.itemsize}."
            )
        if count == 0:
            return np.zeros(shape, dtype)
        array = np.memmap(
            self.path,
            dtype=dtype,
            mode="r",
            offset=self._data_start + begin,
            shape=(count,),
        )
        return array.reshape(shape)
