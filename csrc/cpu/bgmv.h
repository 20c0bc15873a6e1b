// CPU kernels of the multi-adapter LoRA ops (BGMV / SGMV), see lorabench/ops/multi_lora.py.
// Inputs are validated by the binding (csrc/multi_lora_ops.cpp); these functions assume:
// x (T, in) with unit last stride, A (L, R, in) and B (L, out, R) contiguous, y (T, R) fp32 contiguous
// and zero-filled, out (T, out) with unit last stride, slot indices already checked.
#pragma once
#include <ATen/ATen.h>

namespace lorabench::cpu {

// Tokens that share a slot, as positions into `order` (a permutation of the adapted tokens).
struct TokenGroups {
  std::vector<int64_t> order;   // token ids, grouped by slot
  std::vector<int64_t> slot;    // (G,) slot of each group
  std::vector<int64_t> begin;   // (G+1,) group g is order[begin[g]:begin[g+1]]
};

// BGMV: group the tokens by idx[i] (counting sort; idx = -1 is dropped).
TokenGroups groups_from_indices(const int64_t* idx, int64_t n_tokens, int64_t n_slots);
// SGMV: the segments are the groups (tokens already contiguous); empty segments and slot -1 dropped.
TokenGroups groups_from_segments(const int64_t* seg_starts, const int64_t* seg_idx, int64_t n_segments);

// y[t, :r] = scales[l] * x[t] A[l, :r]^T for every group (slot l, rank r = ranks[l]).
void multi_lora_shrink(const at::Tensor& x, const at::Tensor& A, const TokenGroups& groups,
                       const int64_t* ranks, const float* scales, at::Tensor& y);
// out[t] += y[t, :r] B[l, :, :r]^T for every group.
void multi_lora_expand(at::Tensor& out, const at::Tensor& y, const at::Tensor& B,
                       const TokenGroups& groups, const int64_t* ranks);

}  // namespace lorabench::cpu
