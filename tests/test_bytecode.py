"""Bytecode for read-only installs: surgery caches it under its own cache only where Python cannot."""

from __future__ import annotations

import sys

from surgery import bytecode


def _package(root, name: str) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("VALUE = 1\n")


def test_a_writable_install_is_left_alone(tmp_path, monkeypatch):
    _package(tmp_path, "writable_pkg")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not bytecode._uncacheable("writable_pkg")
    monkeypatch.setattr(bytecode, "_PROBES", ("writable_pkg",))
    monkeypatch.setattr(sys, "pycache_prefix", None)
    assert bytecode.cache_bytecode_if_read_only(str(tmp_path / "cache")) is None
    assert sys.pycache_prefix is None


def test_a_read_only_install_without_bytecode_caches_it_under_surgerys_cache(tmp_path, monkeypatch):
    _package(tmp_path, "readonly_pkg")
    monkeypatch.syspath_prepend(str(tmp_path))
    # Running as root, permissions cannot make a folder unwritable: the check's answer is faked.
    monkeypatch.setattr(bytecode.os, "access", lambda path, mode: False)
    assert bytecode._uncacheable("readonly_pkg")
    monkeypatch.setattr(bytecode, "_PROBES", ("readonly_pkg",))
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    prefix = bytecode.cache_bytecode_if_read_only(str(tmp_path / "cache"))
    assert prefix == str(tmp_path / "cache" / "bytecode") and sys.pycache_prefix == prefix


def test_bytecode_beside_the_source_counts_as_cached(tmp_path, monkeypatch):
    import importlib.util
    import py_compile

    _package(tmp_path, "compiled_pkg")
    source = tmp_path / "compiled_pkg" / "__init__.py"
    py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(bytecode.os, "access", lambda path, mode: False)
    assert not bytecode._uncacheable("compiled_pkg")
