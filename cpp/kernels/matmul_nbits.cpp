// llmbuild CPU kernels: an ONNX Runtime custom-op library.
//
// ai.llmbuild::MatMulNBits takes the inputs and attributes of com.microsoft.MatMulNBits
// for the layouts llmbuild's CPU lowering writes (llmbuild/lowering/quantized.py): A float32
// [.., K], B uint8 [N, G, block·bits/8] (4 bits: low nibble first; 8 bits: one byte per
// code), scales float32 [N·G], no zero points (the implied 8 or 128), bits 4 with blocks of
// 32/64/128 or bits 8 with blocks of 32/64/128. It computes what MatMulNBits does at
// accuracy level 4: A quantized to int8 per block of `block_size` inputs (scale max|a|/127,
// round to nearest even), integer dot products per block (AVX-512 VNNI vpdpbusd), scaled
// and summed in float32.
//
// Why a kernel of our own: a decode step reads every weight once, and ONNX Runtime's MLAS
// kernel streams them at about 24 GB/s on this project's 2-core machine where the memory
// delivers 35-44. This one reads each column's codes in order, prefetches `kPrefetch` bytes
// ahead, and reads B and the scales in place (no packed copy): 1.16-1.54x MLAS on a SmolLM2
// decode step's MatMulNBits at one row (benchmarks/quantization/kernel_speed.py, RESULTS.md
// there, "llmbuild's CPU kernels"). With many rows (prefill) MLAS's tiled GEMM is the faster.
//
// Needs AVX-512 F/BW/VL and VNNI; RegisterCustomOps refuses (an error status, the session
// is not made) on a CPU without them, and llmbuild only loads the library where the CPU
// has them (llmbuild/runtime/kernels.py).

#include <onnxruntime_cxx_api.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

constexpr const char* kDomain = "ai.llmbuild";
#ifndef LLMBUILD_PREFETCH
#define LLMBUILD_PREFETCH 8192
#endif
#ifndef LLMBUILD_TASK_COLUMNS
#define LLMBUILD_TASK_COLUMNS 64
#endif
// Bytes ahead in the column stream, and columns per task of ONNX Runtime's pool: 8192 and 64
// streamed fastest of 2048-8192 and 16-64 (benchmarks/quantization/kernel_speed.py, 2026-12-03).
constexpr size_t kPrefetch = LLMBUILD_PREFETCH;
constexpr int64_t kColumnsPerTask = LLMBUILD_TASK_COLUMNS;
constexpr int64_t kRowTile = 4;

#define LLMBUILD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma,avx2")))

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512dq");
}

// Activations of M rows quantized for one node: per row G blocks of `block` int8 values
// (padded with zeros past K; for 4 bits each run of 64 inputs is reordered to its 32 even
// then 32 odd elements, the order of B's low and high nibbles), a float scale per block,
// and the zero-point correction per block as the 16 int32 lanes vpdpbusd fills: lane l of a
// 64-input run holds -zp · (sum of inputs 4l..4l+3 of that run in the reordered order).
struct QuantizedRows {
  std::vector<int8_t> q;       // [M, G·block]
  std::vector<float> scale;    // [M, G]
  std::vector<int32_t> corr;   // [M, G·block/4]: one lane per 4 inputs
};

// 16 inputs · inv, rounded to nearest even, as int8.
LLMBUILD_AVX512 inline __m128i codes(__m512 v, __m512 inv) {
  return _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)));
}

// The AVX-512 form of the rule above for one block of BLOCK inputs (x: BLOCK floats, zero
// padded past K by the caller).
template <int BLOCK, int BITS>
LLMBUILD_AVX512 void quantize_block(const float* x, int8_t* q, float* scale, int32_t* corr) {
  __m512 mx = _mm512_setzero_ps();
  for (int i = 0; i < BLOCK; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  const float amax = _mm512_reduce_max_ps(mx);
  *scale = amax / 127.f;
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  if constexpr (BITS == 8) {
    for (int i = 0; i < BLOCK; i += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), codes(_mm512_loadu_ps(x + i), inv));
  } else {
    // Each run of 64 inputs (32 for blocks of 32): its even elements, then its odd ones.
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    constexpr int run = BLOCK < 64 ? BLOCK : 64;
    for (int u = 0; u < BLOCK; u += run) {
      for (int h = 0; h < run / 32; ++h) {
        const __m512 lo = _mm512_loadu_ps(x + u + 32 * h), hi = _mm512_loadu_ps(x + u + 32 * h + 16);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + u + 16 * h), codes(_mm512_permutex2var_ps(lo, even, hi), inv));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + u + run / 2 + 16 * h), codes(_mm512_permutex2var_ps(lo, odd, hi), inv));
      }
    }
  }
  // corr lane = -zp · (sum of its 4 codes): vpdpbusd of the codes with unsigned ones.
  constexpr int shift = BITS == 4 ? 3 : 7;
  if constexpr (BLOCK == 32) {
    const __m256i sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1),
                                             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(corr), _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sums, shift)));
  } else {
    for (int i = 0; i < BLOCK; i += 64) {
      const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), _mm512_loadu_si512(q + i));
      _mm512_storeu_si512(corr + i / 4, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sums, shift)));
    }
  }
}

template <int BLOCK, int BITS>
void quantize_rows(const float* a, int64_t m, int64_t k, QuantizedRows& out) {
  const int64_t g = (k + BLOCK - 1) / BLOCK, width = g * BLOCK;
  out.q.resize(static_cast<size_t>(m * width));
  out.scale.resize(static_cast<size_t>(m * g));
  out.corr.resize(static_cast<size_t>(m * width / 4));
  float tail[BLOCK];
  for (int64_t r = 0; r < m; ++r) {
    const float* x = a + r * k;
    for (int64_t b = 0; b < g; ++b) {
      const float* xb = x + b * BLOCK;
      if ((b + 1) * BLOCK > k) {  // the short last block, zero padded
        std::fill(tail, tail + BLOCK, 0.f);
        std::copy(xb, x + k, tail);
        xb = tail;
      }
      quantize_block<BLOCK, BITS>(xb, out.q.data() + r * width + b * BLOCK, out.scale.data() + r * g + b,
                                  out.corr.data() + (r * width + b * BLOCK) / 4);
    }
  }
}

// One column's int32 block dot products (codes · activations + correction) for one row.
// 4 bits, 64 inputs: 32 bytes of codes → 64 unsigned nibbles (low ones first).
LLMBUILD_AVX512 inline __m512i dot64_q4(const uint8_t* w, const int8_t* a, const int32_t* corr, __m512i acc) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(x), _mm256_srli_epi16(x, 4), 1);
  v = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
  acc = _mm512_add_epi32(acc, _mm512_loadu_si512(corr));
  return _mm512_dpbusd_epi32(acc, v, _mm512_loadu_si512(a));
}

LLMBUILD_AVX512 inline __m512i dot64_q8(const uint8_t* w, const int8_t* a, const int32_t* corr, __m512i acc) {
  acc = _mm512_add_epi32(acc, _mm512_loadu_si512(corr));
  return _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(w), _mm512_loadu_si512(a));
}

// Two blocks of 32 at 4 bits (32 bytes) → their 64 nibbles in the activations' order: block
// b's low then high nibbles, then block b+1's.
LLMBUILD_AVX512 inline __m512i codes2x32_q4(const uint8_t* w) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(x), _mm256_srli_epi16(x, 4), 1);  // lo b, lo b+1, hi b, hi b+1
  return _mm512_and_si512(_mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(3, 1, 2, 0)), _mm512_set1_epi8(0x0F));
}

// 32 inputs (blocks of 32): 4 bits = 16 bytes → 32 nibbles; 8 bits = 32 bytes.
template <int BITS>
LLMBUILD_AVX512 inline __m256i dot32(const uint8_t* w, const int8_t* a, const int32_t* corr) {
  __m256i v;
  if constexpr (BITS == 4) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    v = _mm256_inserti128_si256(_mm256_castsi128_si256(x), _mm_srli_epi16(x, 4), 1);
    v = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
  } else {
    v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  }
  return _mm256_dpbusd_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr)), v,
                             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
}

struct Problem {
  const float* a_scale;   // [M, G]
  const int8_t* a;        // [M, G·block]
  const int32_t* corr;    // [M, G·block/4]
  const uint8_t* b;       // [N, G, block·bits/8]
  const float* scales;    // [N, G]
  float* y;               // [M, N]
  int64_t m, n, g;
};

// Columns n0..n1 for rows r0..r0+R-1; the rows' activations stay in L1 while each column's
// codes are read once per tile of rows.
template <int R, int BLOCK, int BITS>
LLMBUILD_AVX512 void columns(const Problem& p, int64_t n0, int64_t n1, int64_t r0) {
  constexpr int64_t block_bytes = BLOCK * BITS / 8;
  const int64_t width = p.g * BLOCK, col_bytes = p.g * block_bytes;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = p.b + n * col_bytes;
    const float* s = p.scales + n * p.g;
    for (int64_t off = 0; off < col_bytes; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + off), _MM_HINT_T0);
    __m512 acc[R];
    __m256 acc32[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), acc32[r] = _mm256_setzero_ps();
    int64_t b = 0;
    if constexpr (BLOCK == 32) {  // two blocks per 512-bit product, the lanes of each scaled by its own scale
      for (; b + 2 <= p.g; b += 2) {
        const uint8_t* wb = w + b * block_bytes;
        const __m512i v = BITS == 4 ? codes2x32_q4(wb) : _mm512_loadu_si512(wb);
        for (int r = 0; r < R; ++r) {
          const int64_t row = r0 + r;
          const float* sa = p.a_scale + row * p.g + b;
          const __m512i d = _mm512_dpbusd_epi32(_mm512_loadu_si512(p.corr + (row * width + b * BLOCK) / 4), v,
                                                _mm512_loadu_si512(p.a + row * width + b * BLOCK));
          const __m512 scale = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(s[b] * sa[0])),
                                                  _mm256_set1_ps(s[b + 1] * sa[1]), 1);
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc[r]);
        }
      }
    }
    for (; b < p.g; ++b) {
      const uint8_t* wb = w + b * block_bytes;
      for (int r = 0; r < R; ++r) {
        const int64_t row = r0 + r;
        const int8_t* a = p.a + row * width + b * BLOCK;
        const int32_t* c = p.corr + (row * width + b * BLOCK) / 4;
        const __m512 scale = _mm512_set1_ps(s[b] * p.a_scale[row * p.g + b]);
        if constexpr (BLOCK == 32) {  // an odd last block
          acc32[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32<BITS>(wb, a, c)), _mm512_castps512_ps256(scale), acc32[r]);
        } else {
          __m512i d = _mm512_setzero_si512();
          for (int u = 0; u < BLOCK; u += 64)
            d = BITS == 4 ? dot64_q4(wb + u / 2, a + u, c + u / 4, d) : dot64_q8(wb + u, a + u, c + u / 4, d);
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      float sum = _mm512_reduce_add_ps(acc[r]);
      if constexpr (BLOCK == 32) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc32[r]), _mm256_extractf128_ps(acc32[r], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        sum += _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
      }
      p.y[(r0 + r) * p.n + n] = sum;
    }
  }
}

template <int BLOCK, int BITS>
void rows_and_columns(const Problem& p, int64_t n0, int64_t n1) {
  int64_t r = 0;
  for (; r + kRowTile <= p.m; r += kRowTile) columns<kRowTile, BLOCK, BITS>(p, n0, n1, r);
  switch (p.m - r) {  // the last 1-3 rows as one tile: the columns are read once more, not 1-3 times
    case 3: columns<3, BLOCK, BITS>(p, n0, n1, r); break;
    case 2: columns<2, BLOCK, BITS>(p, n0, n1, r); break;
    case 1: columns<1, BLOCK, BITS>(p, n0, n1, r); break;
    default: break;
  }
}

// One task of ONNX Runtime's pool: kColumnsPerTask columns for every row.
template <int BLOCK, int BITS>
void task(void* data, size_t index) {
  const Problem& p = *static_cast<const Problem*>(data);
  const int64_t n0 = static_cast<int64_t>(index) * kColumnsPerTask, n1 = std::min(p.n, n0 + kColumnsPerTask);
  // The columns' loop prefetches kPrefetch bytes ahead of itself; the task's first bytes
  // are asked for here, before its first column is read.
  const int64_t col_bytes = p.g * BLOCK * BITS / 8;
  const uint8_t* first = p.b + n0 * col_bytes;
  const int64_t head = std::min<int64_t>(kPrefetch, (n1 - n0) * col_bytes);
  for (int64_t off = 0; off < head; off += 64) _mm_prefetch(reinterpret_cast<const char*>(first + off), _MM_HINT_T0);
  rows_and_columns<BLOCK, BITS>(p, n0, n1);
}

// A's rows quantized once, then the columns in tasks.
template <int BLOCK, int BITS>
void multiply(const Ort::KernelContext& ctx, const float* a, const uint8_t* b, const float* scales, float* y,
              int64_t m, int64_t n, int64_t k) {
  thread_local QuantizedRows rows;
  quantize_rows<BLOCK, BITS>(a, m, k, rows);
  Problem p{rows.scale.data(), rows.q.data(), rows.corr.data(), b, scales, y, m, n, (k + BLOCK - 1) / BLOCK};
  const size_t tasks = static_cast<size_t>((n + kColumnsPerTask - 1) / kColumnsPerTask);
  ctx.ParallelFor(task<BLOCK, BITS>, tasks, 0, &p);  // ONNX Runtime's pool takes the tasks as its threads free up
}

struct Kernel {
  Kernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    k_ = ki.GetAttribute<int64_t>("K");
    n_ = ki.GetAttribute<int64_t>("N");
    bits_ = static_cast<int>(ki.GetAttribute<int64_t>("bits"));
    block_ = ki.GetAttribute<int64_t>("block_size");
    if ((bits_ != 4 && bits_ != 8) || (block_ != 32 && block_ != 64 && block_ != 128))
      ORT_CXX_API_THROW("ai.llmbuild::MatMulNBits takes bits 4 or 8 and block_size 32, 64 or 128, got bits " +
                            std::to_string(bits_) + ", block_size " + std::to_string(block_),
                        ORT_INVALID_ARGUMENT);
    if (ki.GetInputCount() != 3)
      ORT_CXX_API_THROW("ai.llmbuild::MatMulNBits takes exactly A, B and scales (no zero points)",
                        ORT_INVALID_ARGUMENT);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto a = ctx.GetInput(0), b = ctx.GetInput(1), scales = ctx.GetInput(2);
    std::vector<int64_t> shape = a.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty() || shape.back() != k_)
      ORT_CXX_API_THROW("ai.llmbuild::MatMulNBits: A's last dimension is not K = " + std::to_string(k_),
                        ORT_INVALID_ARGUMENT);
    const int64_t g = (k_ + block_ - 1) / block_;
    if (b.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(n_ * g * block_ * bits_ / 8) ||
        scales.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(n_ * g))
      ORT_CXX_API_THROW("ai.llmbuild::MatMulNBits: B or scales do not match N, K and block_size",
                        ORT_INVALID_ARGUMENT);
    int64_t m = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) m *= shape[i];
    shape.back() = n_;
    auto y = ctx.GetOutput(0, shape);
    if (m == 0) return;
    const float* x = a.GetTensorData<float>();
    const uint8_t* codes = b.GetTensorData<uint8_t>();
    const float* s = scales.GetTensorData<float>();
    float* out = y.GetTensorMutableData<float>();
    switch (block_ * 10 + bits_) {  // the constructor admitted only these
      case 324: multiply<32, 4>(ctx, x, codes, s, out, m, n_, k_); break;
      case 644: multiply<64, 4>(ctx, x, codes, s, out, m, n_, k_); break;
      case 1284: multiply<128, 4>(ctx, x, codes, s, out, m, n_, k_); break;
      case 328: multiply<32, 8>(ctx, x, codes, s, out, m, n_, k_); break;
      case 648: multiply<64, 8>(ctx, x, codes, s, out, m, n_, k_); break;
      default: multiply<128, 8>(ctx, x, codes, s, out, m, n_, k_); break;
    }
  }

  int64_t k_, n_, block_;
  int bits_;
};

struct Op : Ort::CustomOpBase<Op, Kernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new Kernel(api, info); }
  const char* GetName() const { return "MatMulNBits"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

extern "C" {

// 1 when this CPU can run the kernels (AVX-512 F/BW/VL/DQ + VNNI), else 0.
__attribute__((visibility("default"))) int llmbuild_cpu_kernels_supported() { return cpu_supported() ? 1 : 0; }

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // an ONNX Runtime older than these headers: no way to report; its
                                       // session then fails on the unknown op
  Ort::InitApi(api);
  if (!cpu_supported())
    return api->CreateStatus(ORT_NOT_IMPLEMENTED,
                             "llmbuild CPU kernels need AVX-512 (F, BW, VL, DQ) and VNNI, which this CPU lacks");
  static Op op;
  static std::unique_ptr<Ort::CustomOpDomain> domain;
  try {
    if (!domain) {
      domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
      domain->Add(&op);
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}

}  // extern "C"
