"""Which graph of an engine ONNX Runtime runs, and with whose op library: always this device's.

An engine exported with `--quant-op custom` holds two graphs sharing one weights file
(docs/native.md): `manifest.graph`, whose tap quantizers are standard ONNX ops (runs on any
ONNX Runtime), and `manifest.fused_graph`, the same graph with one com.mobillm node per tap (the
fused C++ kernel, same bytes, faster). `open_session` runs the fused graph when this device's
op library loads and knows the engine's op set; otherwise it says why in one line and runs the
standard graph. An engine naming an op set version this mobillm does not know is bad input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from mobillm.common.errors import BadInput
from mobillm.common.manifest import Manifest, ManifestError
from mobillm.kernels import native

log = logging.getLogger("mobillm.edge")

QUANTIZERS = ("auto", "fused", "standard")
LEGACY_OP_VERSION = 1  # engines that carry a copied library predate versioned op sets: they use set 1
_SESSION_ERRORS = (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.NotImplemented, ort_errors.InvalidArgument,
                   ort_errors.RuntimeException)


class QuantizerUnavailable(BadInput, RuntimeError):
    """The tap quantizer asked for (or the only one an engine has) cannot run here; says why."""


@dataclass
class EngineSession:
    """An ORT session over one of the engine's graphs, and what it runs."""

    session: ort.InferenceSession
    graph: str  # file name inside the engine folder
    quantizer: str  # "fused" (com.mobillm nodes) or "standard" (standard ONNX ops)
    op_library: Path | None  # the custom-op library registered, if any


def open_session(folder: Path | str, manifest: Manifest, options: ort.SessionOptions, providers: list,
                 quantizer: str = "auto", op_library: Path | str | None = None) -> EngineSession:
    """The engine's session: the fused graph where it can run (`quantizer` "auto" or "fused"),
    else the standard-op graph with a one-line notice. "fused" where it cannot run, and
    "standard" on an engine that has no standard graph, raise QuantizerUnavailable (exit 2).
    `op_library` overrides where this device's library is looked for (native.find_library)."""
    if quantizer not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {quantizer!r}; choose one of {', '.join(QUANTIZERS)}")
    folder = Path(folder)
    if manifest.custom_op_library and not manifest.fused_graph:
        return _open_legacy(folder, manifest, options, providers, quantizer, op_library)

    def standard() -> EngineSession:
        session = ort.InferenceSession(str(folder / manifest.graph), options, providers=providers)
        return EngineSession(session, manifest.graph, "standard", None)

    if quantizer == "standard":
        return standard()
    if not manifest.fused_graph:
        if quantizer == "fused":
            raise QuantizerUnavailable(f"{folder}: this engine has no fused quantizer graph; re-export it with "
                                       f"--quant-op custom, or drop --quantizer fused")
        return standard()
    version = op_version(folder, manifest)
    try:
        path = native.register_op_library(options, version, op_library)
        try:
            session = ort.InferenceSession(str(folder / manifest.fused_graph), options, providers=providers)
        except _SESSION_ERRORS as exc:
            raise native.OpLibraryUnusable(f"onnxruntime {ort.__version__} cannot run the fused graph with {path}: "
                                           f"{str(exc).strip().splitlines()[-1]}") from None
    except native.OpLibraryUnusable as exc:
        if quantizer == "fused":
            raise QuantizerUnavailable(f"--quantizer fused: {exc}") from None
        log.warning("fused tap quantizer unavailable: %s; running the standard-op quantizer (%s, slower)",
                    exc, manifest.graph)
        return standard()
    return EngineSession(session, manifest.fused_graph, "fused", path)


def op_version(folder: Path, manifest: Manifest) -> int:
    """The com.mobillm op set version the engine's fused graph needs; ManifestError (exit 2),
    naming both versions, when this mobillm does not know it."""
    custom_op = manifest.custom_op or {}
    domain, version = custom_op.get("domain"), custom_op.get("version")
    if domain != native.OP_DOMAIN:
        raise ManifestError(f"{folder}: the engine's fused quantizer uses op domain {domain!r}; this mobillm runs "
                            f"{native.OP_DOMAIN!r}")
    if version not in native.KNOWN_OP_VERSIONS:
        known = ", ".join(str(v) for v in native.KNOWN_OP_VERSIONS)
        raise ManifestError(f"{folder}: the engine's fused quantizer uses {domain} op set version {version}; this "
                            f"mobillm knows version {known}: install the mobillm that exported it on the device, "
                            f"or run with --quantizer standard")
    return int(version)


def _open_legacy(folder: Path, manifest: Manifest, options, providers, quantizer: str, op_library) -> EngineSession:
    """An engine from before fused_graph: its only graph has com.mobillm nodes and it carries the
    export machine's library. This device's own library comes first; the copy only when there is none."""
    if quantizer == "standard":
        raise QuantizerUnavailable(f"{folder}: this engine (exported before portable engines) has only the fused "
                                   f"quantizer graph; re-export it to get a standard-op graph too")
    assert manifest.custom_op_library, "open_session sends only engines that carry a library here"
    shipped = folder / manifest.custom_op_library
    try:
        path = native.register_op_library(options, LEGACY_OP_VERSION, op_library)
        log.warning("the engine carries the export machine's %s; using this device's own %s instead",
                    manifest.custom_op_library, path)
    except native.OpLibraryUnusable as own:
        foreign = native.foreign_architecture(shipped)
        if foreign:  # never dlopen another architecture's binary; this engine has no standard graph to fall back to
            raise QuantizerUnavailable(f"{folder}: this engine's quantizer needs the com.mobillm op library: {own}; "
                                       f"and the engine's own copy cannot run here ({foreign}); re-export the "
                                       f"engine") from None
        try:
            options.register_custom_ops_library(str(shipped))
        except _SESSION_ERRORS as exc:
            raise QuantizerUnavailable(f"{folder}: this engine's quantizer needs the com.mobillm op library: {own}; "
                                       f"and the engine's own copy does not load here "
                                       f"({str(exc).strip().splitlines()[-1]}); re-export the engine") from None
        path = shipped
        log.warning("no usable op library on this device (%s); using the copy the engine carries, built on the "
                    "export machine", own)
    session = ort.InferenceSession(str(folder / manifest.graph), options, providers=providers)
    return EngineSession(session, manifest.graph, "fused", path)
