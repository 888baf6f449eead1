// TensorRT plugins (IPluginV3, TensorRT >= 10) around the CUDA block quantizer:
//
//   "BlockQuantize" v1       x float/half [..., H] -> codes int8 [..., code_bytes], scales half [..., n_blocks]
//   "BlockQuantizeFp16" v1   x float/half [..., H] -> codes half [..., H], scales half [..., 0]
//
// fields: format (char string, as the ONNX attribute), block_size (int32 or int64, default 64).
// The names match the com.mobillm ONNX op types, so TensorRT's ONNX parser maps those nodes
// onto these plugins once the library is loaded (trtexec --dynamicPlugins=..., or
// IPluginRegistry::loadLibrary). TensorRT does not allow uint8 plugin outputs, so the codes
// come out as int8 holding the same bytes: read them as uint8.
//
// Built only when CMake finds TensorRT (MOBILLM_TENSORRT); docs/native.md says what was tested.
#include <NvInferRuntime.h>
#include <cuda_runtime.h>

#include <string.h>

#include <new>
#include <string>
#include <vector>

#include "../cuda/block_quant_cuda.h"
#include "block_quant.h"

using namespace nvinfer1;

namespace {

constexpr char const* kVersion = "1";
constexpr char const* kNamespace = "";
constexpr int64_t kDefaultBlockSize = 64;

struct Config {
  int fmt = -1;
  int64_t block_size = kDefaultBlockSize;
};

// Reads format/block_size from plugin fields; false if they do not describe `fp16_op`'s formats.
bool parse_fields(PluginFieldCollection const* fc, bool fp16_op, Config* out) {
  std::string fmt = fp16_op ? "fp16" : "";
  int64_t bs = kDefaultBlockSize;
  for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    if (f.name == nullptr || f.data == nullptr) continue;
    if (strcmp(f.name, "format") == 0 && f.type == PluginFieldType::kCHAR) {
      fmt.assign(static_cast<char const*>(f.data), strnlen(static_cast<char const*>(f.data), (size_t)f.length));
    } else if (strcmp(f.name, "block_size") == 0 && f.type == PluginFieldType::kINT32) {
      bs = *static_cast<int32_t const*>(f.data);
    } else if (strcmp(f.name, "block_size") == 0 && f.type == PluginFieldType::kINT64) {
      bs = *static_cast<int64_t const*>(f.data);
    }
  }
  const int id = mobillm_parse_format(fmt.c_str());
  if (id < 0 || bs < 1 || (id == MOBILLM_FP16) != fp16_op) return false;
  out->fmt = id;
  out->block_size = bs;
  return true;
}

class BlockQuantizePlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  BlockQuantizePlugin(Config config, bool fp16_op) : config_(config), fp16_op_(fp16_op) {
    format_name_ = fp16_op ? "fp16" : std::string(fmt_name(config.fmt));
    block_size_ = (int32_t)config.block_size;
    fields_ = {PluginField("format", format_name_.c_str(), PluginFieldType::kCHAR, (int32_t)format_name_.size() + 1),
               PluginField("block_size", &block_size_, PluginFieldType::kINT32, 1)};
    collection_.nbFields = (int32_t)fields_.size();
    collection_.fields = fields_.data();
  }

  // IPluginV3
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  IPluginV3* clone() noexcept override { return new (std::nothrow) BlockQuantizePlugin(config_, fp16_op_); }

  // IPluginV3OneCore
  AsciiChar const* getPluginName() const noexcept override { return fp16_op_ ? "BlockQuantizeFp16" : "BlockQuantize"; }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return 2; }

  int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*, int32_t) noexcept override {
    return 0;
  }

  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const*, int32_t) const noexcept override {
    if (nbOutputs != 2) return 1;
    outputTypes[0] = fp16_op_ ? DataType::kHALF : DataType::kINT8;  // int8: the uint8 code bytes
    outputTypes[1] = DataType::kHALF;
    return 0;
  }

  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                          int32_t nbOutputs, IExprBuilder& expr) noexcept override {
    if (nbInputs != 1 || nbOutputs != 2 || inputs[0].nbDims < 1) return 1;
    const int32_t last = inputs[0].nbDims - 1;
    outputs[0] = inputs[0];
    outputs[1] = inputs[0];
    IDimensionExpr const* hidden = inputs[0].d[last];
    if (fp16_op_) {
      outputs[1].d[last] = expr.constant(0);
    } else {
      const bool four_bit = config_.fmt == MOBILLM_INT4 || config_.fmt == MOBILLM_NF4 || config_.fmt == MOBILLM_FP4;
      if (four_bit) outputs[0].d[last] = expr.operation(DimensionOperation::kCEIL_DIV, *hidden, *expr.constant(2));
      outputs[1].d[last] = expr.operation(DimensionOperation::kCEIL_DIV, *hidden, *expr.constant(config_.block_size));
    }
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    if (nbInputs != 1 || nbOutputs != 2 || inOut[pos].desc.format != TensorFormat::kLINEAR) return false;
    const DataType type = inOut[pos].desc.type;
    switch (pos) {
      case 0: return type == DataType::kFLOAT || type == DataType::kHALF;
      case 1: return type == (fp16_op_ ? DataType::kHALF : DataType::kINT8);
      default: return type == DataType::kHALF;
    }
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override { return 0; }

  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void*, cudaStream_t stream) noexcept override {
    Dims const& dims = inputDesc[0].dims;
    if (dims.nbDims < 1) return 1;
    int64_t rows = 1;
    for (int32_t i = 0; i + 1 < dims.nbDims; ++i) rows *= dims.d[i];
    const int dtype = inputDesc[0].type == DataType::kHALF ? MOBILLM_FLOAT16 : MOBILLM_FLOAT32;
    return mobillm_cuda_block_quantize(inputs[0], dtype, rows, dims.d[dims.nbDims - 1], config_.fmt, config_.block_size,
                                       outputs[0], static_cast<uint16_t*>(outputs[1]), stream);
  }

  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &collection_; }

 private:
  static char const* fmt_name(int fmt) {
    static char const* const names[] = {"int8", "fp8", "int4", "nf4", "fp16", "fp4"};
    return fmt >= 0 && fmt < 6 ? names[fmt] : "";
  }

  Config config_;
  bool fp16_op_;
  std::string format_name_;
  int32_t block_size_ = 0;
  std::vector<PluginField> fields_;
  PluginFieldCollection collection_{};
};

class BlockQuantizeCreator : public IPluginCreatorV3One {
 public:
  explicit BlockQuantizeCreator(bool fp16_op) : fp16_op_(fp16_op) {
    fields_ = {PluginField("format", nullptr, PluginFieldType::kCHAR, 0),
               PluginField("block_size", nullptr, PluginFieldType::kINT32, 1)};
    collection_.nbFields = (int32_t)fields_.size();
    collection_.fields = fields_.data();
  }

  IPluginV3* createPlugin(AsciiChar const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
    Config config;
    if (!parse_fields(fc, fp16_op_, &config)) return nullptr;
    return new (std::nothrow) BlockQuantizePlugin(config, fp16_op_);
  }
  PluginFieldCollection const* getFieldNames() noexcept override { return &collection_; }
  AsciiChar const* getPluginName() const noexcept override { return fp16_op_ ? "BlockQuantizeFp16" : "BlockQuantize"; }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

 private:
  bool fp16_op_;
  std::vector<PluginField> fields_;
  PluginFieldCollection collection_{};
};

}  // namespace

// Entry points TensorRT's IPluginRegistry::loadLibrary (and trtexec --dynamicPlugins) look for.
extern "C" MOBILLM_API void setLoggerFinder(ILoggerFinder*) {}

extern "C" MOBILLM_API IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static BlockQuantizeCreator quantize(false), fp16(true);
  static IPluginCreatorInterface* const creators[] = {&quantize, &fp16};
  nbCreators = 2;
  return creators;
}
