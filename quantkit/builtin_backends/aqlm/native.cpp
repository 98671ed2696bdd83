// AQLM's codeword search on x86 CPUs with AVX-512: for each query row r, the codeword k minimising
//     score(r, k) = <q_r, c_k> + w_r * b_k
// (k-means' nearest centroid with q = -p, b = |c|^2 / 2, w = 1; a greedy beam-search step with q the
// linear term of a row, b = c^T H_jj c and w = s_r^2), and that minimum. torch computes the same as a
// (rows x codewords) matrix and a reduction over it, memory-bound for AQLM's short groups (8 values a
// codeword: 16 FLOPs a score) at 10-16 GFLOP/s a core; here no score is stored. Codewords come
// transposed (d x K, K a multiple of 16): 16 codewords a vector, one FMA a dimension. Rows go in
// groups of ROWS that share each codeword load; codewords in blocks of BLOCK that stay in L1 while
// every row of a chunk passes over them. Each lane keeps its lowest score and the first codeword
// reaching it (strict <), and the lanes reduce to the lowest score, ties to the lowest index: the
// first minimum of the row's scores. Row chunks are split over torch's intra-op threads.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <tuple>

namespace {

constexpr int64_t LANES = 16;
constexpr int64_t ROWS = 4;       // rows sharing each codeword vector load
constexpr int64_t BLOCK = 512;    // codewords a block: 16 KiB of float32 at d = 8
constexpr int64_t CHUNK = 64;     // rows per task; their running minima (8 KiB) stay in L1

// Rows [begin, end) (at most CHUNK) against all K codewords.
void search_chunk(const float* q, const float* c, const float* b, const float* w, int64_t d, int64_t K,
                  int64_t begin, int64_t end, float* values, int64_t* indices) {
  const int64_t n = end - begin;
  alignas(64) float best[CHUNK][LANES];
  alignas(64) int32_t where[CHUNK][LANES];
  for (int64_t r = 0; r < n; ++r) {
    _mm512_store_ps(best[r], _mm512_set1_ps(std::numeric_limits<float>::infinity()));
    _mm512_store_si512(where[r], _mm512_setzero_si512());
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t k0 = 0; k0 < K; k0 += BLOCK) {
    const int64_t k1 = std::min(K, k0 + BLOCK);
    for (int64_t r0 = 0; r0 < n; r0 += ROWS) {
      const int64_t rows = std::min(ROWS, n - r0);
      __m512 low[ROWS], weight[ROWS];
      __m512i at[ROWS];
      const float* query[ROWS];
      for (int64_t i = 0; i < ROWS; ++i) {
        const int64_t r = r0 + std::min(i, rows - 1);  // a short last group repeats its last row
        low[i] = _mm512_load_ps(best[r]);
        at[i] = _mm512_load_si512(where[r]);
        weight[i] = _mm512_set1_ps(w[begin + r]);
        query[i] = q + (begin + r) * d;
      }
      for (int64_t k = k0; k < k1; k += LANES) {
        const __m512 bias = _mm512_loadu_ps(b + k);
        __m512 acc[ROWS];
        for (int64_t i = 0; i < ROWS; ++i) acc[i] = _mm512_mul_ps(weight[i], bias);
        for (int64_t j = 0; j < d; ++j) {
          const __m512 codes = _mm512_loadu_ps(c + j * K + k);
          for (int64_t i = 0; i < ROWS; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(query[i][j]), codes, acc[i]);
        }
        const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(int32_t(k)), lane);
        for (int64_t i = 0; i < ROWS; ++i) {
          const __mmask16 lower = _mm512_cmp_ps_mask(acc[i], low[i], _CMP_LT_OQ);
          low[i] = _mm512_mask_mov_ps(low[i], lower, acc[i]);
          at[i] = _mm512_mask_mov_epi32(at[i], lower, index);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        _mm512_store_ps(best[r0 + i], low[i]);
        _mm512_store_si512(where[r0 + i], at[i]);
      }
    }
  }
  for (int64_t r = 0; r < n; ++r) {
    float value = best[r][0];
    int32_t index = where[r][0];
    for (int64_t l = 1; l < LANES; ++l)
      if (best[r][l] < value || (best[r][l] == value && where[r][l] < index)) {
        value = best[r][l];
        index = where[r][l];
      }
    values[begin + r] = value;
    indices[begin + r] = index;
  }
}

// queries (n, d), codewords_t (d, K), bias (K,), weights (n,): contiguous float32, K % 16 == 0.
// Returns (the lowest score of each row (n,) float32, its first codeword (n,) int64).
std::tuple<torch::Tensor, torch::Tensor> best_codewords(const torch::Tensor& queries, const torch::Tensor& codewords_t,
                                                        const torch::Tensor& bias, const torch::Tensor& weights) {
  for (const auto* t : {&queries, &codewords_t, &bias, &weights})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->device().is_cpu(),
                "contiguous float32 CPU tensors");
  const int64_t n = queries.size(0), d = queries.size(1), K = codewords_t.size(1);
  TORCH_CHECK(codewords_t.size(0) == d && K % LANES == 0 && bias.numel() == K && weights.numel() == n,
              "queries (n, d), codewords_t (d, K) with K a multiple of 16, bias (K,), weights (n,)");
  auto values = torch::empty({n}, torch::kFloat32);
  auto indices = torch::empty({n}, torch::kInt64);
  const float *q = queries.data_ptr<float>(), *c = codewords_t.data_ptr<float>();
  const float *b = bias.data_ptr<float>(), *w = weights.data_ptr<float>();
  float* v = values.data_ptr<float>();
  int64_t* idx = indices.data_ptr<int64_t>();
  at::parallel_for(0, (n + CHUNK - 1) / CHUNK, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t)
      search_chunk(q, c, b, w, d, K, t * CHUNK, std::min(n, (t + 1) * CHUNK), v, idx);
  });
  return {values, indices};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("best_codewords", &best_codewords, "argmin_k <q_r, c_k> + w_r b_k of each row, and its value (AVX-512)");
}
