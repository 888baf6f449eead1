"""An op library built for another CPU architecture is never dlopen'ed: the device reads its ELF
header, says so in one line and runs the standard-op graph (or the next library that is its own)."""

import json
import logging
import shutil
import struct

import pytest

from mobillm.common.manifest import Manifest
from mobillm.edge_runtime.backbone import Backbone
from mobillm.edge_runtime.session import QuantizerUnavailable
from mobillm.kernels import native

OTHER = "x86_64" if native.this_machine() == "aarch64" else "aarch64"
E_MACHINE = {"aarch64": 183, "x86_64": 62}


def fake_library(folder, machine: str = OTHER):
    """An ELF header naming `machine` under the op library's name: enough to tell its architecture,
    and no library any loader would accept (so a dlopen would fail with the loader's own message)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / native.LIBRARIES["ort_ops"]
    path.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HH", 3, E_MACHINE[machine]) + bytes(44))
    return path


@pytest.fixture
def own_library():
    try:
        return native.ensure_library("ort_ops")
    except native.NativeUnavailable as exc:
        pytest.skip(f"native op library unavailable: {exc}")


def test_elf_header_names_the_architecture(tmp_path, own_library):
    assert native.library_machine(fake_library(tmp_path)) == OTHER
    assert native.library_machine(own_library) == native.this_machine()
    assert native.foreign_architecture(own_library) is None
    (tmp_path / "text.so").write_text("not a library")
    assert native.library_machine(tmp_path / "text.so") is None  # not ELF: the loader decides
    assert native.library_machine(tmp_path / "absent.so") is None
    with pytest.raises(native.OpLibraryUnusable, match=f"is built for {OTHER}, this device is {native.this_machine()}"):
        native.op_library_version(fake_library(tmp_path))


def test_another_architectures_copy_is_passed_over_for_the_own_one(tmp_path, monkeypatch, own_library):
    monkeypatch.setattr(native, "search_dirs", lambda: [tmp_path / "other", own_library.parent])
    fake_library(tmp_path / "other")
    assert native.found_libraries("ort_ops") == [tmp_path / "other" / own_library.name, own_library]
    assert native.find_library("ort_ops") == own_library


def test_only_another_architectures_library_falls_back_with_one_line(tiny_engine_factory, tmp_path, monkeypatch,
                                                                     caplog):
    engine = tiny_engine_factory(quant_op="custom")
    foreign = fake_library(tmp_path)
    monkeypatch.setattr(native, "search_dirs", lambda: [tmp_path])
    assert native.find_library("ort_ops") is None
    with caplog.at_level(logging.WARNING, logger="mobillm.edge"):
        bb = Backbone(engine)
    notices = [r.getMessage() for r in caplog.records]
    assert bb.engine_session.quantizer == "standard" and len(notices) == 1 and "\n" not in notices[0]
    assert f"only for another architecture ({foreign} is built for {OTHER}" in notices[0]
    assert "running the standard-op quantizer" in notices[0]
    with pytest.raises(QuantizerUnavailable, match=f"built for {OTHER}"):
        Backbone(engine, quantizer="fused")


def test_legacy_engine_carrying_another_architectures_library_is_a_clear_exit_2(tiny_engine_factory, tmp_path,
                                                                                monkeypatch):
    """The pre-fused_graph layout (graph = fused graph, the export machine's library copied in), on a
    device of another architecture with no library of its own: no dlopen of the copy, one message."""
    engine = tmp_path / "legacy"
    shutil.copytree(tiny_engine_factory(quant_op="custom"), engine)
    (engine / "backbone.onnx").unlink()
    (engine / "backbone.fused.onnx").rename(engine / "backbone.onnx")
    copy = fake_library(engine)
    data = json.loads((engine / "manifest.json").read_text())
    data.update(custom_op_library=copy.name, fused_graph=None, custom_op=None, files={})
    Manifest.from_dict({k: v for k, v in data.items() if k != "files"}).save(engine)
    monkeypatch.setattr(native, "search_dirs", lambda: [tmp_path / "nothing"])
    with pytest.raises(QuantizerUnavailable, match=f"engine's own copy cannot run here \\({copy} is built for {OTHER}"):
        Backbone(engine)
