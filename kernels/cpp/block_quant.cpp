// Public C entry points of the CPU kernel: argument checks, then the best compiled
// instruction set for this processor (AVX2 + F16C where present, else x86-64-v2 / SSE4.2).
#include "block_quant.h"

#include <string.h>

#include <atomic>

namespace mobillm {
#define MOBILLM_DECLARE_ISA(ns)                                                                                   \
  namespace ns {                                                                                                   \
  int quantize_rows(const void* x, int dtype, int64_t hidden, int fmt, int64_t bs, int64_t r0, int64_t r1,        \
                    void* codes, uint16_t* scales);                                                                \
  int dequantize(const void* codes, const uint16_t* scales, int64_t rows, int64_t hidden, int fmt, int64_t bs,     \
                 float* out);                                                                                      \
  }
#if defined(MOBILLM_X86_DISPATCH)
MOBILLM_DECLARE_ISA(isa_avx2)
MOBILLM_DECLARE_ISA(isa_sse42)
#endif
MOBILLM_DECLARE_ISA(isa_generic)
}  // namespace mobillm

namespace {

struct Isa {
  const char* name;
  decltype(&mobillm::isa_generic::quantize_rows) quantize_rows;
  decltype(&mobillm::isa_generic::dequantize) dequantize;
};

// Best first; the last one runs anywhere the library was built for.
const Isa kIsas[] = {
#if defined(MOBILLM_X86_DISPATCH)
    {"avx2+f16c", mobillm::isa_avx2::quantize_rows, mobillm::isa_avx2::dequantize},
    {"sse4.2", mobillm::isa_sse42::quantize_rows, mobillm::isa_sse42::dequantize},
#endif
    {"generic", mobillm::isa_generic::quantize_rows, mobillm::isa_generic::dequantize},
};
constexpr int kNumIsas = sizeof(kIsas) / sizeof(kIsas[0]);

bool supported(const Isa& candidate) {
#if defined(MOBILLM_X86_DISPATCH)
  // The AVX2 build is compiled with -mavx2 -mf16c -mbmi -mbmi2 on top of x86-64-v2.
  // The SSE build is -march=x86-64-v2 (SSE4.2, POPCNT).
  __builtin_cpu_init();
  if (&candidate == &kIsas[0])
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") &&
           __builtin_cpu_supports("bmi2");
  if (&candidate == &kIsas[1]) return __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("popcnt");
#endif
  (void)candidate;
  return true;
}

const Isa* best_isa() {
  for (const Isa& candidate : kIsas)
    if (supported(candidate)) return &candidate;
  return &kIsas[kNumIsas - 1];
}

std::atomic<const Isa*> g_isa{nullptr};

const Isa& isa() {
  const Isa* chosen = g_isa.load(std::memory_order_acquire);
  if (chosen == nullptr) {
    chosen = best_isa();
    g_isa.store(chosen, std::memory_order_release);
  }
  return *chosen;
}

bool valid_args(int dtype, int64_t hidden, int fmt, int64_t block_size, int* status) {
  *status = MOBILLM_OK;
  if (fmt < MOBILLM_INT8 || fmt > MOBILLM_FP4) *status = MOBILLM_BAD_FORMAT;
  else if (dtype != MOBILLM_FLOAT32 && dtype != MOBILLM_FLOAT16) *status = MOBILLM_BAD_DTYPE;
  else if (hidden < 1 || block_size < 1) *status = MOBILLM_BAD_SHAPE;
  return *status == MOBILLM_OK;
}

}  // namespace

extern "C" {

int mobillm_parse_format(const char* name) {
  static const char* const names[] = {"int8", "fp8", "int4", "nf4", "fp16", "fp4"};
  if (name == nullptr) return -1;
  if (strcmp(name, "none") == 0) return MOBILLM_FP16;
  for (int i = 0; i < 6; ++i)
    if (strcmp(name, names[i]) == 0) return i;
  return -1;
}

int64_t mobillm_code_bytes(int fmt, int64_t hidden) {
  if (fmt == MOBILLM_FP16) return 2 * hidden;
  if (fmt == MOBILLM_INT4 || fmt == MOBILLM_NF4 || fmt == MOBILLM_FP4) return (hidden + 1) / 2;
  return hidden;
}

int64_t mobillm_scales_per_row(int fmt, int64_t hidden, int64_t block_size) {
  return fmt == MOBILLM_FP16 ? 0 : (hidden + block_size - 1) / block_size;
}

int mobillm_block_quantize_rows(const void* x, int dtype, int64_t hidden, int fmt, int64_t block_size,
                                int64_t row_begin, int64_t row_end, void* codes, uint16_t* scales) {
  int status;
  if (!valid_args(dtype, hidden, fmt, block_size, &status)) return status;
  if (row_begin >= row_end) return MOBILLM_OK;
  return isa().quantize_rows(x, dtype, hidden, fmt, block_size, row_begin, row_end, codes, scales);
}

int mobillm_block_quantize(const void* x, int dtype, int64_t rows, int64_t hidden, int fmt, int64_t block_size,
                           void* codes, uint16_t* scales) {
  return mobillm_block_quantize_rows(x, dtype, hidden, fmt, block_size, 0, rows, codes, scales);
}

int mobillm_block_dequantize(const void* codes, const uint16_t* scales, int64_t rows, int64_t hidden, int fmt,
                             int64_t block_size, float* out) {
  int status;
  if (!valid_args(MOBILLM_FLOAT32, hidden, fmt, block_size, &status)) return status;
  return isa().dequantize(codes, scales, rows, hidden, fmt, block_size, out);
}

const char* mobillm_codec_isa(void) { return isa().name; }

int mobillm_codec_set_isa(const char* name) {
  for (const Isa& candidate : kIsas) {
    if (name != nullptr && strcmp(name, candidate.name) == 0 && supported(candidate)) {
      g_isa.store(&candidate, std::memory_order_release);
      return MOBILLM_OK;
    }
  }
  return MOBILLM_BAD_FORMAT;
}

}  // extern "C"
