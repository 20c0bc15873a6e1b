// Torch binding of the multi-adapter LoRA ops (lorabench::bgmv_* / sgmv_*): shape, dtype and index
// checks at the boundary, then the CPU kernels (csrc/cpu/bgmv.cpp) or the CUDA launchers
// (csrc/cuda/bgmv.cu). Schemas and fakes: lorabench/ops/multi_lora.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/bgmv.h"
#ifdef LORABENCH_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "cuda/bgmv.h"
#endif

namespace {

#define CHECK_DIMS(t, n) TORCH_CHECK((t).dim() == (n), #t " must be " #n "-D, got shape ", (t).sizes())
#define CHECK_I64(t) TORCH_CHECK((t).scalar_type() == at::kLong, #t " must be int64, got ", (t).scalar_type())

void check_slots(const at::Tensor& W, const at::Tensor& ranks, const at::Tensor* scales) {
  CHECK_DIMS(W, 3);
  CHECK_I64(ranks);
  TORCH_CHECK(ranks.dim() == 1 && ranks.size(0) == W.size(0), "ranks must have one entry per slot (",
              W.size(0), "), got shape ", ranks.sizes());
  if (scales != nullptr) {
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->dim() == 1 && scales->size(0) == W.size(0),
                "scales must be float32 with one entry per slot (", W.size(0), "), got ",
                scales->scalar_type(), " ", scales->sizes());
  }
}

void check_shrink(const at::Tensor& x, const at::Tensor& A, const at::Tensor& ranks, const at::Tensor& scales) {
  CHECK_DIMS(x, 2);
  check_slots(A, ranks, &scales);
  TORCH_CHECK(x.scalar_type() == A.scalar_type(), "x is ", x.scalar_type(), " but A is ", A.scalar_type());
  TORCH_CHECK(A.size(2) == x.size(1), "A is (slots, max_rank, in) = ", A.sizes(), " but x has in = ", x.size(1));
}

void check_expand(const at::Tensor& out, const at::Tensor& y, const at::Tensor& B, const at::Tensor& ranks) {
  CHECK_DIMS(out, 2);
  CHECK_DIMS(y, 2);
  check_slots(B, ranks, nullptr);
  TORCH_CHECK(out.scalar_type() == B.scalar_type(), "out is ", out.scalar_type(), " but B is ", B.scalar_type());
  TORCH_CHECK(y.scalar_type() == at::kFloat, "y must be float32, got ", y.scalar_type());
  TORCH_CHECK(B.size(1) == out.size(1) && B.size(2) == y.size(1), "B must be (slots, out, max_rank) = (*, ",
              out.size(1), ", ", y.size(1), "), got ", B.sizes());
  TORCH_CHECK(y.size(0) == out.size(0), "y has ", y.size(0), " tokens but out has ", out.size(0));
}

void check_segments(const at::Tensor& seg_starts, const at::Tensor& seg_idx) {
  CHECK_I64(seg_starts);
  CHECK_I64(seg_idx);
  TORCH_CHECK(seg_starts.dim() == 1 && seg_idx.dim() == 1 && seg_starts.size(0) == seg_idx.size(0) + 1,
              "seg_starts must be (S+1,) and seg_idx (S,), got ", seg_starts.sizes(), " and ", seg_idx.sizes());
}

// CPU only (reading values on a GPU would synchronise): the indices must address real slots.
void check_values(const int64_t* idx, int64_t n, const at::Tensor& ranks, int64_t max_rank) {
  const int64_t L = ranks.size(0);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(idx[i] >= -1 && idx[i] < L, "adapter index ", idx[i], " out of range: valid are -1 (no adapter) and 0..",
                L - 1, " (the slots)");
  const int64_t* r = ranks.data_ptr<int64_t>();
  for (int64_t l = 0; l < L; ++l)
    TORCH_CHECK(r[l] >= 0 && r[l] <= max_rank, "slot ", l, " has rank ", r[l], "; valid are 0..", max_rank, " (max_rank)");
}

void check_segment_values(const at::Tensor& seg_starts, int64_t n_tokens) {
  const int64_t* s = seg_starts.data_ptr<int64_t>();
  const int64_t S = seg_starts.size(0) - 1;
  TORCH_CHECK(s[0] == 0 && s[S] == n_tokens, "seg_starts must start at 0 and end at the number of tokens (",
              n_tokens, "), got ", s[0], " and ", s[S]);
  for (int64_t i = 0; i < S; ++i) TORCH_CHECK(s[i] <= s[i + 1], "seg_starts must not decrease (at segment ", i, ")");
}

at::Tensor row_major(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// ---- CPU ----

at::Tensor shrink_cpu(const at::Tensor& x, const at::Tensor& A, const lorabench::cpu::TokenGroups& groups,
                      const at::Tensor& ranks, const at::Tensor& scales) {
  at::Tensor y = at::zeros({x.size(0), A.size(1)}, x.options().dtype(at::kFloat));
  lorabench::cpu::multi_lora_shrink(row_major(x), A.contiguous(), groups, ranks.data_ptr<int64_t>(),
                                    scales.data_ptr<float>(), y);
  return y;
}

void expand_cpu(const at::Tensor& out, const at::Tensor& y, const at::Tensor& B,
                const lorabench::cpu::TokenGroups& groups, const at::Tensor& ranks) {
  at::Tensor dst = row_major(out);
  lorabench::cpu::multi_lora_expand(dst, y.contiguous(), B.contiguous(), groups, ranks.data_ptr<int64_t>());
  if (!dst.is_same(out)) out.copy_(dst);
}

at::Tensor bgmv_shrink_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& idx, const at::Tensor& ranks,
                           const at::Tensor& scales) {
  check_shrink(x, A, ranks, scales);
  CHECK_I64(idx);
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == x.size(0), "idx must be (tokens,) = (", x.size(0), ",), got ", idx.sizes());
  const at::Tensor i = idx.contiguous(), r = ranks.contiguous();
  check_values(i.data_ptr<int64_t>(), i.numel(), r, A.size(1));
  auto groups = lorabench::cpu::groups_from_indices(i.data_ptr<int64_t>(), i.numel(), A.size(0));
  return shrink_cpu(x, A, groups, r, scales.contiguous());
}

void bgmv_expand_cpu(const at::Tensor& out, const at::Tensor& y, const at::Tensor& B, const at::Tensor& idx,
                     const at::Tensor& ranks) {
  check_expand(out, y, B, ranks);
  CHECK_I64(idx);
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == out.size(0), "idx must be (tokens,) = (", out.size(0), ",), got ",
              idx.sizes());
  const at::Tensor i = idx.contiguous(), r = ranks.contiguous();
  check_values(i.data_ptr<int64_t>(), i.numel(), r, B.size(2));
  auto groups = lorabench::cpu::groups_from_indices(i.data_ptr<int64_t>(), i.numel(), B.size(0));
  expand_cpu(out, y, B, groups, r);
}

at::Tensor sgmv_shrink_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& seg_starts,
                           const at::Tensor& seg_idx, const at::Tensor& ranks, const at::Tensor& scales) {
  check_shrink(x, A, ranks, scales);
  check_segments(seg_starts, seg_idx);
  const at::Tensor s = seg_starts.contiguous(), si = seg_idx.contiguous(), r = ranks.contiguous();
  check_segment_values(s, x.size(0));
  check_values(si.data_ptr<int64_t>(), si.numel(), r, A.size(1));
  auto groups = lorabench::cpu::groups_from_segments(s.data_ptr<int64_t>(), si.data_ptr<int64_t>(), si.numel());
  return shrink_cpu(x, A, groups, r, scales.contiguous());
}

void sgmv_expand_cpu(const at::Tensor& out, const at::Tensor& y, const at::Tensor& B, const at::Tensor& seg_starts,
                     const at::Tensor& seg_idx, const at::Tensor& ranks) {
  check_expand(out, y, B, ranks);
  check_segments(seg_starts, seg_idx);
  const at::Tensor s = seg_starts.contiguous(), si = seg_idx.contiguous(), r = ranks.contiguous();
  check_segment_values(s, out.size(0));
  check_values(si.data_ptr<int64_t>(), si.numel(), r, B.size(2));
  auto groups = lorabench::cpu::groups_from_segments(s.data_ptr<int64_t>(), si.data_ptr<int64_t>(), si.numel());
  expand_cpu(out, y, B, groups, r);
}

// ---- CUDA ----
#ifdef LORABENCH_WITH_CUDA
namespace lc = lorabench::cuda;

lc::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return lc::DType::kFloat32;
    case at::kBFloat16: return lc::DType::kBFloat16;
    case at::kHalf: return lc::DType::kFloat16;
    default: TORCH_CHECK(false, "multi-LoRA ops support fp32/bf16/fp16, got ", t);
  }
}

// The dispatcher sends a call here when any argument is on a GPU: every tensor must be on x's (or out's)
// device, or a kernel would dereference a host or another device's pointer (an illegal address, later).
void check_device(const at::Tensor& ref, const char* ref_name,
                  std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  for (const auto& [name, t] : tensors)
    if (t != nullptr)
      TORCH_CHECK(t->device() == ref.device(), name, " is on ", t->device(), " but ", ref_name, " is on ", ref.device(),
                  ": every tensor of a multi-LoRA op must be on one CUDA device");
}

lc::MultiLoraParams base_params(const at::Tensor& W, const at::Tensor& ranks, int64_t n_tokens) {
  lc::MultiLoraParams p;
  p.dtype = cuda_dtype(W.scalar_type());
  p.w = W.data_ptr();
  p.ranks = ranks.data_ptr<int64_t>();
  p.n_tokens = n_tokens;
  p.n_slots = W.size(0);
  p.stream = c10::cuda::getCurrentCUDAStream().stream();
  return p;
}

at::Tensor shrink_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor* idx, const at::Tensor* seg_starts,
                       const at::Tensor* seg_idx, const at::Tensor& ranks, const at::Tensor& scales) {
  const at::Tensor xr = row_major(x), Ac = A.contiguous(), r = ranks.contiguous(), s = scales.contiguous();
  at::Tensor i, ss, si;
  // SGMV's tiles write the tokens its segments cover (all of them when the offsets are valid, which the CUDA
  // path does not check on the host): zero-filled so that no token is left unwritten.
  at::Tensor y = idx ? at::empty({x.size(0), A.size(1)}, x.options().dtype(at::kFloat))
                     : at::zeros({x.size(0), A.size(1)}, x.options().dtype(at::kFloat));
  auto p = base_params(Ac, r, x.size(0));
  if (idx) { i = idx->contiguous(); p.idx = i.data_ptr<int64_t>(); }
  else { ss = seg_starts->contiguous(); si = seg_idx->contiguous(); p.seg_starts = ss.data_ptr<int64_t>();
         p.seg_idx = si.data_ptr<int64_t>(); p.n_segments = si.numel(); }
  p.x = xr.data_ptr(); p.x_row_stride = xr.stride(0); p.y_out = y.data_ptr<float>(); p.scales = s.data_ptr<float>();
  p.max_rank = A.size(1); p.in_features = A.size(2);
  if (p.n_segments == 0 && !idx) return y;
  at::Tensor workspace;  // BGMV at few tokens splits `in` across blocks: their partial sums
  if (const int64_t n = lc::multi_lora_shrink_workspace(p); n > 0) {
    workspace = at::empty({n}, y.options());
    p.y_partial = workspace.data_ptr<float>();
  }
  lc::multi_lora_shrink_cuda(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

void expand_cuda(const at::Tensor& out, const at::Tensor& y, const at::Tensor& B, const at::Tensor* idx,
                 const at::Tensor* seg_starts, const at::Tensor* seg_idx, const at::Tensor& ranks) {
  at::Tensor dst = row_major(out);
  const at::Tensor yc = y.contiguous(), Bc = B.contiguous(), r = ranks.contiguous();
  at::Tensor i, ss, si;
  auto p = base_params(Bc, r, out.size(0));
  if (idx) { i = idx->contiguous(); p.idx = i.data_ptr<int64_t>(); }
  else { ss = seg_starts->contiguous(); si = seg_idx->contiguous(); p.seg_starts = ss.data_ptr<int64_t>();
         p.seg_idx = si.data_ptr<int64_t>(); p.n_segments = si.numel(); }
  if (!idx && p.n_segments == 0) return;
  p.out = dst.data_ptr(); p.out_row_stride = dst.stride(0); p.y_in = yc.data_ptr<float>();
  p.max_rank = B.size(2); p.out_features = B.size(1);
  lc::multi_lora_expand_cuda(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!dst.is_same(out)) out.copy_(dst);
}

at::Tensor bgmv_shrink_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor& idx, const at::Tensor& ranks,
                            const at::Tensor& scales) {
  check_shrink(x, A, ranks, scales);
  CHECK_I64(idx);
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == x.size(0), "idx must be (tokens,), got ", idx.sizes());
  check_device(x, "x", {{"A", &A}, {"idx", &idx}, {"ranks", &ranks}, {"scales", &scales}});
  const c10::cuda::CUDAGuard guard(x.device());
  return shrink_cuda(x, A, &idx, nullptr, nullptr, ranks, scales);
}

void bgmv_expand_cuda(const at::Tensor& out, const at::Tensor& y, const at::Tensor& B, const at::Tensor& idx,
                      const at::Tensor& ranks) {
  check_expand(out, y, B, ranks);
  CHECK_I64(idx);
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == out.size(0), "idx must be (tokens,), got ", idx.sizes());
  check_device(out, "out", {{"y", &y}, {"B", &B}, {"idx", &idx}, {"ranks", &ranks}});
  const c10::cuda::CUDAGuard guard(out.device());
  expand_cuda(out, y, B, &idx, nullptr, nullptr, ranks);
}

at::Tensor sgmv_shrink_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor& seg_starts,
                            const at::Tensor& seg_idx, const at::Tensor& ranks, const at::Tensor& scales) {
  check_shrink(x, A, ranks, scales);
  check_segments(seg_starts, seg_idx);
  check_device(x, "x", {{"A", &A}, {"seg_starts", &seg_starts}, {"seg_idx", &seg_idx}, {"ranks", &ranks},
                        {"scales", &scales}});
  const c10::cuda::CUDAGuard guard(x.device());
  return shrink_cuda(x, A, nullptr, &seg_starts, &seg_idx, ranks, scales);
}

void sgmv_expand_cuda(const at::Tensor& out, const at::Tensor& y, const at::Tensor& B, const at::Tensor& seg_starts,
                      const at::Tensor& seg_idx, const at::Tensor& ranks) {
  check_expand(out, y, B, ranks);
  check_segments(seg_starts, seg_idx);
  check_device(out, "out", {{"y", &y}, {"B", &B}, {"seg_starts", &seg_starts}, {"seg_idx", &seg_idx},
                            {"ranks", &ranks}});
  const c10::cuda::CUDAGuard guard(out.device());
  expand_cuda(out, y, B, nullptr, &seg_starts, &seg_idx, ranks);
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(lorabench, CPU, m) {
  m.impl("bgmv_shrink", &bgmv_shrink_cpu);
  m.impl("bgmv_expand", &bgmv_expand_cpu);
  m.impl("sgmv_shrink", &sgmv_shrink_cpu);
  m.impl("sgmv_expand", &sgmv_expand_cpu);
}

#ifdef LORABENCH_WITH_CUDA
TORCH_LIBRARY_IMPL(lorabench, CUDA, m) {
  m.impl("bgmv_shrink", &bgmv_shrink_cuda);
  m.impl("bgmv_expand", &bgmv_expand_cuda);
  m.impl("sgmv_shrink", &sgmv_shrink_cuda);
  m.impl("sgmv_expand", &sgmv_expand_cuda);
}
#endif
