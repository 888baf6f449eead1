// CUDA block quantization, bit-identical to kernels/codec.py (and the CPU kernel).
//
// Rows made of whole blocks of 32, 64, 128 or 256 elements (the usual case) take the warp
// kernel: one warp per quant block, each lane holding bs/32 consecutive elements in registers.
// Any other shape takes the general row kernel: one thread block per row. Phase 1: each warp takes quant blocks of the row, reduces the
// absmax bits across its lanes with shuffles and writes the fp16 scale (NaN for a block with
// NaN/Inf). Phase 2: threads take V consecutive elements (one vector load, one store of their
// codes), divide by the block's scale with __fdiv_rn, clamp, and apply the format's rule;
// 4-bit codes pair up into bytes, low nibble first. The row is re-read from L1/L2, not DRAM.
// Exactness: __fdiv_rn (IEEE division), rintf (half to even), __float2half_rn for scales,
// and the integer rules of codec_rules.h for fp8 and the fp16 format's NaN bits.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdio.h>

#include <algorithm>
#include <string>

#include "../cpp/block_quant.h"
#include "../cpp/codec_rules.h"
#include "block_quant_cuda.h"

namespace {

using mobillm::bits_of;
using mobillm::float_of;

constexpr int kMaxThreads = 256;
constexpr int kMaxSharedScales = 16384;  // 32 KiB of fp16 scales; longer rows read them from global memory

thread_local std::string g_last_error;

__constant__ float kNf4Thresholds[15] = MOBILLM_NF4_THRESHOLDS;

int fail(const std::string& msg) {
  g_last_error = msg;
  return 1;
}

int check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return 0;
  return fail(std::string(what) + ": " + cudaGetErrorString(err));
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <int F>
__device__ __forceinline__ uint32_t zero_code() {
  return F == MOBILLM_INT4 ? 8u : F == MOBILLM_NF4 ? 7u : 0u;
}

// Step 4 for one scaled, clamped y. nf4_t: the 15 NF4 thresholds in shared memory.
template <int F>
__device__ __forceinline__ uint32_t code_of(float y, const float* nf4_t) {
  if constexpr (F == MOBILLM_INT8) {
    return (uint32_t)((int32_t)rintf(y) & 0xff);
  } else if constexpr (F == MOBILLM_INT4) {
    return (uint32_t)((int32_t)rintf(y) + 8);
  } else if constexpr (F == MOBILLM_NF4) {
    // Binary search over the sorted thresholds: the count of those strictly below y.
    uint32_t c = y > nf4_t[7] ? 8u : 0u;
    c += y > nf4_t[c + 3] ? 4u : 0u;
    c += y > nf4_t[c + 1] ? 2u : 0u;
    c += y > nf4_t[c] ? 1u : 0u;
    return c;
  } else if constexpr (F == MOBILLM_FP4) {
    return mobillm::fp4_code(y);  // codec_rules.h, shared with the CPU kernel
  } else {
    return mobillm::fp8_code(y);
  }
}

// A block's scale as the encoder needs it: fp32 value, or "zero codes" (scale 0 or NaN).
struct BlockScale {
  float s;
  bool zero;
};

__device__ __forceinline__ BlockScale block_scale(uint16_t h) {
  return {__half2float(__ushort_as_half(h)), (h & 0x7fffu) == 0 || (h & 0x7fffu) > 0x7c00u};
}

// Steps 3-4 for element value v in a block of scale bsc.
template <int F>
__device__ __forceinline__ uint32_t encode(float v, BlockScale bsc, const float* nf4_t) {
  if (bsc.zero) return zero_code<F>();
  const float q = mobillm::qmax_of(F);
  float y = __fdiv_rn(v, bsc.s);
  y = y < -q ? -q : y;
  y = y > q ? q : y;
  return code_of<F>(y, nf4_t);
}

// V consecutive elements of x starting at i (i % V == 0, V-aligned rows), as floats.
template <int V, typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ x, int i, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_float(x[i]);
  } else if constexpr (sizeof(T) == 4 && V % 4 == 0) {
#pragma unroll
    for (int k = 0; k < V; k += 4) {
      const float4 f = *reinterpret_cast<const float4*>(x + i + k);
      out[k] = f.x, out[k + 1] = f.y, out[k + 2] = f.z, out[k + 3] = f.w;
    }
  } else if constexpr (sizeof(T) == 2 && V % 4 == 0) {
#pragma unroll
    for (int k = 0; k < V; k += 4) {
      const uint2 u = *reinterpret_cast<const uint2*>(x + i + k);
      const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
      const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
      out[k] = a.x, out[k + 1] = a.y, out[k + 2] = b.x, out[k + 3] = b.y;
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = to_float(x[i + k]);
  }
}

template <int F, int V, typename T>
__global__ void __launch_bounds__(kMaxThreads) quantize_rows_kernel(const T* __restrict__ x, int hidden, int bs,
                                                                   int nb, int cb, uint8_t* __restrict__ codes,
                                                                   uint16_t* __restrict__ scales, bool shared_scales) {
  extern __shared__ uint16_t s_scales[];
  __shared__ float s_nf4[15];
  constexpr bool four_bit = F == MOBILLM_INT4 || F == MOBILLM_NF4 || F == MOBILLM_FP4;
  const int64_t row = blockIdx.x;
  const T* __restrict__ xr = x + row * hidden;
  uint16_t* __restrict__ sr = scales + row * nb;
  uint8_t* __restrict__ cr = codes + row * cb;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if constexpr (F == MOBILLM_NF4) {
    if (threadIdx.x < 15) s_nf4[threadIdx.x] = kNf4Thresholds[threadIdx.x];
  }

  // Phase 1: a warp per quant block; absmax as fp32 bits (>= 0x7f800000: NaN or Inf inside).
  for (int b = warp; b < nb; b += nwarps) {
    const int start = b * bs, end = min(hidden, start + bs);
    uint32_t m = 0;
    for (int i = start + lane; i < end; i += 32) m = max(m, __float_as_uint(to_float(xr[i])) & 0x7fffffffu);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (lane == 0) {
      uint16_t h = 0x7e00;  // np.float16(np.nan)
      if (m < 0x7f800000u) {
        const float s = fminf(__fdiv_rn(__uint_as_float(m), mobillm::qmax_of(F)), 65504.0f);
        h = __half_as_ushort(__float2half_rn(s));
      }
      sr[b] = h;
      if (shared_scales) s_scales[b] = h;
    }
  }
  __syncthreads();  // also makes this block's global scale writes visible to its threads
  const uint16_t* sc = shared_scales ? s_scales : sr;

  // Phase 2: V elements per thread, V-aligned; the ragged tail of a row goes one by one.
  // When bs % V == 0 the V elements share one quant block: one scale lookup per vector.
  const int full = hidden / V * V;
  const bool shared_block = bs % V == 0;
  for (int i = threadIdx.x * V; i < full; i += blockDim.x * V) {
    float v[V];
    load_vec<V>(xr, i, v);
    uint32_t c[V];
    if (shared_block) {
      const BlockScale s = block_scale(sc[i / bs]);
#pragma unroll
      for (int k = 0; k < V; ++k) c[k] = encode<F>(v[k], s, s_nf4);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) c[k] = encode<F>(v[k], block_scale(sc[(i + k) / bs]), s_nf4);
    }
    if constexpr (four_bit) {
      if constexpr (V == 8) {
        uint32_t word = 0;
#pragma unroll
        for (int k = 0; k < 8; k += 2) word |= (c[k] | (c[k + 1] << 4)) << (k * 4);
        *reinterpret_cast<uint32_t*>(cr + i / 2) = word;
      } else {
#pragma unroll
        for (int k = 0; k < V; k += 2) cr[(i + k) / 2] = (uint8_t)(c[k] | (c[k + 1] << 4));
      }
    } else {
      if constexpr (V == 4) {
        *reinterpret_cast<uint32_t*>(cr + i) = c[0] | (c[1] << 8) | (c[2] << 16) | (c[3] << 24);
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) cr[i + k] = (uint8_t)c[k];
      }
    }
  }
  // Tail (hidden % V elements): 4-bit pairs by byte, the last byte of an odd row ends in 0.
  if constexpr (four_bit) {
    for (int j = full / 2 + threadIdx.x; j < cb; j += blockDim.x) {
      const int i = 2 * j;
      const uint32_t lo = encode<F>(to_float(xr[i]), block_scale(sc[i / bs]), s_nf4);
      const uint32_t hi = i + 1 < hidden ? encode<F>(to_float(xr[i + 1]), block_scale(sc[(i + 1) / bs]), s_nf4) : 0u;
      cr[j] = (uint8_t)(lo | (hi << 4));
    }
  } else {
    for (int i = full + threadIdx.x; i < hidden; i += blockDim.x)
      cr[i] = (uint8_t)encode<F>(to_float(xr[i]), block_scale(sc[i / bs]), s_nf4);
  }
}

// E consecutive elements of one lane, as floats (one vector load where the width allows).
template <int E, typename T>
__device__ __forceinline__ void load_lane(const T* __restrict__ p, float (&v)[E]) {
  if constexpr (sizeof(T) == 4 && E == 2) {
    const float2 f = *reinterpret_cast<const float2*>(p);
    v[0] = f.x, v[1] = f.y;
  } else if constexpr (sizeof(T) == 2 && E == 2) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(p));
    v[0] = f.x, v[1] = f.y;
  } else if constexpr (E >= 4) {
    load_vec<E>(p, 0, v);
  } else {
    v[0] = to_float(p[0]);
  }
}

// Fast path for full blocks of bs = 32 * E elements (hidden % bs == 0): one warp per quant
// block, E consecutive elements per lane held in registers from load to store. The absmax is
// a shuffle reduction; every lane derives the same scale; no shared memory, no block barrier.
template <int F, int E, typename T>
__global__ void __launch_bounds__(kMaxThreads) quantize_blocks_warp_kernel(const T* __restrict__ x, int64_t n_blocks,
                                                                          uint8_t* __restrict__ codes,
                                                                          uint16_t* __restrict__ scales) {
  constexpr bool four_bit = F == MOBILLM_INT4 || F == MOBILLM_NF4 || F == MOBILLM_FP4;
  constexpr int bs = 32 * E;
  __shared__ float s_nf4[15];
  if constexpr (F == MOBILLM_NF4) {
    if (threadIdx.x < 15) s_nf4[threadIdx.x] = kNf4Thresholds[threadIdx.x];
    __syncthreads();
  }
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t q = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); q < n_blocks; q += warps) {
    const int64_t first = q * bs + lane * E;
    float v[E];
    load_lane<E>(x + first, v);
    uint32_t m = 0;
#pragma unroll
    for (int k = 0; k < E; ++k) m = max(m, __float_as_uint(v[k]) & 0x7fffffffu);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
    uint16_t h = 0x7e00;  // np.float16(np.nan)
    if (m < 0x7f800000u) {
      const float s = fminf(__fdiv_rn(__uint_as_float(m), mobillm::qmax_of(F)), 65504.0f);
      h = __half_as_ushort(__float2half_rn(s));
    }
    if (lane == 0) scales[q] = h;
    const BlockScale scale = block_scale(h);
    uint32_t c[E];
#pragma unroll
    for (int k = 0; k < E; ++k) c[k] = encode<F>(v[k], scale, s_nf4);
    if constexpr (four_bit) {
      if constexpr (E == 1) {
        const uint32_t hi = __shfl_down_sync(0xffffffffu, c[0], 1);
        if ((lane & 1) == 0) codes[first / 2] = (uint8_t)(c[0] | (hi << 4));
      } else {
        uint32_t word = 0;
#pragma unroll
        for (int k = 0; k < E; k += 2) word |= (c[k] | (c[k + 1] << 4)) << (k * 4);
        if constexpr (E == 2) codes[first / 2] = (uint8_t)word;
        if constexpr (E == 4) *reinterpret_cast<uint16_t*>(codes + first / 2) = (uint16_t)word;
        if constexpr (E == 8) *reinterpret_cast<uint32_t*>(codes + first / 2) = word;
      }
    } else {
      if constexpr (E == 1) codes[first] = (uint8_t)c[0];
      if constexpr (E == 2) *reinterpret_cast<uint16_t*>(codes + first) = (uint16_t)(c[0] | (c[1] << 8));
      if constexpr (E == 4) *reinterpret_cast<uint32_t*>(codes + first) = c[0] | (c[1] << 8) | (c[2] << 16) | (c[3] << 24);
      if constexpr (E == 8) {
        *reinterpret_cast<uint2*>(codes + first) =
            make_uint2(c[0] | (c[1] << 8) | (c[2] << 16) | (c[3] << 24), c[4] | (c[5] << 8) | (c[6] << 16) | (c[7] << 24));
      }
    }
  }
}

// The fp16 format: clip to +-65504 (NaN stays NaN), round to fp16; grid-stride elementwise.
__global__ void saturate_to_half_kernel(const float* __restrict__ x, int64_t n, uint16_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    // nvcc may turn a compare-and-select clamp into min/max, which drop NaN: pick NaN explicitly.
    const float v = x[i];
    const float clamped = fminf(fmaxf(v, -65504.0f), 65504.0f);
    out[i] = mobillm::half_bits(isnan(v) ? v : clamped);  // codec's NaN bits; __float2half_rn canonicalizes
  }
}

__global__ void saturate_half_bits_kernel(const uint16_t* __restrict__ x, int64_t n, uint16_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const uint16_t h = x[i];
    const uint16_t a = h & 0x7fff;
    out[i] = a == 0x7c00 ? (uint16_t)((h & 0x8000) | 0x7bff) : a > 0x7c00 ? (uint16_t)(h | 0x0200) : h;
  }
}

template <int F, typename T>
cudaError_t launch_rows(const T* x, int64_t rows, int hidden, int bs, uint8_t* codes, uint16_t* scales,
                        cudaStream_t stream) {
  constexpr bool four_bit = F == MOBILLM_INT4 || F == MOBILLM_NF4 || F == MOBILLM_FP4;
  const int nb = (hidden + bs - 1) / bs;
  const int cb = four_bit ? (hidden + 1) / 2 : hidden;
  if (hidden % bs == 0 && (bs == 32 || bs == 64 || bs == 128 || bs == 256)) {
    // Full blocks of a warp's size: the register-resident warp kernel, a grid-stride loop.
    const int64_t n_blocks = rows * nb;
    int device = 0, sms = 132;
    if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    const int64_t warps_per_block = kMaxThreads / 32;
    const unsigned grid = (unsigned)std::min<int64_t>((n_blocks + warps_per_block - 1) / warps_per_block, (int64_t)sms * 16);
    switch (bs) {
      case 32: quantize_blocks_warp_kernel<F, 1, T><<<grid, kMaxThreads, 0, stream>>>(x, n_blocks, codes, scales); break;
      case 64: quantize_blocks_warp_kernel<F, 2, T><<<grid, kMaxThreads, 0, stream>>>(x, n_blocks, codes, scales); break;
      case 128: quantize_blocks_warp_kernel<F, 4, T><<<grid, kMaxThreads, 0, stream>>>(x, n_blocks, codes, scales); break;
      default: quantize_blocks_warp_kernel<F, 8, T><<<grid, kMaxThreads, 0, stream>>>(x, n_blocks, codes, scales); break;
    }
    return cudaGetLastError();
  }
  // Vector width: V-aligned rows only (row starts stay aligned for loads and stores).
  const int v = four_bit ? (hidden % 8 == 0 ? 8 : 2) : (hidden % 4 == 0 ? 4 : 1);
  const int units = (hidden + v - 1) / v;
  const int threads = units >= kMaxThreads ? kMaxThreads : ((units + 31) / 32) * 32;
  const bool shared = nb <= kMaxSharedScales;
  const size_t smem = shared ? (size_t)nb * sizeof(uint16_t) : 0;
  const dim3 grid((unsigned)rows);
  switch (v) {
    case 8: quantize_rows_kernel<F, 8, T><<<grid, threads, smem, stream>>>(x, hidden, bs, nb, cb, codes, scales, shared); break;
    case 4: quantize_rows_kernel<F, 4, T><<<grid, threads, smem, stream>>>(x, hidden, bs, nb, cb, codes, scales, shared); break;
    case 2: quantize_rows_kernel<F, 2, T><<<grid, threads, smem, stream>>>(x, hidden, bs, nb, cb, codes, scales, shared); break;
    default: quantize_rows_kernel<F, 1, T><<<grid, threads, smem, stream>>>(x, hidden, bs, nb, cb, codes, scales, shared); break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_format(int fmt, const T* x, int64_t rows, int hidden, int bs, uint8_t* codes, uint16_t* scales,
                          cudaStream_t stream) {
  switch (fmt) {
    case MOBILLM_INT8: return launch_rows<MOBILLM_INT8>(x, rows, hidden, bs, codes, scales, stream);
    case MOBILLM_FP8: return launch_rows<MOBILLM_FP8>(x, rows, hidden, bs, codes, scales, stream);
    case MOBILLM_INT4: return launch_rows<MOBILLM_INT4>(x, rows, hidden, bs, codes, scales, stream);
    case MOBILLM_FP4: return launch_rows<MOBILLM_FP4>(x, rows, hidden, bs, codes, scales, stream);
    default: return launch_rows<MOBILLM_NF4>(x, rows, hidden, bs, codes, scales, stream);
  }
}

size_t code_bytes_total(int fmt, int64_t rows, int64_t hidden) { return (size_t)(rows * mobillm_code_bytes(fmt, hidden)); }

size_t scale_bytes_total(int fmt, int64_t rows, int64_t hidden, int64_t bs) {
  return (size_t)(rows * mobillm_scales_per_row(fmt, hidden, bs)) * sizeof(uint16_t);
}

}  // namespace

extern "C" {

int mobillm_cuda_block_quantize(const void* x, int dtype, int64_t rows, int64_t hidden, int fmt, int64_t block_size,
                                void* codes, uint16_t* scales, void* stream_ptr) {
  if (fmt < MOBILLM_INT8 || fmt > MOBILLM_FP4) return fail("unknown format id " + std::to_string(fmt));
  if (dtype != MOBILLM_FLOAT32 && dtype != MOBILLM_FLOAT16) return fail("x must be float32 or float16");
  if (hidden < 1 || hidden > INT32_MAX / 2 || block_size < 1) return fail("bad hidden size or block_size");
  if (rows == 0) return 0;
  if (rows < 0 || rows > INT32_MAX) return fail("rows out of range");
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  cudaError_t err;
  if (fmt == MOBILLM_FP16) {
    const int64_t n = rows * hidden;
    const int threads = 256;
    const unsigned blocks = (unsigned)std::min<int64_t>((n + threads - 1) / threads, 1 << 16);
    if (dtype == MOBILLM_FLOAT16) {
      saturate_half_bits_kernel<<<blocks, threads, 0, stream>>>(static_cast<const uint16_t*>(x), n,
                                                                static_cast<uint16_t*>(codes));
    } else {
      saturate_to_half_kernel<<<blocks, threads, 0, stream>>>(static_cast<const float*>(x), n,
                                                              static_cast<uint16_t*>(codes));
    }
    err = cudaGetLastError();
  } else {
    const int bs = (int)std::min<int64_t>(block_size, hidden);  // one block per row beyond that
    uint8_t* c = static_cast<uint8_t*>(codes);
    if (dtype == MOBILLM_FLOAT16) {
      err = launch_format(fmt, static_cast<const __half*>(x), rows, (int)hidden, bs, c, scales, stream);
    } else {
      err = launch_format(fmt, static_cast<const float*>(x), rows, (int)hidden, bs, c, scales, stream);
    }
  }
  return check(err, "kernel launch");
}

int mobillm_cuda_block_quantize_host(const void* x, int dtype, int64_t rows, int64_t hidden, int fmt,
                                     int64_t block_size, void* codes, uint16_t* scales) {
  const size_t xb = (size_t)(rows * hidden) * (dtype == MOBILLM_FLOAT16 ? 2 : 4);
  const size_t cbytes = code_bytes_total(fmt, rows, hidden), sbytes = scale_bytes_total(fmt, rows, hidden, block_size);
  void *dx = nullptr, *dc = nullptr, *ds = nullptr;
  int rc = check(cudaMalloc(&dx, xb ? xb : 1), "cudaMalloc") || check(cudaMalloc(&dc, cbytes ? cbytes : 1), "cudaMalloc") ||
           check(cudaMalloc(&ds, sbytes ? sbytes : 1), "cudaMalloc") ||
           check(cudaMemcpy(dx, x, xb, cudaMemcpyHostToDevice), "copy in") ||
           mobillm_cuda_block_quantize(dx, dtype, rows, hidden, fmt, block_size, dc, static_cast<uint16_t*>(ds), nullptr) ||
           check(cudaDeviceSynchronize(), "kernel") || check(cudaMemcpy(codes, dc, cbytes, cudaMemcpyDeviceToHost), "copy out") ||
           (sbytes && check(cudaMemcpy(scales, ds, sbytes, cudaMemcpyDeviceToHost), "copy out"));
  cudaFree(dx);
  cudaFree(dc);
  cudaFree(ds);
  return rc;
}

int mobillm_cuda_bench(const void* x, int dtype, int64_t rows, int64_t hidden, int fmt, int64_t block_size, int iters,
                       float* ms_quantize, float* ms_memcpy) {
  const size_t xb = (size_t)(rows * hidden) * (dtype == MOBILLM_FLOAT16 ? 2 : 4);
  const size_t cbytes = code_bytes_total(fmt, rows, hidden), sbytes = scale_bytes_total(fmt, rows, hidden, block_size);
  void *dx = nullptr, *dx2 = nullptr, *dc = nullptr, *ds = nullptr;
  cudaEvent_t t0 = nullptr, t1 = nullptr;
  float ms = 0;
  int rc = check(cudaMalloc(&dx, xb), "cudaMalloc") || check(cudaMalloc(&dx2, xb), "cudaMalloc") ||
           check(cudaMalloc(&dc, cbytes ? cbytes : 1), "cudaMalloc") || check(cudaMalloc(&ds, sbytes ? sbytes : 1), "cudaMalloc") ||
           check(cudaMemcpy(dx, x, xb, cudaMemcpyHostToDevice), "copy in") || check(cudaEventCreate(&t0), "event") ||
           check(cudaEventCreate(&t1), "event");
  auto quantize = [&] {
    return mobillm_cuda_block_quantize(dx, dtype, rows, hidden, fmt, block_size, dc, static_cast<uint16_t*>(ds), nullptr);
  };
  for (int i = 0; !rc && i < 3; ++i) rc = quantize();
  rc = rc || check(cudaEventRecord(t0), "event");
  for (int i = 0; !rc && i < iters; ++i) rc = quantize();
  rc = rc || check(cudaEventRecord(t1), "event") || check(cudaEventSynchronize(t1), "kernel") ||
       check(cudaEventElapsedTime(&ms, t0, t1), "event");
  if (!rc) *ms_quantize = ms / iters;
  for (int i = 0; !rc && i < 3; ++i) rc = check(cudaMemcpyAsync(dx2, dx, xb, cudaMemcpyDeviceToDevice), "memcpy");
  rc = rc || check(cudaEventRecord(t0), "event");
  for (int i = 0; !rc && i < iters; ++i) rc = check(cudaMemcpyAsync(dx2, dx, xb, cudaMemcpyDeviceToDevice), "memcpy");
  rc = rc || check(cudaEventRecord(t1), "event") || check(cudaEventSynchronize(t1), "memcpy") ||
       check(cudaEventElapsedTime(&ms, t0, t1), "event");
  if (!rc) *ms_memcpy = ms / iters;
  if (t0) cudaEventDestroy(t0);
  if (t1) cudaEventDestroy(t1);
  cudaFree(dx);
  cudaFree(dx2);
  cudaFree(dc);
  cudaFree(ds);
  return rc;
}

const char* mobillm_cuda_device_name(void) {
  static thread_local cudaDeviceProp prop;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) return "";
  return prop.name;
}

const char* mobillm_cuda_last_error(void) { return g_last_error.c_str(); }

}  // extern "C"
