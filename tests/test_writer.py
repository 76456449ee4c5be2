"""The external data stream: page-aligned staging blocks, direct writes where the file system
takes them, buffered writes where it does not, and a file of exactly the bytes appended."""

from __future__ import annotations

import errno
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from surgery.export import writer


def _pieces(seed: int = 0) -> list[bytes]:
    """Byte strings of awkward sizes: smaller than, equal to and larger than a block."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in (1, 4095, 8192, 3, 20000, 8191, 17)]


def _stream_bytes(path, pieces: list[bytes]) -> writer.DataStream:
    stream = writer.DataStream(str(path))
    for piece in pieces:
        stream.append(torch.frombuffer(bytearray(piece), dtype=torch.uint8))
    stream.close()
    return stream


def test_the_file_holds_exactly_the_appended_bytes_across_blocks(tmp_path, monkeypatch):
    """Pieces straddling 8 KB blocks come out in order; the last block's padding is cut off."""
    monkeypatch.setattr(writer, "_BLOCK_BYTES", 8192)
    pieces = _pieces()
    stream = _stream_bytes(tmp_path / "data", pieces)
    assert (tmp_path / "data").read_bytes() == b"".join(pieces)
    assert stream.offset == sum(map(len, pieces))


def test_direct_writes_are_used_where_the_file_system_takes_them(tmp_path):
    """On Linux file systems with O_DIRECT (ext4, tmpfs since 6.6), the stream keeps it."""
    if not writer._DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    stream = _stream_bytes(tmp_path / "data", _pieces())
    if not stream.direct:
        pytest.skip("this file system refuses O_DIRECT")
    assert (tmp_path / "data").read_bytes() == b"".join(_pieces())


def test_a_file_system_refusing_direct_writes_gets_buffered_ones(tmp_path, monkeypatch):
    """A direct write answered EINVAL (some network and FUSE file systems) is retried buffered,
    and every later write is buffered too; the bytes are the same."""
    monkeypatch.setattr(writer, "_BLOCK_BYTES", 8192)
    monkeypatch.setattr(writer, "_DIRECT", writer._DIRECT or 0o40000)
    real_write, calls = os.write, []

    def refusing(fd, data):
        direct = bool(writer.fcntl.fcntl(fd, writer.fcntl.F_GETFL) & writer._DIRECT)
        calls.append(direct)
        if direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(writer.os, "write", refusing)
    stream = _stream_bytes(tmp_path / "data", _pieces())
    assert (tmp_path / "data").read_bytes() == b"".join(_pieces())
    if calls[0]:  # the platform kept O_DIRECT on open: the first write was refused, then none
        assert not stream.direct and calls.count(True) == 1


def test_a_file_system_refusing_direct_opens_gets_a_buffered_file(tmp_path, monkeypatch):
    """An open with O_DIRECT answered EINVAL (a file system without it) opens the file buffered."""
    monkeypatch.setattr(writer, "_DIRECT", writer._DIRECT or 0o40000)
    real_open = os.open

    def refusing(path, flags, mode=0o777):
        if flags & writer._DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(writer.os, "open", refusing)
    stream = _stream_bytes(tmp_path / "data", _pieces())
    assert not stream.direct
    assert (tmp_path / "data").read_bytes() == b"".join(_pieces())


def test_a_failed_write_is_an_error_of_the_export_not_a_silent_short_file(tmp_path, monkeypatch):
    """A write that fails (a full disk) is raised to the writer's caller, once; closing after it
    only cleans up."""
    monkeypatch.setattr(writer, "_BLOCK_BYTES", 8192)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "write", full)
    stream = writer.DataStream(str(tmp_path / "data"))
    with pytest.raises(OSError, match="No space"):
        stream.append(torch.zeros(8192 * 8, dtype=torch.uint8))  # more blocks than may queue
    stream.close()
    stream.close()


def test_a_failed_last_write_is_raised_by_close(tmp_path, monkeypatch):
    """A write that fails at the very end (the last, partial block) is raised by close."""

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    stream = writer.DataStream(str(tmp_path / "data"))
    stream.append(torch.zeros(100, dtype=torch.uint8))
    monkeypatch.setattr(writer.os, "write", full)
    with pytest.raises(OSError, match="No space"):
        stream.close()


def test_weights_of_every_layout_round_trip_through_the_stream(tmp_path, monkeypatch):
    """Contiguous, transposed (rows straddling blocks) and strided weights, each at a page-aligned
    offset, read back by onnx equal to the arrays given."""
    monkeypatch.setattr(writer, "_BLOCK_BYTES", 16384)
    rng = np.random.default_rng(1)
    arrays = {
        "contiguous": rng.standard_normal((37, 129)).astype(np.float32),
        "transposed": rng.standard_normal((301, 23)).astype(np.float32).T,  # rows of 1204 bytes
        "wide": rng.standard_normal((5000, 3)).astype(np.float32).T,  # a row wider than a block
        "strided": rng.standard_normal((80, 60)).astype(np.float16)[::2, ::3],
        "small": np.arange(10, dtype=np.float32),
    }
    graph = writer.GraphWriter(str(tmp_path / "model.onnx.data"))
    for name, array in arrays.items():
        graph.weight(name, array)
        graph.node("Identity", [name], f"id_{name}", [f"y_{name}"])
        graph.add_output(f"y_{name}", onnx.helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape))
    graph.save(str(tmp_path / "model.onnx"), 21, {}, "g")
    loaded = onnx.load(str(tmp_path / "model.onnx"))
    for init in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(init), arrays[init.name])
    offsets = [
        int(next(e.value for e in init.external_data if e.key == "offset"))
        for init in onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.initializer
        if init.external_data
    ]
    assert len(offsets) == 4 and all(offset % 4096 == 0 for offset in offsets)
