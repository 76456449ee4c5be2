"""Weights as references: a model whose parameters stay in their checkpoint until a step needs them.

A model is built with its parameters on PyTorch's `meta` device (shapes and dtypes, no memory)
and its buffers (rotary frequencies, embedding scales) real, since those are computed from the
config. `LazyWeights` knows where each parameter lives in the checkpoint (a safetensors file,
read with positioned reads) and loads a group of them when a step asks (`materialize`), then hands them back
(`release`). Loading swaps the tensor inside the same `nn.Parameter` object
(`torch.utils.swap_tensors`), so the nodes built over the model (`surgery.architectures.build`),
which hold references to those objects, see the loaded values without being rebuilt.

A parameter that is a view of a fused checkpoint tensor (a packed QKV split into Q, K, V) is
loaded by loading its parent tensor and taking the same view of it.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from surgery.memory import return_freed_memory_to_the_system
from surgery.models.weights import WeightsError, safetensors_header

_SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real.

    Every `register_parameter` call moves the new parameter to meta. A module's constructor
    allocates its weight with `torch.empty` (untouched memory, never resident) before
    registering it, and initializes it afterwards, which on meta costs nothing.
    """
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            moved = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = moved

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


_CAST_BLOCK_BYTES = 16 << 20  # a tensor stored in another dtype is read and cast this much at a time


class Checkpoint:
    """The tensors of a safetensors model folder, read one at a time.

    Each tensor is read with a plain positioned read into memory of its own, which is freed when
    the tensor is released. (Memory-mapping the files would count every page ever read as the
    process's resident memory for as long as the file stays mapped: the whole model, by the end
    of an export.)
    """

    def __init__(self, folder: str | Path, files: dict[str, list[str]]):
        """`files`: each weight file of `folder` with the tensors it holds (`weight_files`)."""
        self.folder = Path(folder)
        self.where = {tensor: file for file, tensors in files.items() for tensor in tensors}
        self._headers: dict[str, tuple[int, dict[str, dict]]] = {}
        # Memory of released tensors, by (elements, dtype), for the next tensor of that size
        # (`recycle`); filled and emptied from two threads, hence the lock.
        self._recycled: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._recycled_bytes = 0
        self._recycle_limit = 0
        self._lock = threading.Lock()

    def _entry(self, name: str) -> tuple[Path, int, dict]:
        """(file, where its data starts, the tensor's header entry)."""
        file = self.where[name]
        if file not in self._headers:
            self._headers[file] = safetensors_header(self.folder / file)
        start, entries = self._headers[file]
        return self.folder / file, start, entries[name]

    def _loadable(self, name: str) -> tuple[Path, int, dict, torch.dtype]:
        """`_entry` and the stored dtype; a WeightsError for a dtype surgery cannot load."""
        path, start, entry = self._entry(name)
        stored = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if stored is None:
            raise WeightsError([(f"tensor '{name}' has dtype {entry['dtype']}, which surgery cannot load", None)])
        return path, start, entry, stored

    def names(self) -> list[str]:
        """Every tensor the checkpoint holds."""
        return list(self.where)

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype | None]:
        """A tensor's stored shape and dtype, from the file's header (nothing read)."""
        _, _, entry = self._entry(name)
        return tuple(entry["shape"]), _SAFETENSORS_DTYPES.get(entry["dtype"])

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read from the file now, in `dtype` (default: its stored dtype).

        A tensor stored in another dtype (bf16 read as fp32) is read and cast a block at a
        time straight into the result, so loading never holds the stored copy and the cast one
        whole at once (a 128k x 4k embedding: 2.1 GB, not 3.1 GB).
        """
        path, start, entry, stored = self._loadable(name)
        begin = entry["data_offsets"][0]
        tensor = self._empty(entry["shape"], dtype or stored)
        flat = tensor.view(-1)
        itemsize = torch.empty((), dtype=stored).element_size()
        step = flat.numel() if tensor.dtype == stored else max(1, _CAST_BLOCK_BYTES // itemsize)
        block = None if tensor.dtype == stored else torch.empty(min(step, flat.numel()), dtype=stored)
        with open(path, "rb", buffering=0) as handle:
            handle.seek(start + begin)
            for first in range(0, flat.numel(), step):
                count = min(step, flat.numel() - first)
                target = flat[first : first + count] if block is None else block[:count]
                self._read_into(handle, target, path, name)
                if block is not None:
                    flat[first : first + count] = target
        return tensor

    def _empty(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Uninitialized memory for a tensor: a recycled tensor's if one of its size is kept."""
        numel = math.prod(shape)
        with self._lock:
            kept = self._recycled.get((numel, dtype))
            if kept:
                flat = kept.pop()
                self._recycled_bytes -= flat.nbytes
                return flat.view(shape)
        return torch.empty(shape, dtype=dtype)

    def recycle(self, tensor: torch.Tensor, limit: int) -> None:
        """Keep a released tensor's memory for the next tensor of its size, if nothing else uses it.

        Memory fresh from the system costs a page fault per 4 KB when first written, which
        measured slower than reading the bytes themselves (Qwen2.5-1.5B's 7 GB: about 2.5 s);
        a layer's weights are the next layer's sizes. At most `limit` bytes are kept (the
        oldest dropped). A tensor still viewed elsewhere (a queued write, an array) is not kept.
        """
        storage = tensor.untyped_storage()
        whole = tensor.is_contiguous() and tensor.storage_offset() == 0 and storage.nbytes() == tensor.nbytes
        # Two users: `tensor` (the caller's reference is this same object) and `storage`.
        if not whole or tensor.device.type != "cpu" or torch._C._storage_Use_Count(storage._cdata) != 2:
            return
        if tensor.is_inference():
            # Made under inference_mode (a layer moved back from the GPU): a parameter made of it
            # outside that mode (the reading thread) could not require gradients.
            return
        del storage
        flat = tensor.view(-1)
        with self._lock:
            self._recycle_limit = max(self._recycle_limit, limit)
            self._recycled.setdefault((flat.numel(), flat.dtype), []).append(flat)
            self._recycled_bytes += flat.nbytes
            while self._recycled_bytes > self._recycle_limit:
                oldest = next(key for key, kept in self._recycled.items() if kept)
                self._recycled_bytes -= self._recycled[oldest].pop(0).nbytes

    def drop_recycled(self) -> None:
        """Give the kept memory back (a layer loop is over)."""
        with self._lock:
            self._recycled.clear()
            self._recycled_bytes = self._recycle_limit = 0
        return_freed_memory_to_the_system()

    def rows(self, name: str, rows: list[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Only the given rows (first-dimension indices) of a tensor, each read on its own: a few
        rows of a 0.9 GB vocabulary table cost kilobytes."""
        path, start, entry, stored = self._loadable(name)
        shape = entry["shape"]
        out = torch.empty((len(rows), *shape[1:]), dtype=stored)
        row_bytes = out[0].numel() * out.element_size() if len(rows) else 0
        with open(path, "rb", buffering=0) as handle:
            for i, row in enumerate(rows):
                handle.seek(start + entry["data_offsets"][0] + row * row_bytes)
                self._read_into(handle, out[i].reshape(-1), path, name)
        return out.to(dtype or stored)

    @staticmethod
    def _read_into(handle, target: torch.Tensor, path: Path, name: str) -> None:
        """Fill `target` with the next bytes of the open file."""
        view = memoryview(target.view(torch.uint8).numpy()) if target.numel() else memoryview(b"")
        read = 0
        while read < len(view):
            count = handle.readinto(view[read:])
            if not count:
                raise WeightsError([(f"weights file '{path.name}' ends inside tensor '{name}'", None)])
            read += count


class LazyWeights:
    """Where each parameter of a meta-device model lives in its checkpoint; loads and releases them."""

    def __init__(self, model: torch.nn.Module, checkpoint: Checkpoint, sources: dict | None = None):
        """Every parameter of `model` (tied ones once) must be a tensor of `checkpoint`, or be made
        from some as `sources` says (name -> `surgery.models.conversion.Source`)."""
        self.checkpoint = checkpoint
        self.sources = sources or {}
        self.names = {id(param): name for name, param in model.named_parameters()}
        # Parameters a pass rewrote, written to files of their own (`spill`): name -> that file's checkpoint.
        self.homes: dict[str, Checkpoint] = {}
        # Views of fused tensors: id -> (parent tensor name, shape, stride, storage offset)
        self.views: dict[int, tuple[str, tuple[int, ...], tuple[int, ...], int]] = {}
        return_freed_memory_to_the_system()

    def add_view(self, param: torch.nn.Parameter, parent: torch.nn.Parameter) -> None:
        """Record that `param` is a view of the model parameter `parent` (a fused projection's part)."""
        self.views[id(param)] = (self.names[id(parent)], tuple(param.shape), tuple(param.stride()),
                                 param.storage_offset())  # fmt: skip

    def knows(self, param: torch.nn.Parameter) -> bool:
        """Whether `param` is one of the checkpoint's (or a view of one)."""
        return id(param) in self.names or id(param) in self.views

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One parameter in `dtype`, read now; a WeightsError if it holds NaN or infinity.

        A parameter made of several checkpoint tensors (a layer's experts) is built from them
        here, each checked as it is read."""
        source = self.sources.get(name)
        if source is None:
            return self._finite(name, self._home(name).tensor(name, dtype))
        if source.mxfp4:
            from surgery.models.conversion import dequantize_mxfp4

            blocks, scales = (self.checkpoint.tensor(group[0]) for group in source.groups)
            return dequantize_mxfp4(blocks, scales, dtype)
        parts = []
        for group in source.groups:
            tensors = [self._finite(tensor, self.checkpoint.tensor(tensor, dtype)) for tensor in group]
            parts.append(torch.stack(tensors) if source.stacked else tensors[0])
            del tensors
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=source.dim)

    def shape(self, name: str) -> tuple[int, ...]:
        """A parameter's shape, from the checkpoint's headers (nothing read)."""
        source = self.sources.get(name)
        if source is None:
            return self._home(name).shape_and_dtype(name)[0]
        shapes = {t: self.checkpoint.shape_and_dtype(t)[0] for group in source.groups for t in group}
        return source.shape(shapes) or ()

    def load_rows(self, name: str, rows: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Some rows of one parameter in `dtype`; a WeightsError if they hold NaN or infinity."""
        source = self.sources.get(name)
        if source is not None and not source.stacked and len(source.groups) == 1:
            name = source.groups[0][0]  # only renamed
        elif source is not None:
            return self.load(name, dtype)[rows]
        return self._finite(name, self._home(name).rows(name, rows, dtype))

    def _home(self, name: str) -> Checkpoint:
        """The checkpoint holding tensor `name`: the model's, or a pass's file of rewritten weights."""
        return self.homes.get(name, self.checkpoint)

    def _finite(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (read from checkpoint tensor `name`), or a WeightsError if it holds NaN or infinity."""
        if tensor.is_floating_point() and not all_finite(tensor):
            where = self.checkpoint.where.get(name, "the weights")
            raise WeightsError([(f"tensor '{name}' in {where} holds NaN or infinite values", "the file is damaged")])
        return tensor

    def materialize(self, params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """Load every parameter of `params` still on meta, in its current dtype; returns those loaded.

        Every damaged tensor among them is reported at once (one WeightsError), and then none
        stays loaded.
        """
        loaded: list[torch.nn.Parameter] = []
        parents: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        problems: list[tuple[str, str | None]] = []
        for param in params:
            if param.device.type != "meta" or not self.knows(param):
                continue
            try:
                if id(param) in self.names:
                    value = self.load(self.names[id(param)], param.dtype)
                else:
                    parent, shape, stride, offset = self.views[id(param)]
                    key = (parent, param.dtype)
                    if key not in parents:
                        parents[key] = self.load(parent, param.dtype)
                    value = parents[key].as_strided(shape, stride, offset)
            except WeightsError as problem:
                problems += [p for p in problem.problems if p not in problems]
                continue
            torch.utils.swap_tensors(param, torch.nn.Parameter(value, requires_grad=param.requires_grad))
            loaded.append(param)
        if problems:
            self.release(loaded)
            raise WeightsError(problems)
        return loaded

    def spill(self, params: dict[str, torch.nn.Parameter], path: Path) -> None:
        """Write loaded parameters that no checkpoint holds (a pass's rewritten weights: a layer's
        kept or merged experts) to the safetensors file `path` under the given names, make that
        file their checkpoint, and release them. From then on they load and release like the
        model's own, so a pass that rewrites weights needs one layer in memory, not the model.
        """
        from safetensors.torch import save_file

        save_file({name: param.detach().contiguous() for name, param in params.items()}, str(path))
        home = Checkpoint(path.parent, {path.name: list(params)})
        for name, param in params.items():
            self.names[id(param)] = name
            self.homes[name] = home
        self.release(params.values())

    def release(self, params: Iterable[torch.nn.Parameter], recycle: bool = False) -> None:
        """Hand loaded parameters back: each becomes a meta tensor of its shape and dtype again.

        `recycle`: the next load will ask for the same sizes (the next layer): their memory is
        kept for it (`Checkpoint.recycle`) instead of being freed.
        """
        params = list(params)
        limit = sum(param.nbytes for param in params)
        for param in params:
            empty = torch.empty(param.shape, dtype=param.dtype, device="meta")
            holder = torch.nn.Parameter(empty, requires_grad=param.requires_grad)
            torch.utils.swap_tensors(param, holder)  # `holder` now holds the loaded values
            if recycle and id(param) in self.names and self.names[id(param)] not in self.sources:
                values = holder.data
                del holder
                self.checkpoint.recycle(values, limit)


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """Whether no element is NaN or infinite.

    A sum is finite only if every element is (a NaN or an infinity propagates), and it reads
    the tensor once without temporaries: the common case costs one pass. A sum that is not
    finite (a damaged tensor, or finite values whose sum overflows) is settled element by
    element, a few million at a time (`torch.isfinite` of the whole tensor would allocate
    temporaries twice its size).
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def unique_parameters(modules: Iterable[torch.nn.Module | None]) -> list[torch.nn.Parameter]:
    """The parameters of `modules`, each once (a tied head is the embedding's own)."""
    seen: dict[int, torch.nn.Parameter] = {}
    for module in modules:
        if module is None:
            continue
        for param in module.parameters():
            seen.setdefault(id(param), param)
    return list(seen.values())


def resident_bytes(params: Iterable[torch.nn.Parameter]) -> int:
    """Bytes of the given parameters that are loaded (not on meta)."""
    return sum(math.prod(p.shape) * p.element_size() for p in params if p.device.type != "meta")
