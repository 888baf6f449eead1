// The CPU kernel body, compiled once per instruction set: block_quant_{avx2,sse42,generic}.cpp
// include it with MOBILLM_ISA_NS set and their own -march, and block_quant.cpp picks one at
// run time. Plain loops over one block at a time let the compiler vectorize (the AVX2 build
// spells the encode step out in intrinsics); every operation is exact or an IEEE fp32
// operation (build with -ffp-contract=off, never -ffast-math).
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "block_quant.h"
#include "codec_rules.h"

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef MOBILLM_ISA_NS
#error "define MOBILLM_ISA_NS before including block_quant_impl.h"
#endif

namespace mobillm {
namespace MOBILLM_ISA_NS {

constexpr uint16_t kNanScale = 0x7e00;  // np.float16(np.nan)

// Unpacked code of y == 0 (the code a zero or non-finite block gets).
constexpr uint8_t zero_code(int fmt) { return fmt == MOBILLM_INT4 ? 8 : fmt == MOBILLM_NF4 ? 7 : 0; }

static inline void widen_half(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = float_of_half(src[i]);
}

// codec's fp16 format for fp32 input: clip to +-65504 (NaN stays NaN), then round to fp16.
static inline void saturate_to_half(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  // minps/maxps return their second operand when either is NaN: the NaN input survives.
  const __m256 hi = _mm256_set1_ps(65504.0f), lo = _mm256_set1_ps(-65504.0f);
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_max_ps(lo, _mm256_min_ps(hi, _mm256_loadu_ps(src + i)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
#endif
  for (; i < n; ++i) {
    float v = src[i];
    v = v > 65504.0f ? 65504.0f : v;
    v = v < -65504.0f ? -65504.0f : v;
    dst[i] = half_bits(v);
  }
}

// The same for fp16 input, on the bits: +-inf saturates to +-65504, a NaN is quieted.
static inline void saturate_half_bits(const uint16_t* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = src[i];
    const uint16_t a = h & 0x7fff;
    dst[i] = a == 0x7c00 ? (uint16_t)((h & 0x8000) | 0x7bff) : a > 0x7c00 ? (uint16_t)(h | 0x0200) : h;
  }
}

// Largest |x| of a block as fp32 bits; >= 0x7f800000 means the block holds NaN or Inf.
static inline uint32_t absmax_bits(const float* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, bits_of(x[i]) & 0x7fffffffu);
  return m;
}

// Code of one scaled, clamped y (step 4), as an int32 lane: the vectorizer keeps 32-bit
// lanes through the whole rule and narrows to bytes once, in encode_block.
template <int F>
static inline int32_t code_of(float y) {
  if constexpr (F == MOBILLM_INT8) {
    return (int32_t)MOBILLM_RINTF(y) & 0xff;
  } else if constexpr (F == MOBILLM_INT4) {
    return (int32_t)MOBILLM_RINTF(y) + 8;
  } else if constexpr (F == MOBILLM_NF4) {
    constexpr float t[15] = MOBILLM_NF4_THRESHOLDS;
    int32_t c = 0;  // number of thresholds strictly below y: ties take the lower code
#pragma GCC unroll 15
    for (int k = 0; k < 15; ++k) c += y > t[k] ? 1 : 0;
    return c;
  } else if constexpr (F == MOBILLM_FP4) {
    return (int32_t)fp4_code(y);
  } else {
    return (int32_t)fp8_code(y);
  }
}

#if defined(__AVX2__)
// The AVX2 build spells steps 3-4 out for 8 lanes: the same operations as code_of (IEEE
// division, roundps to nearest even, integer fp8 rounding), with NF4's binary search done
// by in-register table lookups (vpermps) instead of 15 comparisons.
template <int F>
static inline __m256i code_vec(__m256 y) {
  if constexpr (F == MOBILLM_INT8 || F == MOBILLM_INT4) {
    const __m256i r = _mm256_cvtps_epi32(_mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return F == MOBILLM_INT8 ? _mm256_and_si256(r, _mm256_set1_epi32(0xff)) : _mm256_add_epi32(r, _mm256_set1_epi32(8));
  } else if constexpr (F == MOBILLM_NF4) {
    constexpr float t[15] = MOBILLM_NF4_THRESHOLDS;
    const __m256 t_odd = _mm256_setr_ps(t[1], t[5], t[9], t[13], 0, 0, 0, 0);  // level 3: t[c + 1], c in {0,4,8,12}
    const __m256 t_even = _mm256_setr_ps(t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14]);  // level 4: t[c]
    const __m256 m1 = _mm256_cmp_ps(y, _mm256_set1_ps(t[7]), _CMP_GT_OQ);
    __m256i c = _mm256_and_si256(_mm256_castps_si256(m1), _mm256_set1_epi32(8));
    const __m256 m2 = _mm256_cmp_ps(y, _mm256_blendv_ps(_mm256_set1_ps(t[3]), _mm256_set1_ps(t[11]), m1), _CMP_GT_OQ);
    c = _mm256_add_epi32(c, _mm256_and_si256(_mm256_castps_si256(m2), _mm256_set1_epi32(4)));
    const __m256 m3 = _mm256_cmp_ps(y, _mm256_permutevar8x32_ps(t_odd, _mm256_srli_epi32(c, 2)), _CMP_GT_OQ);
    c = _mm256_add_epi32(c, _mm256_and_si256(_mm256_castps_si256(m3), _mm256_set1_epi32(2)));
    const __m256 m4 = _mm256_cmp_ps(y, _mm256_permutevar8x32_ps(t_even, _mm256_srli_epi32(c, 1)), _CMP_GT_OQ);
    return _mm256_add_epi32(c, _mm256_and_si256(_mm256_castps_si256(m4), _mm256_set1_epi32(1)));
  } else {
    const __m256i bits = _mm256_castps_si256(y);
    const __m256i a = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
    const __m256 small = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(0x3c800000), a));
    const __m256 scaled = _mm256_mul_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(512.0f));
    const __m256i sub = _mm256_cvtps_epi32(_mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i normal = _mm256_add_epi32(a, _mm256_set1_epi32(0x7ffff));
    normal = _mm256_add_epi32(normal, _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1)));
    normal = _mm256_sub_epi32(_mm256_srli_epi32(normal, 20), _mm256_set1_epi32(960));
    const __m256i mag = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(normal), _mm256_castsi256_ps(sub), small));
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 24), _mm256_set1_epi32(0x80));
    const __m256i zero = _mm256_cmpeq_epi32(mag, _mm256_setzero_si256());
    return _mm256_or_si256(mag, _mm256_andnot_si256(zero, sign));
  }
}

// Codes of 32 values as 32 bytes in order (values are 0..255, so the saturating packs are exact).
static inline __m256i pack_codes(__m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
#endif

// Steps 3-4 of codec.py for one block with a nonzero finite scale s.
template <int F>
static inline void encode_block(const float* x, int64_t n, float s, uint8_t* out) {
  const float q = qmax_of(F);
  int64_t done = 0;
#if defined(__AVX2__)
  if constexpr (F != MOBILLM_FP4) {  // fp4 takes the scalar loop below (the compiler vectorizes it)
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-q), hi = _mm256_set1_ps(q);
  auto codes8 = [&](const float* p) {
    const __m256 y = _mm256_div_ps(_mm256_loadu_ps(p), vs);  // IEEE division
    return code_vec<F>(_mm256_min_ps(_mm256_max_ps(y, lo), hi));  // y is finite here
  };
  for (; done + 32 <= n; done += 32) {
    const float* p = x + done;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + done),
                        pack_codes(codes8(p), codes8(p + 8), codes8(p + 16), codes8(p + 24)));
  }
  }
#endif
  constexpr int64_t kChunk = 256;
  int32_t lanes[kChunk];
  for (int64_t base = done; base < n; base += kChunk) {
    const int64_t m = std::min(kChunk, n - base);
    for (int64_t i = 0; i < m; ++i) {
      float y = x[base + i] / s;  // IEEE division, as numpy: never a reciprocal
      y = y < -q ? -q : y;
      y = y > q ? q : y;
      lanes[i] = code_of<F>(y);
    }
    for (int64_t i = 0; i < m; ++i) out[base + i] = (uint8_t)lanes[i];
  }
}

static inline void pack_nibbles(const uint8_t* nib, int64_t hidden, uint8_t* out) {
  const int64_t pairs = hidden / 2;
  for (int64_t i = 0; i < pairs; ++i) out[i] = (uint8_t)(nib[2 * i] | (nib[2 * i + 1] << 4));
  if (hidden % 2) out[pairs] = nib[hidden - 1];  // odd row: the high nibble stays 0
}

template <int F, bool Half>
static void quantize_rows_t(const void* xv, int64_t hidden, int64_t bs, int64_t r0, int64_t r1, uint8_t* codes,
                            uint16_t* scales) {
  constexpr bool four_bit = F == MOBILLM_INT4 || F == MOBILLM_NF4 || F == MOBILLM_FP4;
  const int64_t nb = (hidden + bs - 1) / bs;
  const int64_t cb = mobillm_code_bytes(F, hidden);
  std::vector<float> widened(Half ? (size_t)std::min(bs, hidden) : 0);
  std::vector<uint8_t> nibbles(four_bit ? (size_t)hidden : 0);
  const float qmax = qmax_of(F);
  for (int64_t r = r0; r < r1; ++r) {
    uint8_t* row_codes = codes + r * cb;
    uint16_t* row_scales = scales + r * nb;
    uint8_t* dst = four_bit ? nibbles.data() : row_codes;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t start = b * bs;
      const int64_t n = std::min(bs, hidden - start);
      const float* x;
      if constexpr (Half) {
        widen_half(static_cast<const uint16_t*>(xv) + r * hidden + start, widened.data(), n);
        x = widened.data();
      } else {
        x = static_cast<const float*>(xv) + r * hidden + start;
      }
      const uint32_t m = absmax_bits(x, n);
      if (m >= 0x7f800000u) {
        row_scales[b] = kNanScale;
        std::fill(dst + start, dst + start + n, zero_code(F));
        continue;
      }
      float scale = float_of(m) / qmax;  // step 2: fp32 division, min with 65504, RNE to fp16
      scale = scale < 65504.0f ? scale : 65504.0f;
      const uint16_t h = half_bits(scale);
      row_scales[b] = h;
      const float s = float_of_half(h);
      if (s == 0.0f) {
        std::fill(dst + start, dst + start + n, zero_code(F));
      } else {
        encode_block<F>(x, n, s, dst + start);
      }
    }
    if constexpr (four_bit) pack_nibbles(nibbles.data(), hidden, row_codes);
  }
}

static void fp16_rows(const void* xv, bool half, int64_t hidden, int64_t r0, int64_t r1, uint16_t* codes) {
  for (int64_t r = r0; r < r1; ++r) {
    if (half) {
      saturate_half_bits(static_cast<const uint16_t*>(xv) + r * hidden, codes + r * hidden, hidden);
    } else {
      saturate_to_half(static_cast<const float*>(xv) + r * hidden, codes + r * hidden, hidden);
    }
  }
}

int quantize_rows(const void* x, int dtype, int64_t hidden, int fmt, int64_t bs, int64_t r0, int64_t r1, void* codes,
                  uint16_t* scales) {
  const bool half = dtype == MOBILLM_FLOAT16;
  uint8_t* c = static_cast<uint8_t*>(codes);
  switch (fmt * 2 + (half ? 1 : 0)) {
    case MOBILLM_INT8 * 2: quantize_rows_t<MOBILLM_INT8, false>(x, hidden, bs, r0, r1, c, scales); break;
    case MOBILLM_INT8 * 2 + 1: quantize_rows_t<MOBILLM_INT8, true>(x, hidden, bs, r0, r1, c, scales); break;
    case MOBILLM_FP8 * 2: quantize_rows_t<MOBILLM_FP8, false>(x, hidden, bs, r0, r1, c, scales); break;
    case MOBILLM_FP8 * 2 + 1: quantize_rows_t<MOBILLM_FP8, true>(x, hidden, bs, r0, r1, c, scales); break;
    case MOBILLM_INT4 * 2: quantize_rows_t<MOBILLM_INT4, false>(x, hidden, bs, r0, r1, c, scales); break;
    case MOBILLM_INT4 * 2 + 1: quantize_rows_t<MOBILLM_INT4, true>(x, hidden, bs, r0, r1, c, scales); break;
    case MOBILLM_NF4 * 2: quantize_rows_t<MOBILLM_NF4, false>(x, hidden, bs, r0, r1, c, scales); break;
    case MOBILLM_NF4 * 2 + 1: quantize_rows_t<MOBILLM_NF4, true>(x, hidden, bs, r0, r1, c, scales); break;
    case MOBILLM_FP4 * 2: quantize_rows_t<MOBILLM_FP4, false>(x, hidden, bs, r0, r1, c, scales); break;
    case MOBILLM_FP4 * 2 + 1: quantize_rows_t<MOBILLM_FP4, true>(x, hidden, bs, r0, r1, c, scales); break;
    case MOBILLM_FP16 * 2:
    case MOBILLM_FP16 * 2 + 1: fp16_rows(x, half, hidden, r0, r1, static_cast<uint16_t*>(codes)); break;
    default: return MOBILLM_BAD_FORMAT;
  }
  return MOBILLM_OK;
}

// fp32 value of each unpacked code (codec.code_values).
static void code_values(int fmt, float* table) {
  constexpr float nf4[16] = MOBILLM_NF4_TABLE;
  for (int c = 0; c < 256; ++c) {
    if (fmt == MOBILLM_INT8) {
      table[c] = (float)(int8_t)(uint8_t)c;
    } else if (fmt == MOBILLM_INT4) {
      table[c] = (float)((c & 15) - 8);
    } else if (fmt == MOBILLM_NF4) {
      table[c] = nf4[c & 15];
    } else if (fmt == MOBILLM_FP4) {
      table[c] = fp4_value((uint32_t)c & 15u);
    } else {  // E4M3FN; 0x7f and 0xff are NaN
      const int e = (c >> 3) & 15, m = c & 7;
      const float mag = e == 0 ? (float)m * 0x1p-9f : float_of((uint32_t)(e + 120) << 23 | (uint32_t)m << 20);
      table[c] = (c & 0x7f) == 0x7f ? float_of(0x7fc00000u) : (c & 0x80 ? -mag : mag);
    }
  }
}

int dequantize(const void* codes, const uint16_t* scales, int64_t rows, int64_t hidden, int fmt, int64_t bs,
               float* out) {
  if (fmt == MOBILLM_FP16) {
    for (int64_t r = 0; r < rows; ++r)
      widen_half(static_cast<const uint16_t*>(codes) + r * hidden, out + r * hidden, hidden);
    return MOBILLM_OK;
  }
  float table[256];
  code_values(fmt, table);
  const bool four_bit = fmt == MOBILLM_INT4 || fmt == MOBILLM_NF4 || fmt == MOBILLM_FP4;
  const int64_t nb = (hidden + bs - 1) / bs;
  const int64_t cb = mobillm_code_bytes(fmt, hidden);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* rc = static_cast<const uint8_t*>(codes) + r * cb;
    float* ro = out + r * hidden;
    for (int64_t b = 0; b < nb; ++b) {
      const float s = float_of_half(scales[r * nb + b]);
      const int64_t end = std::min(hidden, (b + 1) * bs);
      if (four_bit) {
        for (int64_t i = b * bs; i < end; ++i) ro[i] = table[(rc[i >> 1] >> ((i & 1) * 4)) & 15] * s;
      } else {
        for (int64_t i = b * bs; i < end; ++i) ro[i] = table[rc[i]] * s;
      }
    }
  }
  return MOBILLM_OK;
}

}  // namespace MOBILLM_ISA_NS
}  // namespace mobillm
