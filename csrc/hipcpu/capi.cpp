// C entry points to the CUDA kernels' host launchers, for the test-only HIP-CPU build
// (tests/kernels/hipcpu.py compiles this file with csrc/cuda/*.cu as C++ against HIP-CPU and calls it
// through ctypes with CPU tensors' pointers). No torch here: the build stays a few seconds of g++.
// Each call launches, waits for the kernels (HIP-CPU's streams run asynchronously) and returns 0 or
// the HIP error code. dtype is the integer of lorabench::cuda::DType.
#include <cstdint>
#include <vector>

#include "../cuda/bgmv.h"
#include "../cuda/lora.h"
#include "../cuda/nf4_int4.h"
#include "../cuda/runtime.h"

namespace lc = lorabench::cuda;

namespace {
int finish(int launch_code) {
  if (launch_code != 0) return launch_code;
  const int sync = static_cast<int>(cudaDeviceSynchronize());
  return sync != 0 ? sync : static_cast<int>(cudaGetLastError());
}

lc::Q4Params q4(const uint8_t* packed, int64_t N, int64_t K, int64_t group, const float* scale,
                const uint8_t* scale_q8, const float* scale2, const float* code2, const float* offset,
                const float* zero, int int_codes) {
  lc::Q4Params p;
  p.packed = packed;
  p.N = N;
  p.K = K;
  p.group = group;
  p.scale = scale;
  p.scale_q8 = scale_q8;
  p.scale2 = scale2;
  p.code2 = code2;
  p.offset = offset;
  p.zero = zero;
  p.int_codes = int_codes != 0;
  return p;
}

lc::MultiLoraParams multi(int dtype, const void* w, const int64_t* idx, const int64_t* seg_starts,
                          const int64_t* seg_idx, int64_t n_segments, const int64_t* ranks, int64_t n_tokens,
                          int64_t n_slots, int64_t max_rank) {
  lc::MultiLoraParams p;
  p.dtype = static_cast<lc::DType>(dtype);
  p.w = w;
  p.idx = idx;
  p.seg_starts = seg_starts;
  p.seg_idx = seg_idx;
  p.n_segments = n_segments;
  p.ranks = ranks;
  p.n_tokens = n_tokens;
  p.n_slots = n_slots;
  p.max_rank = max_rank;
  return p;
}
}  // namespace

extern "C" {

int lb_dora_norm(const void* weight, const void* a, const void* wa, const void* bg, const void* b, void* norm,
                 int64_t out, int64_t in, int64_t rank, double scale, double cancellation, int dtype) {
  const lc::DoraNormParams p{weight, a, wa, bg, b, norm, out, in, rank, scale, cancellation,
                             static_cast<lc::DType>(dtype)};
  return finish(lc::launch_dora_norm(p, nullptr));
}

int lb_dora_epilogue(void* y, const void* u, const void* g, const void* bias, int64_t tokens, int64_t out,
                     int accumulate, int dtype) {
  const lc::DoraEpilogueParams p{y, u, g, bias, tokens, out, accumulate != 0, static_cast<lc::DType>(dtype)};
  return finish(lc::launch_dora_epilogue(p, nullptr));
}

int lb_dora_grad(const void* dy, const void* u, const void* g, const void* norm, void* du, void* dm, int64_t tokens,
                 int64_t out, int dtype) {
  lc::DoraGradParams p{dy, u, g, norm, du, dm, tokens, out, static_cast<lc::DType>(dtype)};
  // the acc type's elements: double for fp64, float otherwise
  std::vector<double> workspace(static_cast<size_t>(lc::dora_grad_workspace(p)));
  p.partial = workspace.empty() ? nullptr : workspace.data();
  return finish(lc::launch_dora_grad(p, nullptr));
}

int lb_multi_lora_shrink(int dtype, const void* x, int64_t x_row_stride, float* y_out, const void* w,
                         const int64_t* idx, const int64_t* seg_starts, const int64_t* seg_idx, int64_t n_segments,
                         const int64_t* ranks, const float* scales, int64_t n_tokens, int64_t n_slots,
                         int64_t max_rank, int64_t in_features) {
  auto p = multi(dtype, w, idx, seg_starts, seg_idx, n_segments, ranks, n_tokens, n_slots, max_rank);
  p.x = x;
  p.x_row_stride = x_row_stride;
  p.y_out = y_out;
  p.scales = scales;
  p.in_features = in_features;
  std::vector<float> workspace(static_cast<size_t>(lc::multi_lora_shrink_workspace(p)));
  p.y_partial = workspace.empty() ? nullptr : workspace.data();
  lc::multi_lora_shrink_cuda(p);
  return finish(static_cast<int>(cudaGetLastError()));
}

int lb_multi_lora_expand(int dtype, void* out, int64_t out_row_stride, const float* y_in, const void* w,
                         const int64_t* idx, const int64_t* seg_starts, const int64_t* seg_idx, int64_t n_segments,
                         const int64_t* ranks, int64_t n_tokens, int64_t n_slots, int64_t max_rank,
                         int64_t out_features) {
  auto p = multi(dtype, w, idx, seg_starts, seg_idx, n_segments, ranks, n_tokens, n_slots, max_rank);
  p.out = out;
  p.out_row_stride = out_row_stride;
  p.y_in = y_in;
  p.out_features = out_features;
  lc::multi_lora_expand_cuda(p);
  return finish(static_cast<int>(cudaGetLastError()));
}

int lb_q4_dequantize(const uint8_t* packed, int64_t N, int64_t K, int64_t group, const float* scale,
                     const uint8_t* scale_q8, const float* scale2, const float* code2, const float* offset,
                     const float* zero, int int_codes, void* out, int dtype) {
  const auto p = q4(packed, N, K, group, scale, scale_q8, scale2, code2, offset, zero, int_codes);
  lc::q4_dequantize_cuda(p, out, static_cast<lc::DType>(dtype));
  return finish(static_cast<int>(cudaGetLastError()));
}

int lb_q4_gemv(const uint8_t* packed, int64_t N, int64_t K, int64_t group, const float* scale,
               const uint8_t* scale_q8, const float* scale2, const float* code2, const float* offset,
               const float* zero, int int_codes, const void* x, int64_t ldx, int dtype, int64_t B, float* out,
               int64_t ldo) {
  const auto p = q4(packed, N, K, group, scale, scale_q8, scale2, code2, offset, zero, int_codes);
  lc::q4_gemv_cuda(p, x, ldx, static_cast<lc::DType>(dtype), B, out, ldo);
  return finish(static_cast<int>(cudaGetLastError()));
}

}  // extern "C"
