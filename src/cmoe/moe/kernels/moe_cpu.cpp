// The carved FFNs' forwards on the CPU. For the MoE FFN (cmoe.moe.module.MoEFFN), router, shared part and routed
// experts in a single call, in two forms; their arguments are described once, in cmoe.moe.kernels.MoEKernelArguments:
//
// moe_decode: a few tokens, float32 or bfloat16 weights. Decode at batch 1 is bound by memory bandwidth and
// per-operation overhead (a Python-level PyTorch op costs a few microseconds, the arithmetic of one expert
// about as much), so this does all of it in plain loops: its own matrix-vector products, threaded over
// weight rows with ATen's thread pool. At batch 1 they read weights about as fast as torch's linear does
// through BLAS (2 threads: 14 against 10 GB/s on one host; 29 against 32 in float32 and 26 against 25 in
// bfloat16 on another), and the step reads only the chosen experts, in one call. With bfloat16 weights on a
// processor with AMX its products run in tiles of 16 rows x 16 tokens, fast enough that the step beats the
// prefill below up to a few hundred token-expert pairs.
//
// moe_prefill: many tokens, float32 or bfloat16. The matrix products go to BLAS through ATen, one per
// expert on its tokens; routing, gathering each expert's tokens and adding its output back run in loops
// here, with no Python between them (SmolLM2 S1A1E8 at 2,048 tokens, 2 threads, interleaved with the dense
// FFN: 9.1-9.7 ms against 10.6-11.0 for the same operations driven from Python).
//
// Semantics are those of MoEFFN.torch_forward in cmoe/moe/module.py (the reference the tests compare against):
//   score_e = |act(g_e . x) * (u_e . x)|  (gated)   or   |act(u_e . x + b_e)|  (plain)   or   w_e . x + b_e  (linear)
//   p = softmax(score); chosen = top-k of p + selection_bias; gate = 1 + p * gate_scale
//   (linear with a threshold: of the chosen after the first, only those whose score reaches it)
//   out = shared(x) + sum over chosen of gate * expert(x) (+ down bias), the experts added in expert order
// Sums are float32. With float32 weights so is everything else. With bfloat16 weights both route in
// float32. The decode step's products take bfloat16 inputs, as a bfloat16 model holds them (the layer
// input and the hidden activations, rounded to nearest even), and are exact in float32; its activations
// and gates are float32, and the output is rounded to the input's dtype once, at the end. The prefill runs
// bfloat16 products and activations as PyTorch does, and adds the experts' outputs in float32, rounding
// once (as index_add_ does). A bfloat16 model reads half the bytes of a float32 one.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

enum Activation : int64_t { SILU = 0, GELU = 1, GELU_TANH = 2, RELU = 3 };

inline float activate(float v, int64_t act) {
  switch (act) {
    case SILU: return v / (1.0f + std::exp(-v));
    case GELU: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case GELU_TANH: return 0.5f * v * (1.0f + std::tanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default: return v > 0.0f ? v : 0.0f;
  }
}

inline float widen(float v) { return v; }
inline float widen(uint16_t bfloat16_bits) {
  const uint32_t bits = static_cast<uint32_t>(bfloat16_bits) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Dot products of R weight rows (`stride` apart) with one vector, each row in 16 lanes (two 8-float
// vectors). R rows at once share the vector's loads and give the processor 2R independent chains of
// multiply-adds, where one row gives 2, each waiting on the last: a 7B-shaped FFN at batch 1 went from 22-25
// to 29 GB/s of float32 weights read, and from 17 to 26 GB/s of bfloat16. A row's sum is the same whichever
// R computes it, so results do not depend on the thread count. Built twice where GCC can pick the AVX2 +
// FMA copy at load time; one function per weight type and R, since GCC does not clone templates.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && __GNUC__ >= 12
#define CMOE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CMOE_CLONES
#endif

// 8 floats in one vector register (GCC and Clang vector extensions; lowered to two SSE registers where
// AVX is missing). Loads go through memcpy: rows need not be 32-byte aligned.
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x8 load8(const uint16_t* p) {  // 8 bfloat16s, widened: each is the top half of a float32
  u16x8 bits;
  std::memcpy(&bits, p, sizeof bits);
  const u32x8 wide = __builtin_convertvector(bits, u32x8) << 16;
  f32x8 v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}

template <int R, typename W, typename X>
inline void row_dots(const W* __restrict w, int64_t stride, const X* __restrict x, int64_t n, float* out) {
  f32x8 low[R] = {}, high[R] = {};  // lanes 0-7 and 8-15 of each row's 16
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const f32x8 x_low = load8(x + i), x_high = load8(x + i + 8);
    for (int r = 0; r < R; ++r) {
      low[r] += load8(w + r * stride + i) * x_low;
      high[r] += load8(w + r * stride + i + 8) * x_high;
    }
  }
  for (int r = 0; r < R; ++r) {
    float sum = 0.0f;
    for (int j = 0; j < 8; ++j) sum += low[r][j];
    for (int j = 0; j < 8; ++j) sum += high[r][j];
    for (int64_t k = i; k < n; ++k) sum += widen(w[r * stride + k]) * widen(x[k]);
    out[r] = sum;
  }
}

constexpr int kRowsAtOnce = 4;
constexpr int kTokensAtOnce = 2;  // with 2 accumulators each, 4 x 2 pairs fill half the 32 vector registers

CMOE_CLONES void dots(const float* w, int64_t stride, const float* x, int64_t n, float* out) {
  row_dots<kRowsAtOnce>(w, stride, x, n, out);
}
CMOE_CLONES void dots(const uint16_t* w, int64_t stride, const uint16_t* x, int64_t n, float* out) {
  row_dots<kRowsAtOnce>(w, stride, x, n, out);
}
CMOE_CLONES float dot(const float* w, const float* x, int64_t n) {
  float out;
  row_dots<1>(w, 0, x, n, &out);
  return out;
}
CMOE_CLONES float dot(const uint16_t* w, const uint16_t* x, int64_t n) {
  float out;
  row_dots<1>(w, 0, x, n, &out);
  return out;
}
CMOE_CLONES float dot(const uint16_t* w, const float* x, int64_t n) {  // the router's: float32 inputs
  float out;
  row_dots<1>(w, 0, x, n, &out);
  return out;
}

// Dot products of R rows anywhere in memory (row[r]) with one vector: `row_dots` for rows without a common
// stride (a completing sparse layer's kept neurons, gate and up rows of each).
template <int R, typename W>
inline void gathered_row_dots(const W* const* row, const W* __restrict x, int64_t n, float* out) {
  f32x8 low[R] = {}, high[R] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const f32x8 x_low = load8(x + i), x_high = load8(x + i + 8);
    for (int r = 0; r < R; ++r) {
      low[r] += load8(row[r] + i) * x_low;
      high[r] += load8(row[r] + i + 8) * x_high;
    }
  }
  for (int r = 0; r < R; ++r) {
    float sum = 0.0f;
    for (int j = 0; j < 8; ++j) sum += low[r][j];
    for (int j = 0; j < 8; ++j) sum += high[r][j];
    for (int64_t k = i; k < n; ++k) sum += widen(row[r][k]) * widen(x[k]);
    out[r] = sum;
  }
}
CMOE_CLONES void gathered_dots(const float* const* row, const float* x, int64_t n, float* out) {
  gathered_row_dots<kRowsAtOnce>(row, x, n, out);
}
CMOE_CLONES void gathered_dots(const uint16_t* const* row, const uint16_t* x, int64_t n, float* out) {
  gathered_row_dots<kRowsAtOnce>(row, x, n, out);
}

// Row sums for the sparse preset's decode: acc[0..n) += sum over r of v[r] * w[idx[r] * stride + 0..n), four
// rows a pass (one load and store of acc per four rows). The order of the sums is fixed, so results do not
// depend on the thread count, which splits the columns.
template <typename W>
inline void add_rows(const W* __restrict w, int64_t stride, const int64_t* idx, const float* v, int64_t rows, int64_t n,
                     float* __restrict acc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const W *w0 = w + idx[r] * stride, *w1 = w + idx[r + 1] * stride, *w2 = w + idx[r + 2] * stride,
            *w3 = w + idx[r + 3] * stride;
    const float a0 = v[r], a1 = v[r + 1], a2 = v[r + 2], a3 = v[r + 3];
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
      f32x8 sum = load8(acc + c);
      sum += (a0 * load8(w0 + c) + a1 * load8(w1 + c)) + (a2 * load8(w2 + c) + a3 * load8(w3 + c));
      std::memcpy(acc + c, &sum, sizeof sum);
    }
    for (; c < n; ++c) acc[c] += (a0 * widen(w0[c]) + a1 * widen(w1[c])) + (a2 * widen(w2[c]) + a3 * widen(w3[c]));
  }
  for (; r < rows; ++r) {
    const W* w0 = w + idx[r] * stride;
    const float a0 = v[r];
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
      f32x8 sum = load8(acc + c) + a0 * load8(w0 + c);
      std::memcpy(acc + c, &sum, sizeof sum);
    }
    for (; c < n; ++c) acc[c] += a0 * widen(w0[c]);
  }
}

CMOE_CLONES void rows_into(const float* w, int64_t stride, const int64_t* idx, const float* v, int64_t rows, int64_t n,
                           float* acc) {
  add_rows(w, stride, idx, v, rows, n, acc);
}
CMOE_CLONES void rows_into(const uint16_t* w, int64_t stride, const int64_t* idx, const float* v, int64_t rows,
                           int64_t n, float* acc) {
  add_rows(w, stride, idx, v, rows, n, acc);
}

// A block of products: sums[t * R + r] = W[r] . x[t] for R weight rows (`stride` apart) and T tokens
// (`ldx` apart), each row `n` long.
template <typename W>
using Block = void (*)(const W* w, int64_t stride, const W* x, int64_t ldx, int64_t n, float* sums);

template <int R, int T, typename W>
void portable_block(const W* w, int64_t stride, const W* x, int64_t ldx, int64_t n, float* sums) {
  for (int t = 0; t < T; ++t) {
    if (R == kRowsAtOnce) dots(w, stride, x + t * ldx, n, sums + t * R);
    else sums[t * R] = dot(w, x + t * ldx, n);
  }
}

// With AVX-512 a block keeps its R x T sums in registers: each weight chunk is loaded once for T tokens
// and each input chunk once for R rows (float32 steps of several tokens: 9-22% faster than a token at a
// time in 8-lane vectors). bfloat16 weights take bfloat16 inputs, so every product is exact in float32
// (8-bit mantissas); where the processor has AVX512-BF16 (Cooper Lake, Sapphire Rapids and later; Zen 4)
// one instruction does 32 such multiply-adds into float32 sums, where widening to float32 and an FMA do 8
// in about three (SmolLM2 carved S1A1E8, all 30 layers' steps, bfloat16 at batch 8: 530 -> 260 us).
// A (row, token) pair's sum is built the same way in every block, so it does not depend on which block
// computes it, nor on the thread count.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && __GNUC__ >= 12  // the GCC it is tested with
#include <immintrin.h>
#define CMOE_AVX512 1

// Everything the blocks call is compiled for AVX-512 too: calling code built for plain SSE from inside
// them, while the upper halves of the vector registers are in use, made a first version 4-5x slower.
#define CMOE_AVX512_TARGET __attribute__((target("avx512f,avx512bf16")))

// The last n % lanes products, one by one, added to the block's sums; the same arithmetic in every block.
template <int R, int T, typename W>
CMOE_AVX512_TARGET void add_tails(const W* w, int64_t stride, const W* x, int64_t ldx, int64_t from, int64_t n, float* sums) {
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float sum = sums[t * R + r];
      for (int64_t k = from; k < n; ++k) sum = std::fma(widen(w[r * stride + k]), widen(x[t * ldx + k]), sum);
      sums[t * R + r] = sum;
    }
}

// One 512-bit step of multiply-adds into 16 float32 sums: 16 float32 products, or 32 bfloat16 ones
// (pairs into each sum). The attributes name AVX512-BF16 for both; the float32 code uses none of it.
struct Float32Lanes {
  using Vector = __m512;
  static constexpr int kLanes = 16;
  CMOE_AVX512_TARGET static Vector load(const float* p) { return _mm512_loadu_ps(p); }
  CMOE_AVX512_TARGET static __m512 add_products(__m512 sums, Vector a, Vector b) { return _mm512_fmadd_ps(a, b, sums); }
};
struct BFloat16Lanes {
  using Vector = __m512bh;
  static constexpr int kLanes = 32;
  CMOE_AVX512_TARGET static Vector load(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  CMOE_AVX512_TARGET static __m512 add_products(__m512 sums, Vector a, Vector b) { return _mm512_dpbf16_ps(sums, a, b); }
};

// Two accumulators per (row, token) pair, for alternate steps along the row: twice the independent chains
// of one, which a single token's block of 4 rows needs to keep the multiply-add units busy.
template <int R, int T, typename W>
CMOE_AVX512_TARGET void avx512_block(const W* w, int64_t stride, const W* x, int64_t ldx, int64_t n, float* sums) {
  using Lanes = typename std::conditional<std::is_same<W, float>::value, Float32Lanes, BFloat16Lanes>::type;
  constexpr int L = Lanes::kLanes;
  __m512 even[R][T], odd[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) even[r][t] = odd[r][t] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    typename Lanes::Vector w_even[R], w_odd[R];
    for (int r = 0; r < R; ++r) {
      w_even[r] = Lanes::load(w + r * stride + i);
      w_odd[r] = Lanes::load(w + r * stride + i + L);
    }
    for (int t = 0; t < T; ++t) {
      const typename Lanes::Vector x_even = Lanes::load(x + t * ldx + i), x_odd = Lanes::load(x + t * ldx + i + L);
      for (int r = 0; r < R; ++r) {
        even[r][t] = Lanes::add_products(even[r][t], w_even[r], x_even);
        odd[r][t] = Lanes::add_products(odd[r][t], w_odd[r], x_odd);
      }
    }
  }
  if (i + L <= n) {
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r)
        even[r][t] = Lanes::add_products(even[r][t], Lanes::load(w + r * stride + i), Lanes::load(x + t * ldx + i));
    i += L;
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) sums[t * R + r] = _mm512_reduce_add_ps(_mm512_add_ps(even[r][t], odd[r][t]));
  if (i < n) add_tails<R, T>(w, stride, x, ldx, i, n, sums);
}
#endif

#ifdef CMOE_AVX512
// The sparse decode's row sums (add_rows) in AVX-512: float32 rows 16 columns an instruction, four rows a
// pass; bfloat16 rows in pairs, each pair's columns interleaved so that one AVX512-BF16 instruction adds
// v0 * w0[c] + v1 * w1[c] for 16 columns (the values must already be bfloat16's: sparse_step rounds them).
CMOE_AVX512_TARGET void add_rows_avx512(const float* w, int64_t stride, const int64_t* idx, const float* v, int64_t rows,
                                        int64_t n, float* acc) {
  const int64_t whole = n - n % 16;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float *w0 = w + idx[r] * stride, *w1 = w + idx[r + 1] * stride, *w2 = w + idx[r + 2] * stride,
                *w3 = w + idx[r + 3] * stride;
    const __m512 a0 = _mm512_set1_ps(v[r]), a1 = _mm512_set1_ps(v[r + 1]), a2 = _mm512_set1_ps(v[r + 2]),
                 a3 = _mm512_set1_ps(v[r + 3]);
    for (int64_t c = 0; c < whole; c += 16) {
      __m512 sum = _mm512_fmadd_ps(a0, _mm512_loadu_ps(w0 + c), _mm512_loadu_ps(acc + c));
      sum = _mm512_fmadd_ps(a1, _mm512_loadu_ps(w1 + c), sum);
      sum = _mm512_fmadd_ps(a2, _mm512_loadu_ps(w2 + c), sum);
      _mm512_storeu_ps(acc + c, _mm512_fmadd_ps(a3, _mm512_loadu_ps(w3 + c), sum));
    }
    for (int64_t c = whole; c < n; ++c) acc[c] += v[r] * w0[c] + v[r + 1] * w1[c] + v[r + 2] * w2[c] + v[r + 3] * w3[c];
  }
  for (; r < rows; ++r) {
    const float* w0 = w + idx[r] * stride;
    const __m512 a0 = _mm512_set1_ps(v[r]);
    for (int64_t c = 0; c < whole; c += 16)
      _mm512_storeu_ps(acc + c, _mm512_fmadd_ps(a0, _mm512_loadu_ps(w0 + c), _mm512_loadu_ps(acc + c)));
    for (int64_t c = whole; c < n; ++c) acc[c] += v[r] * w0[c];
  }
}

CMOE_AVX512_TARGET void add_rows_avx512(const uint16_t* w, int64_t stride, const int64_t* idx, const float* v,
                                        int64_t rows, int64_t n, float* acc) {
  const int64_t whole = n - n % 16;
  // lane 2i takes column i of the first row, lane 2i + 1 column i of the second
  alignas(64) static const uint16_t interleave_order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                            8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i order = _mm512_load_si512(interleave_order);
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const uint16_t *w0 = w + idx[r] * stride, *w1 = w + idx[r + 1] * stride, *w2 = w + idx[r + 2] * stride,
                   *w3 = w + idx[r + 3] * stride;
    const uint32_t p01 = c10::BFloat16(v[r]).x | static_cast<uint32_t>(c10::BFloat16(v[r + 1]).x) << 16;
    const uint32_t p23 = c10::BFloat16(v[r + 2]).x | static_cast<uint32_t>(c10::BFloat16(v[r + 3]).x) << 16;
    const __m512bh a01 = (__m512bh)_mm512_set1_epi32(static_cast<int>(p01));
    const __m512bh a23 = (__m512bh)_mm512_set1_epi32(static_cast<int>(p23));
    for (int64_t c = 0; c < whole; c += 16) {
      const __m512i rows01 = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + c))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + c)), 1);
      const __m512i rows23 = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w2 + c))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w3 + c)), 1);
      __m512 sum = _mm512_dpbf16_ps(_mm512_loadu_ps(acc + c), a01, (__m512bh)_mm512_permutexvar_epi16(order, rows01));
      _mm512_storeu_ps(acc + c, _mm512_dpbf16_ps(sum, a23, (__m512bh)_mm512_permutexvar_epi16(order, rows23)));
    }
    for (int64_t c = whole; c < n; ++c)
      acc[c] += (v[r] * widen(w0[c]) + v[r + 1] * widen(w1[c])) + (v[r + 2] * widen(w2[c]) + v[r + 3] * widen(w3[c]));
  }
  for (; r < rows; ++r) {
    const uint16_t* w0 = w + idx[r] * stride;
    const __m512 a0 = _mm512_set1_ps(v[r]);
    for (int64_t c = 0; c < whole; c += 16) {
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + c));
      const __m512 row = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
      _mm512_storeu_ps(acc + c, _mm512_fmadd_ps(a0, row, _mm512_loadu_ps(acc + c)));
    }
    for (int64_t c = whole; c < n; ++c) acc[c] += v[r] * widen(w0[c]);
  }
}
#endif

bool avx512_allowed = true;  // use_avx512(false): the portable products, for tests

template <typename W>
bool has_avx512() {
#ifdef CMOE_AVX512
  // the blocks are compiled for AVX512-BF16, which lets GCC use AVX512-BW too: the float32 ones need it
  static const bool has = std::is_same<W, float>::value ? __builtin_cpu_supports("avx512bw")
                                                        : __builtin_cpu_supports("avx512bf16");
  return has && avx512_allowed;
#else
  return false;
#endif
}

// The block for R rows (kRowsAtOnce or 1) and T tokens (1 or 2) on this processor.
template <typename W>
Block<W> block_for(int rows, int tokens) {
  static const Block<W> portable[2][kTokensAtOnce] = {{portable_block<1, 1, W>, portable_block<1, 2, W>},
                                                       {portable_block<4, 1, W>, portable_block<4, 2, W>}};
  const int r = rows == kRowsAtOnce ? 1 : 0;
#ifdef CMOE_AVX512
  static const Block<W> wide[2][kTokensAtOnce] = {{avx512_block<1, 1, W>, avx512_block<1, 2, W>},
                                                   {avx512_block<4, 1, W>, avx512_block<4, 2, W>}};
  if (has_avx512<W>()) return wide[r][tokens - 1];
#endif
  return portable[r][tokens - 1];
}

// ---- AMX tiles: bfloat16 products of many tokens (Sapphire Rapids and later) ----------------------------
// One tile instruction multiplies 16 weight rows by 16 tokens, 32 bfloat16 products deep, into float32 sums:
// 8,192 multiply-adds where AVX512-BF16 does 32. The weights are the left operand as they lie (16 rows of 32
// values, `stride` apart); the tokens are the right one, packed beforehand so that each tile row holds the
// 16 tokens' values at two neighbouring columns (`pack_for_tiles`). A (row, token) sum is built the same way
// whatever else the tile holds, so it does not depend on the batch nor on the thread count.
constexpr int64_t kTile = 16;       // weight rows, and tokens, per tile
constexpr int64_t kTileDepth = 32;  // products along a row per tile instruction

constexpr int64_t tiles_for(int64_t n) { return (n + kTile - 1) / kTile; }  // tiles that hold n rows or tokens

#if defined(CMOE_AVX512) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define CMOE_AMX 1
#define CMOE_AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

bool amx_allowed = true;  // use_amx(false): the AVX-512 products, for tests and timing

bool has_amx() {
  static const bool has = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
    // Linux lends a process the tile registers only once it asks (ARCH_REQ_XCOMP_PERM for XTILEDATA)
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return has && amx_allowed;
}

// Every tile 16 rows of 64 bytes: weight rows of 32 bfloat16s, packed token pairs, float32 sums for 16 tokens.
// The configuration belongs to the thread, and other code (oneDNN) loads its own: each product loads ours.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

CMOE_AMX_TARGET void configure_tiles() {
  TileConfig config;
  for (int i = 0; i < 8; ++i) config.bytes_per_row[i] = 64, config.rows[i] = kTile;
  // not GCC 12's _tile_loadconfig: its asm tells the compiler it reads 8 bytes, so the rest went unwritten
  __asm__ volatile("ldtilecfg %0" : : "m"(config));
}

CMOE_AMX_TARGET void release_tiles() { _tile_release(); }

// Sums of 16 weight rows with C tiles of 16 packed tokens each (C <= 3: tiles 0-2 hold the sums, 3 the
// weights, loaded once for all C, 4-6 the tokens): out[c * 256 + row * 16 + token].
template <int C>
CMOE_AMX_TARGET void tile_sums(const uint16_t* w, int64_t stride, const uint16_t* packed, int64_t cols, float* out) {
  const int64_t chunk = cols * kTile;  // one token tile's packed values
  _tile_zero(0);
  if constexpr (C > 1) _tile_zero(1);
  if constexpr (C > 2) _tile_zero(2);
  for (int64_t k = 0; k < cols; k += kTileDepth) {
    _tile_loadd(3, w + k, stride * 2);
    const uint16_t* tokens = packed + k * kTile;
    _tile_loadd(4, tokens, 64);
    _tile_dpbf16ps(0, 3, 4);
    if constexpr (C > 1) {
      _tile_loadd(5, tokens + chunk, 64);
      _tile_dpbf16ps(1, 3, 5);
    }
    if constexpr (C > 2) {
      _tile_loadd(6, tokens + 2 * chunk, 64);
      _tile_dpbf16ps(2, 3, 6);
    }
  }
  _tile_stored(0, out, 64);
  if constexpr (C > 1) _tile_stored(1, out + kTile * kTile, 64);
  if constexpr (C > 2) _tile_stored(2, out + 2 * kTile * kTile, 64);
}
#else
bool has_amx() { return false; }
#endif

// x [tokens, cols] (rows ldx apart) as tiles take it: per tile of 16 tokens, per pair of columns, the 16
// tokens' two values side by side; zeros past the last token.
std::vector<uint16_t> pack_for_tiles(const uint16_t* x, int64_t ldx, int64_t tokens, int64_t cols) {
  std::vector<uint16_t> packed(tiles_for(tokens) * cols * kTile, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    uint16_t* to = packed.data() + (t / kTile) * cols * kTile + (t % kTile) * 2;
    const uint16_t* from = x + t * ldx;
    for (int64_t q = 0; q < cols / 2; ++q) {
      to[q * 2 * kTile] = from[2 * q];
      to[q * 2 * kTile + 1] = from[2 * q + 1];
    }
  }
  return packed;
}

constexpr int64_t kRowsPerTask = 32;

// One matrix times a few token vectors: y[t * ldy + r] = W[r] . x[t] for the rows r of W [rows, cols]
// and tokens t < tokens (x rows ldx apart). Each weight row is read once for all the tokens.
template <typename W>
struct Matvec {
  const W* weights;
  int64_t rows, cols;
  const W* x;  // inputs in the weights' dtype
  int64_t ldx, tokens;
  float* y;
  int64_t ldy;
  int64_t first;  // where its rows start in the row range that `run` splits across threads
  const uint16_t* packed = nullptr;  // bfloat16 inputs packed for AMX tiles, where they run this product

  void rows_between(int64_t begin, int64_t end) const {
    if (packed != nullptr) return tile_rows_between(begin, end);
    block_rows_between(begin, end);
  }

  void block_rows_between(int64_t begin, int64_t end) const {
    float sums[kRowsAtOnce * kTokensAtOnce];
    for (int64_t r = begin; r < end;) {
      const int R = end - r >= kRowsAtOnce ? kRowsAtOnce : 1;
      for (int64_t t = 0; t < tokens;) {
        const int T = static_cast<int>(std::min<int64_t>(kTokensAtOnce, tokens - t));
        block_for<W>(R, T)(weights + r * cols, cols, x + t * ldx, ldx, cols, sums);
        for (int q = 0; q < T; ++q)
          for (int p = 0; p < R; ++p) y[(t + q) * ldy + r + p] = sums[q * R + p];
        t += T;
      }
      r += R;
    }
  }

  // Tiles of 16 rows from the product's start: this thread takes those that start in [begin, end), so
  // which rows go through tiles does not depend on how the rows are split. The last rows short of a tile
  // go through the blocks.
  void tile_rows_between(int64_t begin, int64_t end) const {
#ifdef CMOE_AMX
    const int64_t from = tiles_for(begin) * kTile, to = std::min(tiles_for(end) * kTile, rows);
    const int64_t tiled_to = from + std::max<int64_t>(to - from, 0) / kTile * kTile;  // whole tiles end here
    const int64_t tiles = tiles_for(tokens);
    alignas(64) float out[3 * kTile * kTile];
    const auto* w = reinterpret_cast<const uint16_t*>(weights);
    if (from < tiled_to) configure_tiles();
    for (int64_t r = from; r < tiled_to; r += kTile) {
      for (int64_t c = 0; c < tiles; c += 3) {
        const int64_t at_once = std::min<int64_t>(3, tiles - c);
        const uint16_t* tokens_packed = packed + c * cols * kTile;
        if (at_once == 3) tile_sums<3>(w + r * cols, cols, tokens_packed, cols, out);
        else if (at_once == 2) tile_sums<2>(w + r * cols, cols, tokens_packed, cols, out);
        else tile_sums<1>(w + r * cols, cols, tokens_packed, cols, out);
        for (int64_t i = 0; i < at_once; ++i)
          for (int64_t n = 0; n < kTile && (c + i) * kTile + n < tokens; ++n)
            for (int64_t m = 0; m < kTile; ++m) y[((c + i) * kTile + n) * ldy + r + m] = out[i * kTile * kTile + m * kTile + n];
      }
    }
    if (from < tiled_to) release_tiles();
    if (tiled_to < to) block_rows_between(tiled_to, to);
#endif
  }
};

// Packs each product's inputs for AMX tiles where they apply (bfloat16, rows a whole number of tile depths
// long, a processor with AMX): the packed copies go to `storage`, which must outlive the products.
template <typename W>
void use_tiles(std::vector<Matvec<W>>& products, std::vector<std::vector<uint16_t>>& storage) {
  if constexpr (std::is_same<W, uint16_t>::value) {
    if (!has_amx()) return;
    for (Matvec<W>& p : products) {
      if (p.cols % kTileDepth != 0 || p.rows < kTile) continue;
      storage.push_back(pack_for_tiles(p.x, p.ldx, p.tokens, p.cols));
      p.packed = storage.back().data();
    }
  }
}

// Runs the products in one parallel region, its rows split across threads: one region per phase of the
// step rather than one per matrix, since each region costs a fork and a join (a decode step is ~100 us).
// Products laid end to end (`first` their offsets) split the sum of their rows; products with the same
// `first` (the down matrices, all `hidden` rows) split those rows, each thread running its share of each.
template <typename W>
void run(const std::vector<Matvec<W>>& products, int64_t total_rows) {
  at::parallel_for(0, total_rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (const Matvec<W>& p : products) {
      const int64_t low = std::max(begin, p.first), high = std::min(end, p.first + p.rows);
      if (low < high) p.rows_between(low - p.first, high - p.first);
    }
  });
}

// Every tensor the kernel reads is read through a raw pointer, so it must be contiguous. Weight matrices
// all have the dtype of the experts' weights (W: float, or uint16_t for bfloat16's bits).
template <typename W>
const W* matrix_data(const at::Tensor& t) {
  constexpr auto dtype = std::is_same<W, float>::value ? at::kFloat : at::kBFloat16;
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous(), "cmoe CPU kernel: expected contiguous weights of one dtype");
  return static_cast<const W*>(t.data_ptr());
}

// A small vector (bias, selection bias, gate scales) of either dtype, read as float.
struct Vector {
  const float* f = nullptr;
  const uint16_t* b = nullptr;
  float operator[](int64_t i) const { return f ? f[i] : widen(b[i]); }
  explicit operator bool() const { return f || b; }
};

Vector vector_of(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              "cmoe CPU kernel: expected a contiguous float32 or bfloat16 vector");
  Vector v;
  if (t.scalar_type() == at::kFloat) v.f = t.data_ptr<float>();
  else v.b = static_cast<const uint16_t*>(t.data_ptr());
  return v;
}

bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

Vector vector_or_empty(const c10::optional<at::Tensor>& t) { return present(t) ? vector_of(*t) : Vector{}; }

// In place on the projection [2W] (gated: act(gate) * up into the first W) or [W] (plain: act(up + bias),
// the bias read from bias[offset:]).
void hidden_inplace(float* projected, int64_t width, bool gated, int64_t act, const Vector& bias, int64_t offset = 0) {
  if (gated) {
    for (int64_t i = 0; i < width; ++i) projected[i] = activate(projected[i], act) * projected[width + i];
  } else {
    for (int64_t i = 0; i < width; ++i) projected[i] = activate(projected[i] + (bias ? bias[offset + i] : 0.0f), act);
  }
}

// float32 values in the weights' dtype: copied, or rounded to bfloat16 (to nearest even, as torch does)
inline void narrow(const float* from, int64_t n, float* to) { std::copy_n(from, n, to); }
inline void narrow(const float* from, int64_t n, uint16_t* to) {
  for (int64_t i = 0; i < n; ++i) to[i] = c10::BFloat16(from[i]).x;
}
template <typename W>
std::vector<W> narrowed(const float* from, int64_t n) {
  std::vector<W> to(n);
  narrow(from, n, to.data());
  return to;
}

// The router's arithmetic for one token, from its router projection [E] or [2E] (gate rows, then up rows).
struct RouterMath {
  int64_t experts, top_k, act;
  bool gated, linear;
  float threshold;  // a linear router's: after the first, only experts scoring at least this (-inf: top_k always)
  Vector bias, selection, scale;
  bool gates_are_one;

  // Writes the token's top-k experts to chosen[0..k) and their gates to gates[0..k); `scores` is overwritten.
  // `prob`, `key` and `order` are scratch of E entries.
  void route(float* scores, int64_t* chosen, float* gates, float* prob, float* key, int64_t* order) const {
    if (linear) {
      if (bias)
        for (int64_t e = 0; e < experts; ++e) scores[e] += bias[e];
    } else {
      hidden_inplace(scores, experts, gated, act, bias);
      for (int64_t e = 0; e < experts; ++e) scores[e] = std::fabs(scores[e]);
    }
    float top = -INFINITY, total = 0.0f;
    for (int64_t e = 0; e < experts; ++e) top = std::max(top, scores[e]);
    for (int64_t e = 0; e < experts; ++e) total += (prob[e] = std::exp(scores[e] - top));
    for (int64_t e = 0; e < experts; ++e) key[e] = (prob[e] /= total) + selection[e];
    std::iota(order, order + experts, 0);
    std::partial_sort(order, order + top_k, order + experts,
                      [&](int64_t a, int64_t b) { return key[a] > key[b] || (key[a] == key[b] && a < b); });
    for (int64_t k = 0; k < top_k; ++k) {
      if (k > 0 && scores[order[k]] < threshold) {  // left out: `experts` marks an empty slot
        chosen[k] = experts;
        gates[k] = 0.0f;
        continue;
      }
      chosen[k] = order[k];
      gates[k] = gates_are_one ? 1.0f : 1.0f + prob[order[k]] * scale[order[k]];
    }
  }
};

// Each token's top-k experts, grouped by expert: expert e's (token, gate) slots are start[e] .. start[e + 1],
// its tokens in ascending order.
struct Routing {
  std::vector<int64_t> start, token;
  std::vector<float> gate;
};

// Groups the (token, expert) slots by expert: chosen[t * k + j] is token t's j-th expert, gate[...] its gate.
// A counting sort, stable, so each expert's tokens stay in ascending order.
Routing group_by_expert(const std::vector<int64_t>& chosen, const std::vector<float>& gate, int64_t top_k,
                        int64_t experts) {
  const int64_t slots = static_cast<int64_t>(chosen.size());
  Routing routing{std::vector<int64_t>(experts + 1, 0), std::vector<int64_t>(slots), std::vector<float>(slots)};
  for (int64_t e : chosen)
    if (e < experts) ++routing.start[e + 1];  // e == experts: a slot left empty
  for (int64_t e = 0; e < experts; ++e) routing.start[e + 1] += routing.start[e];
  routing.token.resize(routing.start[experts]);
  routing.gate.resize(routing.start[experts]);
  std::vector<int64_t> next(routing.start.begin(), routing.start.end() - 1);
  for (int64_t slot = 0; slot < slots; ++slot) {
    if (chosen[slot] >= experts) continue;
    const int64_t place = next[chosen[slot]]++;
    routing.token[place] = slot / top_k;
    routing.gate[place] = gate[slot];
  }
  return routing;
}

// ---- SiLU * up in AVX-512, for both kernels ----------------------------------------------------------

// SiLU(gate) * up (times the row's gate) in one pass over float32 or bfloat16 rows, with AVX-512, where
// ATen's silu and mul take two, and a third for the gates. SmolLM2 at 2,048 tokens: ATen's took about 1 ms
// of S3A3E8's 23 ms FFN in float32, and the one pass made it 0.3 ms faster (S1A1E8 0.1 ms); in bfloat16,
// 6.15-6.38 -> 5.75-5.89 ms (S3A3E8) and 3.56-3.87 -> 3.34-3.64 ms (S1A1E8).
// e^x as 2^n * e^r with n = round(x / ln 2) and |r| <= ln(2) / 2, e^r by a degree-7 polynomial (the Taylor
// series' coefficients; within 0.93 ulp of the exact e^x on [-87, 88]): silu(x) = x / (1 + e^-x), as ATen
// writes it. Inputs are clamped to where e^x is finite and nonzero in float32; NaN stays NaN through x.
#ifdef CMOE_AVX512
CMOE_AVX512_TARGET inline __m512 exp_avx512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-103.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln 2, with ln 2 in two parts so that n * (high part) is exact
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), r);
  static constexpr float kTaylor[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  __m512 p = _mm512_set1_ps(kTaylor[0]);
  for (int k = 1; k < 8; ++k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kTaylor[k]));
  return _mm512_scalef_ps(p, n);
}

// 16 values of a row as float32 lanes, and back: float32 as they are, bfloat16 widened, and rounded to
// nearest even on the way out (as torch rounds)
CMOE_AVX512_TARGET inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
CMOE_AVX512_TARGET inline __m512 load16(const uint16_t* p, __mmask16 mask) {
  const __m256i bits = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(static_cast<__mmask32>(mask), p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
CMOE_AVX512_TARGET inline void store16(float* p, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(p, mask, v); }
CMOE_AVX512_TARGET inline void store16(uint16_t* p, __mmask16 mask, __m512 v) {
  const __m256i bits = (__m256i)_mm512_cvtneps_pbh(v);
  _mm512_mask_storeu_epi16(p, static_cast<__mmask32>(mask), _mm512_castsi256_si512(bits));
}
CMOE_AVX512_TARGET inline __m512 bfloat16_rounded(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// T: float, or uint16_t holding bfloat16 bits. bfloat16 rounds where PyTorch's bfloat16 operations do:
// after SiLU, after the product with up, after the product with the gate (itself rounded first).
template <typename T>
CMOE_AVX512_TARGET void silu_times_up_avx512(const T* projected, int64_t ld, int64_t width, const float* gates,
                                             T* hidden, int64_t begin, int64_t end) {
  constexpr bool kRound = std::is_same<T, uint16_t>::value;
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = begin; i < end; ++i) {
    const T* gate = projected + i * ld;
    const T* up = gate + width;
    T* out = hidden + i * width;
    __m512 scale = _mm512_set1_ps(gates == nullptr ? 1.0f : gates[i]);
    if (kRound) scale = bfloat16_rounded(scale);
    for (int64_t j = 0; j < width; j += 16) {
      const __mmask16 mask = width - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (width - j)) - 1);
      const __m512 g = load16(gate + j, mask), u = load16(up + j, mask);
      __m512 h = _mm512_div_ps(g, _mm512_add_ps(one, exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      if (kRound) h = bfloat16_rounded(h);
      h = _mm512_mul_ps(h, u);
      if (gates != nullptr) {
        if (kRound) h = bfloat16_rounded(h);
        h = _mm512_mul_ps(h, scale);
      }
      store16(out + j, mask, h);
    }
  }
}
#endif

// Whether silu_times_up_avx512 applies to rows of T: gated SiLU, a processor with AVX-512 (AVX512-BF16 for
// bfloat16), not switched off.
template <typename T>
bool one_pass_silu(int64_t act, bool gated) {
  return act == SILU && gated && has_avx512<T>();
}

// A row's FFN hidden activation, in place on its projection as hidden_inplace, times `gate` unless it is null;
// gated SiLU in one AVX-512 pass where the processor has it (SmolLM2 S1A1E8 bfloat16, 128 tokens: the
// scalar exp took ~0.7 ms of a 1.5 ms step).
void ffn_hidden_inplace(float* h, int64_t width, bool gated, int64_t act, const Vector& bias, int64_t offset,
                        const float* gate) {
#ifdef CMOE_AVX512
  if (one_pass_silu<float>(act, gated)) return silu_times_up_avx512<float>(h, 0, width, gate, h, 0, 1);
#endif
  hidden_inplace(h, width, gated, act, bias, offset);
  if (gate != nullptr)
    for (int64_t j = 0; j < width; ++j) h[j] *= *gate;
}

// The step for weights of type W (float, or uint16_t holding bfloat16 bits), on float32 rows x [T, H]:
// route every token, then two parallel regions, one for all gate/up rows (the shared part's and the chosen
// experts') and one for all down rows.
template <typename W>
void decode_step(const at::Tensor& x, const c10::optional<at::Tensor>& shared_gate_up,
                 const c10::optional<at::Tensor>& shared_down, const Vector& shared_bias, const at::Tensor& router_weight,
                 const RouterMath& router, const at::Tensor& gate_up, const Vector& up_bias, const at::Tensor& down,
                 float* result) {
  const int64_t tokens = x.size(0), hidden = x.size(1), experts = down.size(0), width = down.size(2);
  const int64_t top_k = router.top_k, act = router.act;
  const bool gated = router.gated;
  const float* input = x.data_ptr<float>();
  const W* router_w = matrix_data<W>(router_weight);
  const W* experts_in = matrix_data<W>(gate_up);
  const W* experts_out = matrix_data<W>(down);
  const int64_t projected_width = gate_up.size(1);

  // router, token by token: each token's experts and their gates
  std::vector<float> scores(router_weight.size(0)), prob(experts), key(experts), chosen_gate(tokens * top_k);
  std::vector<int64_t> order(experts), chosen(tokens * top_k);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = input + t * hidden;
    for (int64_t r = 0; r < router_weight.size(0); ++r) scores[r] = dot(router_w + r * hidden, row, hidden);
    router.route(scores.data(), chosen.data() + t * top_k, chosen_gate.data() + t * top_k, prob.data(), key.data(),
                 order.data());
  }

  // each chosen expert's tokens, gathered in expert order, so that each expert's weights are read once per step
  const Routing routing = group_by_expert(chosen, chosen_gate, top_k, experts);
  const std::vector<int64_t>& start = routing.start;
  const int64_t pairs = start[experts];
  // the products' inputs in the weights' dtype (bfloat16: rounded, as a bfloat16 model holds them)
  const std::vector<W> input_w = narrowed<W>(input, tokens * hidden);
  std::vector<W> xs(pairs * hidden);
  for (int64_t i = 0; i < pairs; ++i)
    std::copy_n(input_w.data() + routing.token[i] * hidden, hidden, xs.data() + i * hidden);
  std::vector<float> hs(pairs * projected_width), ys(pairs * hidden);

  const bool has_shared = present(shared_gate_up);
  const int64_t shared_rows = has_shared ? shared_gate_up->size(0) : 0;
  const int64_t shared_width = has_shared ? shared_down->size(1) : 0;
  std::vector<float> shared_h(tokens * shared_rows);

  // phase 1: every gate/up row, the shared part's (all tokens at once) and each chosen expert's
  std::vector<Matvec<W>> products;
  int64_t rows = 0;
  if (has_shared) {
    products.push_back({matrix_data<W>(*shared_gate_up), shared_rows, hidden, input_w.data(), hidden, tokens, shared_h.data(),
                        shared_rows, rows});
    rows += shared_rows;
  }
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t n = start[e + 1] - start[e];
    if (n == 0) continue;
    products.push_back({experts_in + e * projected_width * hidden, projected_width, hidden,
                        xs.data() + start[e] * hidden, hidden, n, hs.data() + start[e] * projected_width,
                        projected_width, rows});
    rows += projected_width;
  }
  std::vector<std::vector<uint16_t>> packed;
  use_tiles(products, packed);
  run(products, rows);

  // the hidden activations, then narrowed to the weights' dtype as the down products' inputs
  std::vector<W> shared_in(tokens * shared_width), hidden_in(pairs * width);
  for (int64_t t = 0; t < tokens; ++t) {
    float* h = shared_h.data() + t * shared_rows;
    ffn_hidden_inplace(h, shared_width, gated, act, shared_bias, 0, nullptr);
    narrow(h, shared_width, shared_in.data() + t * shared_width);
  }
  for (int64_t e = 0; e < experts; ++e)
    for (int64_t i = start[e]; i < start[e + 1]; ++i) {
      float* h = hs.data() + i * projected_width;
      // the gate scales the expert's output; down is linear
      ffn_hidden_inplace(h, width, gated, act, up_bias, e * width, router.gates_are_one ? nullptr : &routing.gate[i]);
      narrow(h, width, hidden_in.data() + i * width);
    }

  // phase 2: every down row; the shared part writes the output, each expert its own rows of ys
  products.clear();
  if (has_shared)
    products.push_back({matrix_data<W>(*shared_down), hidden, shared_width, shared_in.data(), shared_width, tokens,
                        result, hidden, 0});
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t n = start[e + 1] - start[e];
    if (n == 0) continue;
    products.push_back({experts_out + e * hidden * width, hidden, width, hidden_in.data() + start[e] * width, width, n,
                        ys.data() + start[e] * hidden, hidden, 0});
  }
  use_tiles(products, packed);
  run(products, hidden);

  // experts in order, as the PyTorch path adds them
  for (int64_t e = 0; e < experts; ++e)
    for (int64_t i = start[e]; i < start[e + 1]; ++i) {
      float* out_row = result + routing.token[i] * hidden;
      const float* y = ys.data() + i * hidden;
      for (int64_t j = 0; j < hidden; ++j) out_row[j] += y[j];
    }
}

// ---- prefill: many tokens, float32 or bfloat16 -----------------------------------------------------------

// Whether silu_times_up applies: unit-stride float32 or bfloat16 rows that one_pass_silu takes.
bool fused_silu(const at::Tensor& projected, int64_t act, bool gated) {
  if (projected.stride(1) != 1) return false;
  if (projected.scalar_type() == at::kFloat) return one_pass_silu<float>(act, gated);
  return projected.scalar_type() == at::kBFloat16 && one_pass_silu<uint16_t>(act, gated);
}

template <typename T>
void silu_times_up_rows(const at::Tensor& projected, int64_t width, const float* gates, at::Tensor& hidden) {
#ifdef CMOE_AVX512
  const T* from = static_cast<const T*>(projected.data_ptr());
  T* to = static_cast<T*>(hidden.data_ptr());
  const int64_t ld = projected.stride(0);
  at::parallel_for(0, hidden.size(0), 16, [&](int64_t begin, int64_t end) {
    silu_times_up_avx512<T>(from, ld, width, gates, to, begin, end);
  });
#endif
}

void silu_times_up(const at::Tensor& projected, int64_t width, const float* gates, at::Tensor& hidden) {
  if (projected.scalar_type() == at::kFloat) silu_times_up_rows<float>(projected, width, gates, hidden);
  else silu_times_up_rows<uint16_t>(projected, width, gates, hidden);
}

Routing route_tokens(const at::Tensor& rows, const at::Tensor& router_weight, const RouterMath& router) {
  const int64_t tokens = rows.size(0), experts = router.experts, top_k = router.top_k;
  // [T, E or 2E] in float32, as the decode step computes it, whatever the weights' dtype
  const at::Tensor projected = at::mm(rows.to(at::kFloat), router_weight.to(at::kFloat).t());
  const int64_t score_width = projected.size(1);
  const float* all_scores = projected.data_ptr<float>();
  std::vector<int64_t> chosen(tokens * top_k);
  std::vector<float> chosen_gate(tokens * top_k);
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(score_width), prob(experts), key(experts);
    std::vector<int64_t> order(experts);
    for (int64_t t = begin; t < end; ++t) {
      std::copy_n(all_scores + t * score_width, score_width, scores.data());
      router.route(scores.data(), chosen.data() + t * top_k, chosen_gate.data() + t * top_k, prob.data(), key.data(),
                   order.data());
    }
  });
  return group_by_expert(chosen, chosen_gate, top_k, experts);
}

// hidden [n, W] = act(gate) * up from projected [n, 2W] (gated), or act(up + bias) from [n, W] (plain),
// then each row times its gate, unless `gates` is null (all 1). In one pass where silu_times_up applies,
// through ATen's vectorised activations (the same as the PyTorch path's) otherwise.
void hidden_rows(const at::Tensor& projected, int64_t width, int64_t act, bool gated, const at::Tensor& bias,
                 const float* gates, at::Tensor& hidden) {
  if (fused_silu(projected, act, gated)) return silu_times_up(projected, width, gates, hidden);
  at::Tensor pre = gated ? projected.narrow(1, 0, width) : projected;
  if (!gated && bias.defined()) pre = pre + bias;
  switch (act) {
    case SILU: at::silu_out(hidden, pre); break;
    case GELU: at::gelu_out(hidden, pre); break;
    case GELU_TANH: at::gelu_out(hidden, pre, "tanh"); break;
    default: at::clamp_min_out(hidden, pre, 0); break;
  }
  if (gated) hidden.mul_(projected.narrow(1, width, width));
  if (gates == nullptr) return;
  // the gate scales the expert's output; down is linear
  const at::Tensor column = at::from_blob(const_cast<float*>(gates), {hidden.size(0), 1}, at::kFloat);
  hidden.mul_(column.to(hidden.scalar_type()));
}

// The shared part, all tokens at once: [T, H].
at::Tensor shared_part(const at::Tensor& rows, const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& bias,
                       int64_t act, bool gated) {
  at::Tensor hidden = at::empty({rows.size(0), down.size(1)}, rows.options());
  hidden_rows(at::mm(rows, gate_up.t()), down.size(1), act, gated, bias, nullptr, hidden);
  return at::mm(hidden, down.t());
}

// Adds each routed expert's output on its tokens to `out` [T, H], one expert after another: gather its
// tokens, two products, add back. Buffers are sized for the busiest expert and reused, so that each
// expert's intermediates stay in the cache between its steps.
template <typename T>
void add_routed_experts(const at::Tensor& rows, const Routing& routing, const at::Tensor& gate_up,
                        const c10::optional<at::Tensor>& up_bias, const at::Tensor& down, const RouterMath& router,
                        at::Tensor& out) {
  const int64_t hidden = rows.size(1), experts = down.size(0), width = down.size(2);
  int64_t most = 0;
  for (int64_t e = 0; e < experts; ++e) most = std::max(most, routing.start[e + 1] - routing.start[e]);
  const auto buffer = [&](int64_t columns) { return at::empty({most, columns}, rows.options()); };
  at::Tensor gathered = buffer(hidden), projected = buffer(gate_up.size(1)), hidden_buffer = buffer(width);
  at::Tensor expert_out = buffer(hidden);
  const T* input = rows.data_ptr<T>();
  at::Tensor sums = out.scalar_type() == at::kFloat ? out : out.to(at::kFloat);  // bfloat16: rounded once, at the end
  float* result = sums.data_ptr<float>();
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = routing.start[e], n = routing.start[e + 1] - first;
    if (n == 0) continue;
    const int64_t* token = routing.token.data() + first;
    T* to = gathered.data_ptr<T>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) std::copy_n(input + token[i] * hidden, hidden, to + i * hidden);
    });
    at::Tensor p = projected.narrow(0, 0, n), h = hidden_buffer.narrow(0, 0, n), y = expert_out.narrow(0, 0, n);
    at::mm_out(p, gathered.narrow(0, 0, n), gate_up[e].t());
    const at::Tensor bias = present(up_bias) ? (*up_bias)[e] : at::Tensor();
    hidden_rows(p, width, router.act, router.gated, bias, router.gates_are_one ? nullptr : routing.gate.data() + first, h);
    at::mm_out(y, h, down[e].t());
    const T* from = y.data_ptr<T>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {  // an expert has each token once: no races
      for (int64_t i = begin; i < end; ++i) {
        float* out_row = result + token[i] * hidden;
        const T* y_row = from + i * hidden;
        for (int64_t j = 0; j < hidden; ++j) out_row[j] += static_cast<float>(y_row[j]);
      }
    });
  }
  if (!sums.is_same(out)) out.copy_(sums);
}

// The kernels read every tensor through raw pointers with sizes taken from the others, so before anything is
// read the shapes must agree with one another: a carved folder with an edited or damaged config must get an
// error here, never a read past the end of a tensor.
void check_shapes(const at::Tensor& x, const c10::optional<at::Tensor>& shared_gate_up,
                  const c10::optional<at::Tensor>& shared_down, const c10::optional<at::Tensor>& shared_bias,
                  const at::Tensor& router_weight, const c10::optional<at::Tensor>& router_bias,
                  const at::Tensor& selection_bias, const at::Tensor& gate_scale, const at::Tensor& gate_up,
                  const c10::optional<at::Tensor>& up_bias, const at::Tensor& down,
                  const c10::optional<at::Tensor>& down_bias, int64_t top_k, int64_t act, bool gated,
                  bool linear_router, double threshold) {
  const char* what = "cmoe CPU kernel: the MoE weights' shapes do not agree with one another";
  const int64_t rows_per_neuron = gated ? 2 : 1, router_rows = gated && !linear_router ? 2 : 1;
  TORCH_CHECK(linear_router || std::isinf(threshold), "cmoe CPU kernel: only a linear router takes a threshold");
  TORCH_CHECK(x.dim() == 2 && gate_up.dim() == 3 && down.dim() == 3 && router_weight.dim() == 2, what);
  const int64_t hidden = x.size(1), experts = gate_up.size(0), width = down.size(2);
  TORCH_CHECK(act >= 0 && act <= 3, "cmoe CPU kernel: unknown activation code");
  // no routed experts at all (a dense FFN run as the shared part) takes top_k 0
  TORCH_CHECK(experts == 0 ? top_k == 0 : top_k >= 1 && top_k <= experts,
              "cmoe CPU kernel: top_k must lie between 1 and the experts");
  TORCH_CHECK(down.size(0) == experts && router_weight.size(0) == router_rows * experts, what);
  if (experts > 0) {
    TORCH_CHECK(gate_up.size(1) == rows_per_neuron * width && gate_up.size(2) == hidden, what);
    TORCH_CHECK(down.size(1) == hidden && router_weight.size(1) == hidden, what);
  }
  TORCH_CHECK(selection_bias.numel() == experts && gate_scale.numel() == experts, what);
  TORCH_CHECK(!present(router_bias) || router_bias->numel() == experts, what);
  TORCH_CHECK(!present(up_bias) || (up_bias->dim() == 2 && up_bias->size(0) == experts && up_bias->size(1) == width), what);
  TORCH_CHECK(!present(down_bias) || down_bias->numel() == hidden, what);
  TORCH_CHECK(present(shared_gate_up) == present(shared_down), what);
  if (present(shared_gate_up)) {
    TORCH_CHECK(shared_gate_up->dim() == 2 && shared_down->dim() == 2, what);
    const int64_t shared = shared_down->size(1);
    TORCH_CHECK(shared_gate_up->size(0) == rows_per_neuron * shared && shared_gate_up->size(1) == hidden &&
                shared_down->size(0) == hidden, what);
    TORCH_CHECK(!present(shared_bias) || shared_bias->numel() == shared, what);
  }
}

RouterMath router_math(const at::Tensor& router_weight, const c10::optional<at::Tensor>& router_bias,
                       const at::Tensor& selection_bias, const at::Tensor& gate_scale, bool gates_are_one, int64_t top_k,
                       int64_t act, bool gated, bool linear_router, double threshold) {
  const int64_t experts = gated && !linear_router ? router_weight.size(0) / 2 : router_weight.size(0);
  return RouterMath{experts, top_k, act, gated, linear_router, static_cast<float>(threshold), vector_or_empty(router_bias),
                    vector_of(selection_bias),
                    vector_of(gate_scale), gates_are_one};
}

}  // namespace

// x [T, H] -> [T, H]: input and weights all float32 or all bfloat16; the arguments as moe_decode's.
at::Tensor moe_prefill(const at::Tensor& x, const c10::optional<at::Tensor>& shared_gate_up,
                       const c10::optional<at::Tensor>& shared_down, const c10::optional<at::Tensor>& shared_bias,
                       const at::Tensor& router_weight, const c10::optional<at::Tensor>& router_bias,
                       const at::Tensor& selection_bias, const at::Tensor& gate_scale, bool gates_are_one,
                       const at::Tensor& gate_up, const c10::optional<at::Tensor>& up_bias, const at::Tensor& down,
                       const c10::optional<at::Tensor>& down_bias, int64_t top_k, int64_t act, bool gated,
                       bool linear_router, double threshold) {
  check_shapes(x, shared_gate_up, shared_down, shared_bias, router_weight, router_bias, selection_bias, gate_scale,
               gate_up, up_bias, down, down_bias, top_k, act, gated, linear_router, threshold);
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const bool bfloat16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bfloat16 || x.scalar_type() == at::kFloat) && down.scalar_type() == x.scalar_type(),
              "cmoe prefill kernel: expected float32 or bfloat16 input and weights of the same dtype");
  const RouterMath router = router_math(router_weight, router_bias, selection_bias, gate_scale, gates_are_one, top_k,
                                        act, gated, linear_router, threshold);
  const at::Tensor rows = x.contiguous();
  at::Tensor out = present(shared_gate_up)
      ? shared_part(rows, *shared_gate_up, *shared_down, present(shared_bias) ? *shared_bias : at::Tensor(), act, gated)
      : at::zeros_like(rows);
  const auto add = bfloat16 ? &add_routed_experts<c10::BFloat16> : &add_routed_experts<float>;
  add(rows, route_tokens(rows, router_weight, router), gate_up, up_bias, down, router, out);
  if (present(down_bias)) out.add_(*down_bias);
  return out;
}

// x [T, H] -> [T, H], in x's dtype. Weight matrices are all float32 or all bfloat16; optional tensors are
// absent for FFNs without biases or without shared experts.
at::Tensor moe_decode(const at::Tensor& x, const c10::optional<at::Tensor>& shared_gate_up,
                      const c10::optional<at::Tensor>& shared_down, const c10::optional<at::Tensor>& shared_bias,
                      const at::Tensor& router_weight, const c10::optional<at::Tensor>& router_bias,
                      const at::Tensor& selection_bias, const at::Tensor& gate_scale, bool gates_are_one,
                      const at::Tensor& gate_up, const c10::optional<at::Tensor>& up_bias, const at::Tensor& down,
                      const c10::optional<at::Tensor>& down_bias, int64_t top_k, int64_t act, bool gated,
                      bool linear_router, double threshold) {
  check_shapes(x, shared_gate_up, shared_down, shared_bias, router_weight, router_bias, selection_bias, gate_scale,
               gate_up, up_bias, down, down_bias, top_k, act, gated, linear_router, threshold);
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // inference only: skip the autograd layer of each op
  const at::Tensor rows = x.to(at::kFloat).contiguous();
  at::Tensor out = present(shared_gate_up) ? at::empty_like(rows) : at::zeros_like(rows);
  const RouterMath router = router_math(router_weight, router_bias, selection_bias, gate_scale, gates_are_one, top_k,
                                        act, gated, linear_router, threshold);
  const auto step = down.scalar_type() == at::kBFloat16 ? &decode_step<uint16_t> : &decode_step<float>;
  step(rows, shared_gate_up, shared_down, vector_or_empty(shared_bias), router_weight, router, gate_up,
       vector_or_empty(up_bias), down, out.data_ptr<float>());
  if (present(down_bias)) out.add_(down_bias->to(at::kFloat));
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

namespace {

// v rounded to the weights' precision: itself for float32, to nearest bfloat16 for bfloat16.
template <typename W>
inline float as_weights(float v) {
  return std::is_same<W, float>::value ? v : widen(c10::BFloat16(v).x);
}

// acc [n] = sum over the kept rows of value * row, the columns split over the threads (64 at least each).
template <typename W>
void sum_rows(const W* w, int64_t n, const std::vector<int64_t>& idx, const std::vector<float>& val, float* acc) {
  std::fill_n(acc, n, 0.0f);
  const bool wide = has_avx512<W>();
  at::parallel_for(0, (n + 63) / 64, 4, [&](int64_t begin, int64_t end) {
    const int64_t from = begin * 64, to = std::min(n, end * 64), rows = static_cast<int64_t>(idx.size());
#ifdef CMOE_AVX512
    if (wide) return add_rows_avx512(w + from, n, idx.data(), val.data(), rows, to - from, acc + from);
#endif
    rows_into(w + from, n, idx.data(), val.data(), rows, to - from, acc + from);
  });
}

// The kept neurons' sums completed over the inputs the first pass skipped: projected[j] (and projected[width + j]
// in a gated FFN) += row j of `rows` [2I or I, H] . rest, rest holding x with the kept inputs zeroed.
template <typename W>
void complete_sums(const W* rows, const std::vector<int64_t>& neurons, const std::vector<W>& rest, int64_t width,
                   bool gated, float* projected) {
  const int64_t hidden = static_cast<int64_t>(rest.size()), count = static_cast<int64_t>(neurons.size());
  std::vector<int64_t> targets;  // the projections to complete: each neuron's gate (if gated) and up entries
  targets.reserve(2 * count);
  for (const int64_t j : neurons) {
    targets.push_back(j);
    if (gated) targets.push_back(width + j);
  }
  const int64_t total = static_cast<int64_t>(targets.size());
  at::parallel_for(0, (total + kRowsAtOnce - 1) / kRowsAtOnce, 8, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * kRowsAtOnce;
      if (first + kRowsAtOnce <= total) {
        const W* row[kRowsAtOnce];
        float sums[kRowsAtOnce];
        for (int r = 0; r < kRowsAtOnce; ++r) row[r] = rows + targets[first + r] * hidden;
        gathered_dots(row, rest.data(), hidden, sums);
        for (int r = 0; r < kRowsAtOnce; ++r) projected[targets[first + r]] += sums[r];
      } else {
        for (int64_t t = first; t < total; ++t) projected[targets[t]] += dot(rows + targets[t] * hidden, rest.data(), hidden);
      }
    }
  });
}

template <typename W>
void sparse_step(const at::Tensor& rows, const at::Tensor& gate_up, const Vector& up_bias, const at::Tensor& down,
                 const Vector& input_scale, float input_threshold, const Vector& hidden_scale, float hidden_threshold,
                 int64_t act, bool gated, const W* completion_rows, float* out) {
  const int64_t tokens = rows.size(0), hidden = rows.size(1), projected_width = gate_up.size(1), width = down.size(0);
  const W* gate_up_rows = matrix_data<W>(gate_up);
  const W* down_rows = matrix_data<W>(down);
  std::vector<float> projected(projected_width), predicted, values;
  std::vector<int64_t> kept;
  std::vector<W> rest(completion_rows ? hidden : 0);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* x = rows.data_ptr<float>() + t * hidden;
    kept.clear();
    values.clear();
    for (int64_t i = 0; i < hidden; ++i) {
      const bool keep = std::fabs(x[i]) * input_scale[i] >= input_threshold;
      if (keep) {
        kept.push_back(i);
        values.push_back(as_weights<W>(x[i]));
      }
      if (completion_rows) {  // x with the kept inputs zeroed, in the weights' dtype
        if (keep) rest[i] = W(0);
        else narrow(x + i, 1, &rest[i]);
      }
    }
    sum_rows(gate_up_rows, projected_width, kept, values, projected.data());
    if (completion_rows) {
      for (auto& v : projected) v = as_weights<W>(v);  // the partial sums as the masked forward holds them
      predicted = projected;
    }
    float* h = completion_rows ? predicted.data() : projected.data();
    hidden_inplace(h, width, gated, act, up_bias);
    kept.clear();
    for (int64_t j = 0; j < width; ++j) {
      if (std::fabs(as_weights<W>(h[j])) * hidden_scale[j] >= hidden_threshold) kept.push_back(j);
    }
    if (completion_rows) {
      complete_sums(completion_rows, kept, rest, width, gated, projected.data());
      for (const int64_t j : kept) {
        const float g = as_weights<W>(projected[j]);
        projected[j] = gated ? activate(g, act) * as_weights<W>(projected[width + j])
                             : activate(g + (up_bias ? up_bias[j] : 0.0f), act);
      }
    }
    values.clear();
    for (const int64_t j : kept) values.push_back(as_weights<W>(projected[j]));  // a bfloat16 model holds h in bfloat16
    sum_rows(down_rows, hidden, kept, values, out + t * hidden);
  }
}

}  // namespace

// sparse_decode: the sparse preset's FFN (cmoe.moe.sparse.SparseFFN, without its output bias) for a few tokens x [T, H]
// (arguments: cmoe.moe.kernels.SparseKernelArguments):
// gate_up [H, 2I] or [H, I] and down [I, H] hold one row per input channel and per neuron, float32 or bfloat16;
// a token reads the gate/up rows of the channels with |x_i| * input_scale_i >= input_threshold and the down rows
// of the neurons with |h_j| * hidden_scale_j >= hidden_threshold. Sums and activations in float32; the output
// in x's dtype.
at::Tensor sparse_decode(const at::Tensor& x, const at::Tensor& gate_up, const c10::optional<at::Tensor>& up_bias,
                         const at::Tensor& down, const at::Tensor& input_scale, double input_threshold,
                         const at::Tensor& hidden_scale, double hidden_threshold, int64_t act, bool gated,
                         const c10::optional<at::Tensor>& gate_up_rows) {
  TORCH_CHECK(x.dim() == 2 && gate_up.dim() == 2 && down.dim() == 2 && gate_up.size(0) == x.size(1) &&
                  down.size(1) == x.size(1) && gate_up.size(1) == down.size(0) * (gated ? 2 : 1) &&
                  input_scale.numel() == x.size(1) && hidden_scale.numel() == down.size(0) &&
                  gate_up.scalar_type() == down.scalar_type(),
              "cmoe sparse decode: the shapes of x, gate_up, down and the scales do not fit together");
  TORCH_CHECK(!present(gate_up_rows) || (gate_up_rows->dim() == 2 && gate_up_rows->size(0) == gate_up.size(1) &&
                                         gate_up_rows->size(1) == x.size(1)),
              "cmoe sparse decode: gate_up_rows must be gate_up transposed");
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const at::Tensor rows = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(rows);
  const Vector bias = vector_or_empty(up_bias), in_scale = vector_of(input_scale), out_scale = vector_of(hidden_scale);
  const float in_threshold = static_cast<float>(input_threshold), out_threshold = static_cast<float>(hidden_threshold);
  if (down.scalar_type() == at::kBFloat16) {
    sparse_step<uint16_t>(rows, gate_up, bias, down, in_scale, in_threshold, out_scale, out_threshold, act, gated,
                          present(gate_up_rows) ? matrix_data<uint16_t>(*gate_up_rows) : nullptr, out.data_ptr<float>());
  } else {
    sparse_step<float>(rows, gate_up, bias, down, in_scale, in_threshold, out_scale, out_threshold, act, gated,
                       present(gate_up_rows) ? matrix_data<float>(*gate_up_rows) : nullptr, out.data_ptr<float>());
  }
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

// Allows or forbids the AVX-512 products; returns whether bfloat16 steps now use them (AVX512-BF16).
bool use_avx512(bool allowed) {
  avx512_allowed = allowed;
  return has_avx512<uint16_t>();
}

// Allows or forbids the AMX tiles; returns whether bfloat16 steps now use them.
bool use_amx(bool allowed) {
#ifdef CMOE_AMX
  amx_allowed = allowed;
#endif
  return has_amx();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("moe_decode", &moe_decode, "MoE FFN forward for a few tokens on the CPU (float32 or bfloat16 weights)");
  m.def("moe_prefill", &moe_prefill, "MoE FFN forward for many tokens on the CPU (float32 or bfloat16)");
  m.def("sparse_decode", &sparse_decode, "the sparse preset's FFN for a few tokens on the CPU, reading only the rows kept");
  m.def("use_amx", &use_amx, "allow or forbid the AMX tiles; true if bfloat16 steps now use them");
  m.def("uses_amx", &has_amx, "whether bfloat16 steps use AMX tiles (the processor has them, and they are allowed)");
  m.def("use_avx512", &use_avx512, "allow or forbid the AVX-512 products; true if bfloat16 steps now use them");
}
