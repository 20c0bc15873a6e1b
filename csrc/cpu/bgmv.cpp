// CPU kernels of BGMV / SGMV (Punica arXiv 2310.18547, S-LoRA arXiv 2311.03285).
//
// Both ops run on groups of tokens that share a slot (BGMV groups by a counting sort of idx, SGMV's
// segments are the groups), so an adapter's rows are read from memory once per block of TB tokens
// instead of once per token: with a Zipf or all-identical popularity this is what keeps BGMV near
// the cost of one adapter. Only rows j < rank of A and columns j < rank of B are ever read.
// Work items are (group, token block, row j) for shrink and (group, token block, block of outputs)
// for expand, split over threads by at::parallel_for. Accumulation is fp32 for every dtype.
#include "bgmv.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

namespace lorabench::cpu {
namespace {

constexpr int64_t TB = 8;         // tokens per block: their x rows stay in L1/L2 across rows of A
constexpr int64_t OUT_BLOCK = 64; // outputs per expand work item

template <typename T, typename U>
inline float dot(const T* a, const U* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += static_cast<float>(a[k]) * static_cast<float>(b[k]);
  return acc;
}

// Items of group g are [offsets[g], offsets[g+1]); `per_group(g)` counts them.
template <typename F>
std::vector<int64_t> item_offsets(int64_t G, F per_group) {
  std::vector<int64_t> off(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) off[g + 1] = off[g] + per_group(g);
  return off;
}

inline int64_t group_of(const std::vector<int64_t>& off, int64_t item) {
  return std::upper_bound(off.begin(), off.end(), item) - off.begin() - 1;
}

template <typename T>
void shrink_kernel(const at::Tensor& x, const at::Tensor& A, const TokenGroups& gr, const int64_t* ranks,
                   const float* scales, at::Tensor& y) {
  const T* xp = x.data_ptr<T>();
  const T* Ap = A.data_ptr<T>();
  float* yp = y.data_ptr<float>();
  const int64_t xs = x.stride(0), R = A.size(1), in = A.size(2), G = gr.slot.size();
  auto n_blocks = [&](int64_t g) { return (gr.begin[g + 1] - gr.begin[g] + TB - 1) / TB; };
  auto off = item_offsets(G, [&](int64_t g) { return n_blocks(g) * ranks[gr.slot[g]]; });
  at::parallel_for(0, off[G], 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t g = group_of(off, item), l = gr.slot[g], r = ranks[l];
      const int64_t k = item - off[g], blk = k / r, j = k % r;  // rows j of one block are adjacent
      const T* arow = Ap + (l * R + j) * in;                      // A[l, j, :], j < rank
      const int64_t t0 = gr.begin[g] + blk * TB, t1 = std::min(t0 + TB, gr.begin[g + 1]);
      for (int64_t p = t0; p < t1; ++p) {
        const int64_t t = gr.order[p];
        yp[t * R + j] = scales[l] * dot(xp + t * xs, arow, in);  // y[t, j], eq. (3) of LoRA
      }
    }
  });
}

// Expand reads B[l, o, :r] (rows of length r, often 8..32): a dot product per output would be all
// reduction overhead. Instead a block of OUT_BLOCK outputs is transposed once into fp32 Bt (r, block)
// and each token of the block adds sum_j y[t, j] Bt[j, :], vectorised over the outputs.
template <typename T>
void expand_kernel(at::Tensor& out, const at::Tensor& y, const at::Tensor& B, const TokenGroups& gr,
                   const int64_t* ranks) {
  T* op = out.data_ptr<T>();
  const float* yp = y.data_ptr<float>();
  const T* Bp = B.data_ptr<T>();
  const int64_t os = out.stride(0), n_out = B.size(1), R = B.size(2), G = gr.slot.size();
  const int64_t n_oblk = (n_out + OUT_BLOCK - 1) / OUT_BLOCK;
  auto off = item_offsets(G, [&](int64_t g) {
    return ranks[gr.slot[g]] == 0 ? 0 : (gr.begin[g + 1] - gr.begin[g] + TB - 1) / TB * n_oblk;
  });
  at::parallel_for(0, off[G], 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> bt(R * OUT_BLOCK);  // Bt[j, o - o0], j < r
    float acc[OUT_BLOCK];
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t g = group_of(off, item), l = gr.slot[g], r = ranks[l];
      const int64_t k = item - off[g], blk = k / n_oblk, ob = k % n_oblk;
      const int64_t o0 = ob * OUT_BLOCK, n = std::min(OUT_BLOCK, n_out - o0);
      for (int64_t o = 0; o < n; ++o) {
        const T* brow = Bp + (l * n_out + o0 + o) * R;  // B[l, o0 + o, :r]
        for (int64_t j = 0; j < r; ++j) bt[j * OUT_BLOCK + o] = static_cast<float>(brow[j]);
      }
      const int64_t t0 = gr.begin[g] + blk * TB, t1 = std::min(t0 + TB, gr.begin[g + 1]);
      for (int64_t p = t0; p < t1; ++p) {
        const int64_t t = gr.order[p];
        for (int64_t o = 0; o < OUT_BLOCK; ++o) acc[o] = 0.f;
        for (int64_t j = 0; j < r; ++j) {
          const float yj = yp[t * R + j];
          const float* bj = bt.data() + j * OUT_BLOCK;
#pragma omp simd
          for (int64_t o = 0; o < OUT_BLOCK; ++o) acc[o] += yj * bj[o];
        }
        T* dst = op + t * os + o0;
        for (int64_t o = 0; o < n; ++o) dst[o] = static_cast<T>(static_cast<float>(dst[o]) + acc[o]);
      }
    }
  });
}

#define LORABENCH_DISPATCH_FLOATS(dtype, NAME, ...)                                  \
  switch (dtype) {                                                                   \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }               \
    case at::kBFloat16: { using scalar_t = c10::BFloat16; __VA_ARGS__(); break; }    \
    case at::kHalf: { using scalar_t = c10::Half; __VA_ARGS__(); break; }            \
    default: TORCH_CHECK(false, NAME ": unsupported dtype ", dtype);                 \
  }

}  // namespace

TokenGroups groups_from_indices(const int64_t* idx, int64_t n_tokens, int64_t n_slots) {
  std::vector<int64_t> count(n_slots + 1, 0);
  for (int64_t t = 0; t < n_tokens; ++t)
    if (idx[t] >= 0) ++count[idx[t] + 1];
  for (int64_t l = 0; l < n_slots; ++l) count[l + 1] += count[l];  // count[l] = first position of slot l
  TokenGroups gr;
  gr.order.resize(count[n_slots]);
  std::vector<int64_t> pos(count.begin(), count.end() - 1);
  for (int64_t t = 0; t < n_tokens; ++t)
    if (idx[t] >= 0) gr.order[pos[idx[t]]++] = t;
  for (int64_t l = 0; l < n_slots; ++l) {
    if (count[l + 1] == count[l]) continue;
    gr.slot.push_back(l);
    gr.begin.push_back(count[l]);
  }
  gr.begin.push_back(count[n_slots]);
  return gr;
}

TokenGroups groups_from_segments(const int64_t* seg_starts, const int64_t* seg_idx, int64_t n_segments) {
  TokenGroups gr;
  for (int64_t s = 0; s < n_segments; ++s) {
    if (seg_idx[s] < 0 || seg_starts[s + 1] == seg_starts[s]) continue;
    gr.slot.push_back(seg_idx[s]);
    gr.begin.push_back(gr.order.size());
    for (int64_t t = seg_starts[s]; t < seg_starts[s + 1]; ++t) gr.order.push_back(t);
  }
  gr.begin.push_back(gr.order.size());
  return gr;
}

void multi_lora_shrink(const at::Tensor& x, const at::Tensor& A, const TokenGroups& groups,
                       const int64_t* ranks, const float* scales, at::Tensor& y) {
  LORABENCH_DISPATCH_FLOATS(x.scalar_type(), "bgmv/sgmv shrink",
                            [&] { shrink_kernel<scalar_t>(x, A, groups, ranks, scales, y); });
}

void multi_lora_expand(at::Tensor& out, const at::Tensor& y, const at::Tensor& B,
                       const TokenGroups& groups, const int64_t* ranks) {
  LORABENCH_DISPATCH_FLOATS(out.scalar_type(), "bgmv/sgmv expand",
                            [&] { expand_kernel<scalar_t>(out, y, B, groups, ranks); });
}

}  // namespace lorabench::cpu
