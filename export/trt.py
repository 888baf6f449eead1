"""`--trt`: a TensorRT engine plan built beside the ONNX graph with TensorRT's Python builder.

TensorRT's ONNX parser reads ENGINE/backbone.onnx into a network; with `--quant-op custom` its
com.mobillm BlockQuantize(Fp16) nodes map onto the plugins of the same names in
libmobillm_trt_plugin.so (kernels/trt/, loaded into TensorRT's plugin registry first). The builder
runs with fp16 kernels allowed and one optimization profile over batch and sequence length;
the serialized plan is written to ENGINE/backbone.plan and the manifest records it (`tensorrt`).

A plan runs only on the GPU model and TensorRT version that built it, so build it on the device
(or one like it). Nothing in this module has run: no machine this project is tested on has
TensorRT (docs/gpu.md says what did and did not run); tests/export/test_trt.py runs it wherever
`tensorrt` imports.
"""

from __future__ import annotations

from pathlib import Path

from .options import ExportError, ExportOptions

PLAN_NAME = "backbone.plan"
BATCH = (1, 16, 64)  # (min, opt, max) rows per batch in the optimization profile
SEQ = (1, 128)  # (min, opt) tokens per row; the max is the model's max_length
# ORT weight-only quantization writes com.microsoft MatMulNBits / MatMulInteger nodes, which
# TensorRT's ONNX parser does not know.
TRT_WEIGHTS = ("fp32", "fp16")


def check(opts: ExportOptions) -> None:
    """--trt's checks before any model is built: weights TensorRT can parse, TensorRT importable."""
    check_weights(opts.weight_format)
    require_tensorrt()


def check_weights(weights: str) -> None:
    """ExportError unless TensorRT's ONNX parser can read an engine with `weights`."""
    if weights not in TRT_WEIGHTS:
        raise ExportError(f"--trt: an engine with --weights {weights} holds ORT's weight-only quantized ops, which "
                          f"TensorRT's ONNX parser lacks; export with --weights fp32 or fp16 (TensorRT builds fp16 "
                          f"kernels either way)")


def require_tensorrt() -> None:
    """ExportError (exit 2, one line) when TensorRT's Python bindings do not import."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise ExportError("--trt needs TensorRT (pip install tensorrt, or JetPack's python3-libnvinfer) and an "
                          "NVIDIA GPU; TensorRT's Python bindings are not installed here. Without --trt, edge-run "
                          "--provider tensorrt builds a TensorRT engine on the device through ONNX Runtime's "
                          "TensorRT provider") from None


def add_plan(engine: Path | str) -> dict:
    """`export-backbone trt ENGINE`: build the plan of an existing engine folder where it will run
    (no torch needed) and record it in the manifest; returns the manifest's `tensorrt` record."""
    from mobillm.common.manifest import Manifest

    engine = Path(engine)
    manifest = Manifest.load(engine)
    check_weights(manifest.weights)
    require_tensorrt()
    # The fused graph (com.mobillm nodes -> the BlockQuantize plugin) when the engine has one.
    manifest.tensorrt = build_plan(engine, manifest.fused_graph or manifest.graph, manifest.quant_op,
                                   manifest.max_length)
    manifest.save(engine)  # the plan's sha256 joins the others
    return manifest.tensorrt


def profile_shapes(rank: int, name: str, max_length: int) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shape of a graph input: [batch, seq] ids and mask; a rank-1 input (token
    positions) holds at most batch * seq entries."""
    seq = (SEQ[0], min(SEQ[1], max_length), max_length)
    if rank == 2:
        return tuple((BATCH[k], seq[k]) for k in range(3))
    if rank == 1:
        return (1,), (BATCH[1],), (BATCH[2] * max_length,)
    raise ExportError(f"--trt: graph input {name} has rank {rank}; the profile knows [batch, seq] and [n] inputs")


def build_plan(folder: Path, graph: str, quant_op: str, max_length: int) -> dict:
    """Build and write ENGINE/backbone.plan from ENGINE/`graph`; returns the manifest's `tensorrt` record."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise ExportError("--trt: TensorRT could not create a builder (no CUDA GPU or driver here?)")
    plugin = None
    if quant_op == "custom":
        plugin = _load_plugin(builder)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(Path(folder) / graph)):  # reads the external-data file beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"--trt: TensorRT's ONNX parser rejected {graph}: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shapes[tensor.name] = profile_shapes(len(tensor.shape), tensor.name, max_length)
        profile.set_shape(tensor.name, *shapes[tensor.name])
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError("--trt: TensorRT could not build a plan for this graph (its log above says why)")
    with open(Path(folder) / PLAN_NAME, "wb") as f:
        f.write(plan)
    return {"plan": PLAN_NAME, "tensorrt": trt.__version__, "plugin_library": plugin, "fp16": True,
            "profile": {name: [list(s) for s in dims] for name, dims in shapes.items()}}


def _load_plugin(builder) -> str:
    """Load the BlockQuantize plugins into the builder's registry; the library's file name."""
    from mobillm.kernels import native

    try:
        lib = native.ensure_library("trt_plugin")
    except (native.NativeUnavailable, native.NativeBuildError) as exc:
        raise ExportError(f"--trt with --quant-op custom needs the TensorRT plugin library: {exc}") from None
    if builder.get_plugin_registry().load_library(str(lib)) is None:
        raise ExportError(f"--trt: TensorRT could not load the plugin library {lib}")
    return lib.name
