"""An ONNX graph builder that streams weights straight into one external data file.

Weights are written as they are added, one tensor at a time, so exporting never holds a
second copy of the model in memory. Offsets of large tensors are page-aligned, which lets
onnxruntime memory-map them. The file writes run in a thread of their own, so the next block
is prepared (a transposed weight copied) while one is written: measured on Qwen2.5-1.5B in
fp32, copies and writes took 11 s each one after the other.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_ALIGN = 4096
_INLINE_LIMIT = 1024  # bytes; smaller tensors stay inside model.onnx
_BLOCK_BYTES = 32 << 20  # a non-contiguous weight is written in blocks of rows of about this size
_MAX_PENDING = 4  # blocks queued for the writing thread at most (each holds its memory until written)


def _contiguous(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of a strided array; torch's copy is faster than numpy's for a
    transpose (measured: 0.12 s against 0.18 s for 55 MB), numpy's serves other types (bf16)."""
    try:
        import torch

        return torch.from_numpy(array).contiguous().numpy()
    except (TypeError, ValueError, ImportError):
        return np.ascontiguousarray(array)


class GraphWriter:
    """Collects nodes, inputs and outputs; streams initializers to `data_path`."""

    def __init__(self, data_path: str):
        self.data_path = data_path
        self.data_location = os.path.basename(data_path)
        # Held open across many `weight` calls and closed by `save`/`close`, hence no `with`.
        self._data: BinaryIO = open(data_path, "wb")  # noqa: SIM115
        self._writing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-data")
        self._pending: deque[Future] = deque()
        self._offset = 0
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.parameter_count = 0
        self._constants: dict[tuple, str] = {}

    def close(self) -> None:
        """Finish the queued writes and close the data file (idempotent)."""
        try:
            self.flush()
        finally:
            self._writing.shutdown(wait=True)
            self._data.close()

    def flush(self) -> None:
        """Wait until every queued block is in the file. Blocks may view a parameter's own memory,
        so the exporter flushes before a node's weights are released; a failed write (a full
        disk) is raised here."""
        while self._pending:
            self._pending.popleft().result()

    def _write(self, buffer) -> None:
        """Queue bytes for the writing thread, in order; waits when too many are queued."""
        self._pending.append(self._writing.submit(self._data.write, buffer))
        self._offset += memoryview(buffer).nbytes
        while len(self._pending) > _MAX_PENDING:
            self._pending.popleft().result()

    def weight(self, name: str, array: np.ndarray, parameter: bool = True) -> str:
        """Add an initializer; large ones go to the external data file. Returns its name.

        `parameter=False` marks derived tables (RoPE caches) that are not model parameters.
        """
        if parameter:
            self.parameter_count += array.size
        if array.nbytes <= _INLINE_LIMIT:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
            return name
        offset = self._offset
        if offset % _ALIGN:
            self._write(b"\0" * (_ALIGN - offset % _ALIGN))
            offset = self._offset
        self._write_rows(array)
        tensor = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_location), ("offset", offset), ("length", array.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.initializers.append(tensor)
        return name

    def _write_rows(self, array: np.ndarray) -> None:
        """Write an array's bytes in row-major order. A non-contiguous one (a transposed weight)
        is copied a block of rows at a time, so writing it never holds a second whole copy."""
        if array.flags.c_contiguous or array.ndim < 2:
            # As raw bytes: bfloat16 (ml_dtypes) has no buffer-protocol format of its own.
            self._write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
            return
        row_bytes = max(1, array[0].nbytes)
        rows = max(1, _BLOCK_BYTES // row_bytes)
        for start in range(0, array.shape[0], rows):
            block = _contiguous(array[start : start + rows])
            self._write(memoryview(block.reshape(-1).view(np.uint8)))

    def constant(self, values, dtype=np.int64) -> str:
        """A small shared constant initializer (shapes, axes, scalars); not a model parameter."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = f"/constants/{array.dtype.name}/{'x'.join(map(str, array.shape)) or 'scalar'}/{len(self._constants)}"
            self.initializers.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def node(
        self,
        op_type: str,
        inputs: list[str],
        name: str,
        outputs: int | list[str] = 1,
        domain: str = "",
        **attributes,
    ) -> list[str]:
        """Add a node named `name`; returns its output names (generated unless given)."""
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None, **attributes))
        return outputs

    def op(self, op_type: str, inputs: list[str], name: str, domain: str = "", **attributes) -> str:
        """Add a single-output node and return that output's name."""
        return self.node(op_type, inputs, name, 1, domain, **attributes)[0]

    def add_input(self, name: str, elem_type: int, shape: list) -> str:
        """Declare a graph input; returns its name."""
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, name: str, elem_type: int, shape: list) -> None:
        """Declare a graph output."""
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def save(self, model_path: str, opset: int, metadata: dict[str, str], graph_name: str) -> onnx.ModelProto:
        """Write model.onnx (the data file was written as weights came in)."""
        self.close()
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
            producer_name="surgery",
        )
        # The lowest IR version that carries the opset, so older runtimes still load the model.
        model.ir_version = 10 if opset <= 21 else 11
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        with open(model_path, "wb") as handle:
            handle.write(model.SerializeToString())
        return model
