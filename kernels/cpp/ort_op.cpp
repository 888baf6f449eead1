// ONNX Runtime custom-op library: domain com.mobillm.
//
//   BlockQuantize(x) -> (codes uint8 [..., code_bytes], scales float16 [..., n_blocks])
//       attributes: format (string: int8 | fp8 | int4 | nf4 | fp4), block_size (int, default 64)
//   BlockQuantizeFp16(x) -> (codes float16 [..., H], scales float16 [..., 0])
//       the fp16 format (saturating cast); attributes format ("fp16", optional), block_size (ignored)
//
// x is float or float16 [..., H]. The bytes equal kernels/codec.py (and the standard-op
// subgraph of onnx_codec.py). ORT infers a custom op's output element types from its input
// types only, so the fp16 format, whose codes are float16, is its own op type.
//
// The library uses only the C API handed to RegisterCustomOps (ORT_API_MANUAL_INIT): it links
// no onnxruntime library and loads into the pip onnxruntime (>= 1.21, the headers' API).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <mutex>
#include <string>
#include <vector>

#include "block_quant.h"

#if defined(MOBILLM_WITH_CUDA)
#include "../cuda/block_quant_cuda.h"
#endif

namespace {

constexpr const char* kDomain = "com.mobillm";
// The op set version engines record (manifest custom_op.version, the model's opset import).
// Bump it when the ops' semantics change; kernels/native.py OP_VERSION must match.
constexpr int kOpsetVersion = 1;
constexpr int64_t kDefaultBlockSize = 64;
// Rows are split into pieces of about this many elements for ORT's intra-op thread pool.
constexpr int64_t kElementsPerTask = 1 << 16;

struct Attrs {
  int fmt = -1;
  int64_t block_size = kDefaultBlockSize;
};

OrtStatusPtr make_error(const OrtApi& api, const std::string& msg) {
  return api.CreateStatus(ORT_INVALID_ARGUMENT, ("com.mobillm: " + msg).c_str());
}

// The format/block_size attributes of one node; fp16_op selects BlockQuantizeFp16's rules.
OrtStatusPtr read_attrs(const OrtApi& api, const OrtKernelInfo* info, bool fp16_op, Attrs* out) {
  size_t size = 0;
  std::string fmt_name = fp16_op ? "fp16" : "";
  if (OrtStatusPtr st = api.KernelInfoGetAttribute_string(info, "format", nullptr, &size)) {
    api.ReleaseStatus(st);
    if (!fp16_op) return make_error(api, "BlockQuantize needs a string attribute 'format' (int8, fp8, int4, nf4, fp4)");
  } else {
    std::vector<char> buf(size);
    if (OrtStatusPtr st2 = api.KernelInfoGetAttribute_string(info, "format", buf.data(), &size)) return st2;
    fmt_name.assign(buf.data());
  }
  int64_t bs = kDefaultBlockSize;
  if (OrtStatusPtr st = api.KernelInfoGetAttribute_int64(info, "block_size", &bs)) {
    api.ReleaseStatus(st);
    bs = kDefaultBlockSize;
  }
  const int fmt = mobillm_parse_format(fmt_name.c_str());
  if (fmt < 0) return make_error(api, "unknown format '" + fmt_name + "'; choose int8, fp8, int4, nf4, fp4 or fp16");
  if (fp16_op && fmt != MOBILLM_FP16)
    return make_error(api, "BlockQuantizeFp16 only does format 'fp16'; use BlockQuantize for '" + fmt_name + "'");
  if (!fp16_op && fmt == MOBILLM_FP16)
    return make_error(api, "format 'fp16' has float16 codes: use the op com.mobillm::BlockQuantizeFp16");
  if (bs < 1) return make_error(api, "block_size must be >= 1, got " + std::to_string(bs));
  out->fmt = fmt;
  out->block_size = bs;
  return nullptr;
}

struct RowJob {
  const void* x;
  int dtype;
  int64_t hidden, rows, rows_per_task;
  Attrs attrs;
  void* codes;
  uint16_t* scales;
};

void run_row_task(void* data, size_t task) {
  const RowJob& job = *static_cast<const RowJob*>(data);
  const int64_t r0 = (int64_t)task * job.rows_per_task;
  const int64_t r1 = std::min(job.rows, r0 + job.rows_per_task);
  mobillm_block_quantize_rows(job.x, job.dtype, job.hidden, job.attrs.fmt, job.attrs.block_size, r0, r1, job.codes,
                              job.scales);
}

struct Kernel {
  const OrtApi& api;
  Attrs attrs;
  bool on_cuda;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    try {
      Ort::KernelContext ctx(context);
      Ort::ConstValue input = ctx.GetInput(0);
      const Ort::TensorTypeAndShapeInfo info = input.GetTensorTypeAndShapeInfo();
      const std::vector<int64_t> shape = info.GetShape();
      if (shape.empty() || shape.back() < 1)
        return make_error(api, "BlockQuantize expects x of shape [..., H] with H >= 1");
      const int64_t hidden = shape.back();
      int64_t rows = 1;
      for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
      const int dtype = info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? MOBILLM_FLOAT16 : MOBILLM_FLOAT32;

      std::vector<int64_t> codes_shape(shape), scales_shape(shape);
      const bool fp16 = attrs.fmt == MOBILLM_FP16;
      codes_shape.back() = fp16 ? hidden : mobillm_code_bytes(attrs.fmt, hidden);
      scales_shape.back() = mobillm_scales_per_row(attrs.fmt, hidden, attrs.block_size);
      Ort::UnownedValue codes = ctx.GetOutput(0, codes_shape);
      Ort::UnownedValue scales = ctx.GetOutput(1, scales_shape);
      if (rows == 0) return nullptr;
      void* codes_data = codes.GetTensorMutableRawData();
      uint16_t* scales_data = fp16 ? nullptr : static_cast<uint16_t*>(scales.GetTensorMutableRawData());

      if (on_cuda) {
#if defined(MOBILLM_WITH_CUDA)
        const int rc = mobillm_cuda_block_quantize(input.GetTensorRawData(), dtype, rows, hidden, attrs.fmt,
                                                   attrs.block_size, codes_data, scales_data,
                                                   ctx.GetGPUComputeStream());
        if (rc != 0) return make_error(api, std::string("CUDA launch failed: ") + mobillm_cuda_last_error());
        return nullptr;
#else
        return make_error(api, "this library was built without CUDA");
#endif
      }
      RowJob job{input.GetTensorRawData(), dtype, hidden, rows, std::max<int64_t>(1, kElementsPerTask / hidden),
                 attrs, codes_data, scales_data};
      const size_t tasks = (size_t)((rows + job.rows_per_task - 1) / job.rows_per_task);
      if (tasks == 1) {
        run_row_task(&job, 0);
      } else {
        ctx.ParallelFor(run_row_task, tasks, 0, &job);
      }
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return make_error(api, e.what());
    }
  }
};

// One registration of an op type for one input element type and execution provider.
struct Op : Ort::CustomOpBase<Op, Kernel, /*WithStatus=*/true> {
  Op(bool fp16_op, ONNXTensorElementDataType input_type, const char* provider)
      : fp16_op_(fp16_op), input_type_(input_type), provider_(provider) {
    start_ver_ = 1;
    end_ver_ = kOpsetVersion;  // a model importing a newer com.mobillm opset finds no kernel here
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    Attrs attrs;
    if (OrtStatusPtr st = read_attrs(api, info, fp16_op_, &attrs)) return st;
    *kernel = new Kernel{api, attrs, std::string(provider_) == "CUDAExecutionProvider"};
    return nullptr;
  }
  const char* GetName() const { return fp16_op_ ? "BlockQuantizeFp16" : "BlockQuantize"; }
  const char* GetExecutionProviderType() const { return provider_; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return input_type_; }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 0 && !fp16_op_ ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  }

  // Static output shapes for the graph: leading dims as x, then the code and scale widths.
  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) {
    const Ort::ShapeInferContext::Shape& in = ctx.GetInputShape(0);
    if (in.empty() || !in.back().IsInt()) return Ort::Status{nullptr};
    std::string fmt_name = "fp16";
    int64_t bs = kDefaultBlockSize;
    try {
      fmt_name = ctx.GetAttrString("format");
    } catch (const Ort::Exception&) {
    }
    try {
      bs = ctx.GetAttrInt("block_size");
    } catch (const Ort::Exception&) {
    }
    const int fmt = mobillm_parse_format(fmt_name.c_str());
    if (fmt < 0 || bs < 1) return Ort::Status{nullptr};  // the kernel reports the error
    const int64_t hidden = in.back().AsInt();
    Ort::ShapeInferContext::Shape codes(in), scales(in);
    codes.back() = Ort::ShapeInferContext::SymbolicInteger(fmt == MOBILLM_FP16 ? hidden : mobillm_code_bytes(fmt, hidden));
    scales.back() = Ort::ShapeInferContext::SymbolicInteger(mobillm_scales_per_row(fmt, hidden, bs));
    Ort::Status st = ctx.SetOutputShape(0, codes, fmt == MOBILLM_FP16 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16
                                                                      : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
    if (!st.IsOK()) return st;
    return ctx.SetOutputShape(1, scales, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  }

 private:
  bool fp16_op_;
  ONNXTensorElementDataType input_type_;
  const char* provider_;
};

const std::vector<const Op*>& all_ops() {
  static const std::vector<const Op*> ops = [] {
    std::vector<const Op*> v;
    std::vector<const char*> providers = {"CPUExecutionProvider"};
#if defined(MOBILLM_WITH_CUDA)
    providers.push_back("CUDAExecutionProvider");
#endif
    for (const char* provider : providers)
      for (bool fp16_op : {false, true})
        for (auto type : {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16})
          v.push_back(new Op(fp16_op, type, provider));
    return v;
  }();
  return ops;
}

// Session options keep pointers to the domain: it lives as long as the library.
void keep_domain(Ort::CustomOpDomain&& domain) {
  static std::vector<Ort::CustomOpDomain> domains;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  domains.push_back(std::move(domain));
}

}  // namespace

// Read by kernels/native.py (ctypes, before any session) to check an engine's op version.
extern "C" MOBILLM_API int mobillm_ort_ops_opset_version(void) { return kOpsetVersion; }

extern "C" MOBILLM_API OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // An older runtime: report through the oldest API, which every runtime serves.
    const OrtApi* old = api_base->GetApi(1);
    return old->CreateStatus(ORT_FAIL, "com.mobillm custom ops need onnxruntime >= 1.21");
  }
  Ort::InitApi(api);
  try {
    Ort::CustomOpDomain domain{kDomain};
    for (const Op* op : all_ops()) domain.Add(op);
    Ort::UnownedSessionOptions(options).Add(domain);
    keep_domain(std::move(domain));
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
