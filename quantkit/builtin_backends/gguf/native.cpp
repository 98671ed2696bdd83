// Native CPU code on ggml's own block bytes, for x86 CPUs with AVX512-BF16: a Q6_K GEMV and the
// dequantizers of the legacy types and Q4_K, Q5_K, Q6_K.
//
// Q6_K GEMV. y[r, o] = sum_i x[r, i] * W[o, i] for up to 4 input rows, W in Q6_K super-blocks of 256 inputs
// (210 bytes: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 sub-block scales, float16 d),
// W = d * scale[i / 16] * (q - 32). The blocks are read as stored: 6.56 bits a weight, nothing
// repacked. Each code becomes a bfloat16 through a 64-entry table (exact: -32..31), and each
// float32 activation is split into two bfloat16 halves, hi + lo, which represent it to 2**-17
// relative; vdpbf16ps multiplies both halves with the codes (the products are exact in float32)
// and accumulates in float32, and the sum of each 16 inputs is scaled by d * scale once.
// Output rows are split over torch's intra-op threads. The activations a row reads must stay in
// L1: a weight more than TILE_BLOCKS super-blocks wide comes repacked by input tiles, all rows'
// first TILE_BLOCKS blocks, then all rows' next ones (the same bytes in another order), and each
// row is read tile by tile, sequentially within a tile.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

constexpr int64_t QK = 256;            // weights a super-block
constexpr int64_t BLOCK_BYTES = 210;   // bytes a super-block
constexpr int64_t TILE_BLOCKS = 8;     // super-blocks a tile: 2048 inputs, 8 KiB of hi + lo a row
constexpr int64_t MAX_ROWS = 4;

inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Activations split into bfloat16 halves, hi[i] + lo[i] ~ x[i] (n a multiple of 16).
void split(const float* x, int64_t n, uint16_t* hi, uint16_t* lo) {
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m256bh h = _mm512_cvtneps_pbh(v);
    const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
    _mm256_storeu_si256((__m256i*)(hi + i), (__m256i)h);
    _mm256_storeu_si256((__m256i*)(lo + i), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, back)));
  }
}

// 32 bfloat16 values first, first + 1, ...: codes to bfloat16 by a table look-up.
__m512i bf16_table(int first) {
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) {
    const float f = float(first + i);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    t[i] = uint16_t(u >> 16);
  }
  return _mm512_load_si512(t);
}

template <int R>
void rows(const uint8_t* w, int64_t begin, int64_t end, int64_t k, const uint16_t* hi, const uint16_t* lo, float* y,
          int64_t out) {
  const int64_t nb = k / QK;
  const __m512i low_table = bf16_table(-32), high_table = bf16_table(0);
  const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03);
  // Lanes 0-7 of a vdpbf16ps result sum inputs 0-15 of a 32-input run, lanes 8-15 inputs 16-31.
  __m512i pick[8];
  for (int p = 0; p < 8; ++p) pick[p] = _mm512_inserti64x4(_mm512_set1_epi32(2 * p), _mm256_set1_epi32(2 * p + 1), 1);
  for (int64_t t0 = 0; t0 < nb; t0 += TILE_BLOCKS) {
    const int64_t t1 = std::min(nb, t0 + TILE_BLOCKS);
    for (int64_t o = begin; o < end; ++o) {
      __m512 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t b = t0; b < t1; ++b) {
        const uint8_t* blk = w + (out * t0 + o * (t1 - t0) + b - t0) * BLOCK_BYTES;
        const __m512 scales = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 192)))),
                                            _mm512_set1_ps(half(blk + 208)));
        for (int h = 0; h < 2; ++h) {
          const uint8_t* ql = blk + 64 * h;
          const __m256i l0 = _mm256_loadu_si256((const __m256i*)ql);
          const __m256i l1 = _mm256_loadu_si256((const __m256i*)(ql + 32));
          const __m256i qh = _mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * h));
          const __m256i q[4] = {
              _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4)),
              _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4)),
              _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                              _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4)),
              _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                              _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4)),
          };
          for (int j = 0; j < 4; ++j) {
            const __m512bh codes = (__m512bh)_mm512_permutex2var_epi16(low_table, _mm512_cvtepu8_epi16(q[j]), high_table);
            const __m512 scale = _mm512_permutexvar_ps(pick[4 * h + j], scales);
            const int64_t at = b * QK + 128 * h + 32 * j;
            for (int r = 0; r < R; ++r) {
              __m512 s = _mm512_dpbf16_ps(_mm512_setzero_ps(), codes, (__m512bh)_mm512_loadu_si512(hi + r * k + at));
              s = _mm512_dpbf16_ps(s, codes, (__m512bh)_mm512_loadu_si512(lo + r * k + at));
              acc[r] = _mm512_fmadd_ps(s, scale, acc[r]);
            }
          }
        }
      }
      for (int r = 0; r < R; ++r) y[r * out + o] += _mm512_reduce_add_ps(acc[r]);
    }
  }
}

using Rows = void (*)(const uint8_t*, int64_t, int64_t, int64_t, const uint16_t*, const uint16_t*, float*, int64_t);

// x: (rows, k) float32, rows 1..4, k a multiple of 256; blocks: the out * k / 256 Q6_K blocks, by tiles.
torch::Tensor q6_k_gemv(const torch::Tensor& x, const torch::Tensor& blocks, int64_t out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous 2-d float32");
  const int64_t n_rows = x.size(0), k = x.size(1);
  TORCH_CHECK(n_rows >= 1 && n_rows <= MAX_ROWS, "x: 1 to 4 rows");
  TORCH_CHECK(k % QK == 0, "x: a multiple of 256 inputs");
  TORCH_CHECK(blocks.scalar_type() == torch::kUInt8 && blocks.is_contiguous() && blocks.numel() == out * k / QK * BLOCK_BYTES,
              "blocks: out * in / 256 Q6_K blocks of 210 bytes");
  std::vector<uint16_t> hi(n_rows * k), lo(n_rows * k);
  split(x.data_ptr<float>(), n_rows * k, hi.data(), lo.data());
  auto y = torch::zeros({n_rows, out}, x.options());
  static const Rows by_rows[MAX_ROWS] = {rows<1>, rows<2>, rows<3>, rows<4>};
  const Rows run = by_rows[n_rows - 1];
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) { run(w, begin, end, k, hi.data(), lo.data(), yp, out); });
  return y;
}

// Dequantizers: float32 weights from the blocks, bit for bit what quants.dequantize computes (the same
// float32 operations in the same order; built with -ffp-contract=off, so no product is fused into a
// sum), blocks split over torch's intra-op threads.

void q4_0_block(const uint8_t* b, float* y) {  // d * (q - 8), low nibbles first
  const float d = half(b);
  for (int i = 0; i < 16; ++i) {
    y[i] = d * float(int(b[2 + i] & 15) - 8);
    y[i + 16] = d * float(int(b[2 + i] >> 4) - 8);
  }
}

void q4_1_block(const uint8_t* b, float* y) {  // d * q + m
  const float d = half(b), m = half(b + 2);
  for (int i = 0; i < 16; ++i) {
    y[i] = d * float(b[4 + i] & 15) + m;
    y[i + 16] = d * float(b[4 + i] >> 4) + m;
  }
}

inline int bit4(const uint8_t* qh, int i) { return ((qh[i / 8] >> (i % 8)) & 1) << 4; }  // bit i of the mask, as 16

void q5_0_block(const uint8_t* b, float* y) {  // d * (q - 16)
  const float d = half(b);
  for (int i = 0; i < 16; ++i) {
    y[i] = d * float(((b[6 + i] & 15) | bit4(b + 2, i)) - 16);
    y[i + 16] = d * float(((b[6 + i] >> 4) | bit4(b + 2, i + 16)) - 16);
  }
}

void q5_1_block(const uint8_t* b, float* y) {  // d * q + m
  const float d = half(b), m = half(b + 2);
  for (int i = 0; i < 16; ++i) {
    y[i] = d * float((b[8 + i] & 15) | bit4(b + 4, i)) + m;
    y[i + 16] = d * float((b[8 + i] >> 4) | bit4(b + 4, i + 16)) + m;
  }
}

void q8_0_block(const uint8_t* b, float* y) {  // q * d
  const float d = half(b);
  for (int i = 0; i < 32; ++i) y[i] = float(int8_t(b[2 + i])) * d;
}

// Q4_K and Q5_K: per 32 weights (d * sc) * q - (dmin * m), the 6-bit scales and minimums packed in 12 bytes.
void k_scales(const uint8_t* b, float* sc, float* mn) {
  const float d = half(b), dmin = half(b + 2);
  const uint8_t* s = b + 4;
  for (int j = 0; j < 4; ++j) {
    sc[j] = d * float(s[j] & 63);
    mn[j] = dmin * float(s[j + 4] & 63);
    sc[j + 4] = d * float((s[j + 8] & 15) | ((s[j] >> 6) << 4));
    mn[j + 4] = dmin * float((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
  }
}

void q4_k_block(const uint8_t* b, float* y) {  // (d * sc) * q - (dmin * m) per 32 weights
  float sc[8], mn[8];
  k_scales(b, sc, mn);
  for (int c = 0; c < 4; ++c) {
    const uint8_t* q = b + 16 + 32 * c;
    for (int i = 0; i < 32; ++i) {
      y[64 * c + i] = sc[2 * c] * float(q[i] & 15) - mn[2 * c];
      y[64 * c + 32 + i] = sc[2 * c + 1] * float(q[i] >> 4) - mn[2 * c + 1];
    }
  }
}

void q5_k_block(const uint8_t* b, float* y) {  // low nibbles as Q4_K's, bit j of qh[l] the fifth bit of sub-block j
  float sc[8], mn[8];
  k_scales(b, sc, mn);
  const uint8_t* qh = b + 16;
  for (int j = 0; j < 8; ++j) {
    const uint8_t* q = b + 48 + 32 * (j / 2);
    for (int l = 0; l < 32; ++l) {
      const int code = ((q[l] >> (4 * (j % 2))) & 15) | (((qh[l] >> j) & 1) << 4);
      y[32 * j + l] = sc[j] * float(code) - mn[j];
    }
  }
}

void q6_k_block(const uint8_t* b, float* y) {  // (d * sc) * (q - 32) + 0 per 16 weights
  const float d = half(b + 208);
  float sc[16];
  for (int j = 0; j < 16; ++j) sc[j] = d * float(int8_t(b[192 + j]));
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = b + 64 * h;
    const uint8_t* qh = b + 128 + 32 * h;
    float* out = y + 128 * h;
    for (int l = 0; l < 32; ++l) {
      const int q[4] = {(ql[l] & 15) | ((qh[l] & 3) << 4), (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4),
                        (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4), (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)};
      for (int j = 0; j < 4; ++j) out[32 * j + l] = sc[8 * h + 2 * j + l / 16] * float(q[j] - 32) + 0.0f;
    }
  }
}

struct Type {
  int64_t weights, bytes;
  void (*block)(const uint8_t*, float*);
};

const std::pair<const char*, Type> TYPES[] = {
    {"Q4_0", {32, 18, q4_0_block}},   {"Q4_1", {32, 20, q4_1_block}},   {"Q5_0", {32, 22, q5_0_block}},
    {"Q5_1", {32, 24, q5_1_block}},   {"Q8_0", {32, 34, q8_0_block}},   {"Q4_K", {256, 144, q4_k_block}},
    {"Q5_K", {256, 176, q5_k_block}}, {"Q6_K", {256, 210, q6_k_block}}};

const Type& type_of(const std::string& name) {
  for (const auto& [key, type] : TYPES)
    if (name == key) return type;
  TORCH_CHECK(false, "no native dequantizer for ", name);
}

// An empty tensor of n values; from a huge page (2 MiB) up, in memory that asks for transparent huge
// pages: a weight-sized output freshly allocated in 4 KiB pages costs more in page faults than the
// dequantization itself.
torch::Tensor huge_page_tensor(int64_t n, torch::ScalarType dtype) {
  constexpr size_t HUGE_PAGE = size_t(1) << 21;
  if (size_t(n) * c10::elementSize(dtype) < HUGE_PAGE) return torch::empty({n}, torch::dtype(dtype));
  const size_t bytes = (size_t(n) * c10::elementSize(dtype) + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
  void* data = std::aligned_alloc(HUGE_PAGE, bytes);
  TORCH_CHECK(data != nullptr, "out of memory for ", n, " dequantized weights");
  madvise(data, bytes, MADV_HUGEPAGE);  // advice: where the kernel declines, plain pages serve
  return torch::from_blob(data, {n}, [](void* p) { std::free(p); }, dtype);
}

// blocks: contiguous uint8 bytes of whole blocks of qtype; the weights, flat, in float32, or with
// bfloat16 rounded to nearest-even from those float32 values (what .to(torch.bfloat16) computes).
torch::Tensor dequantize(const torch::Tensor& blocks, const std::string& qtype, bool bfloat16) {
  const Type& type = type_of(qtype);
  TORCH_CHECK(blocks.scalar_type() == torch::kUInt8 && blocks.is_contiguous() && blocks.numel() % type.bytes == 0,
              "blocks: contiguous uint8, whole ", qtype, " blocks");
  const int64_t n = blocks.numel() / type.bytes;
  auto y = huge_page_tensor(n * type.weights, bfloat16 ? torch::kBFloat16 : torch::kFloat32);
  const uint8_t* b = blocks.data_ptr<uint8_t>();
  void* out = y.data_ptr();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    alignas(64) float block[QK];
    for (int64_t i = begin; i < end; ++i) {
      if (!bfloat16) {
        type.block(b + i * type.bytes, static_cast<float*>(out) + i * type.weights);
        continue;
      }
      type.block(b + i * type.bytes, block);
      uint16_t* to = static_cast<uint16_t*>(out) + i * type.weights;
      for (int64_t j = 0; j < type.weights; j += 16)
        _mm256_storeu_si256((__m256i*)(to + j), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(block + j)));
    }
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q6_k_gemv", &q6_k_gemv, "Q6_K GEMV (AVX512-BF16) on blocks ordered by input tiles");
  m.attr("TILE_BLOCKS") = TILE_BLOCKS;
  m.def("dequantize", &dequantize, "float32 or bfloat16 weights from blocks of DEQUANTIZED_TYPES");
  std::vector<std::string> names;
  for (const auto& [key, type] : TYPES) names.emplace_back(key);
  m.attr("DEQUANTIZED_TYPES") = names;
}
