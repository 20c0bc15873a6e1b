// CPU helpers of the fused LoRA / DoRA linear ops: see lora_linear.h.
#include "lora_linear.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace lorabench::cpu {
namespace {

constexpr int64_t kLanes = 16;  // independent partial sums: lets the compiler vectorise the reduction

template <typename scalar_t, typename acc_t>
acc_t sum_squares(const scalar_t* w, int64_t n) {
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t v = static_cast<acc_t>(w[i + l]);
      part[l] += v * v;
    }
  acc_t total = 0;
  for (; i < n; ++i) total += static_cast<acc_t>(w[i]) * static_cast<acc_t>(w[i]);
  for (int64_t l = 0; l < kLanes; ++l) total += part[l];
  return total;
}

}  // namespace

void dora_norm(const at::Tensor& weight, const at::Tensor& a, const at::Tensor& wa, const at::Tensor& bg,
               const at::Tensor& b, double scale, double cancellation, at::Tensor& norm) {
  const at::Tensor w = weight.contiguous();  // the frozen weight: normally contiguous already
  const int64_t out = w.size(0), in = w.size(1), r = b.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "dora_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pw = w.data_ptr<scalar_t>();
    const acc_t* pa = a.data_ptr<acc_t>();
    const acc_t* pwa = wa.data_ptr<acc_t>();
    const acc_t* pbg = bg.data_ptr<acc_t>();
    const acc_t* pb = b.data_ptr<acc_t>();
    acc_t* pn = norm.data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(scale);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(in, 1));
    at::parallel_for(0, out, grain, [&](int64_t j0, int64_t j1) {
      std::vector<acc_t> row;
      for (int64_t j = j0; j < j1; ++j) {
        const acc_t w_sq = sum_squares<scalar_t, acc_t>(pw + j * in, in);  // ||W_j||^2
        acc_t cross = 0, ba_sq = 0;
        for (int64_t k = 0; k < r; ++k) {
          cross += pb[j * r + k] * pwa[j * r + k];  // <W_j, (BA)_j>
          ba_sq += pb[j * r + k] * pbg[j * r + k];  // ||(BA)_j||^2
        }
        acc_t sq = w_sq + 2 * s * cross + s * s * ba_sq;
        if (sq < static_cast<acc_t>(cancellation) * (w_sq + s * s * ba_sq)) {  // recompute from the row
          row.assign(pw + j * in, pw + (j + 1) * in);
          for (int64_t k = 0; k < r; ++k) {
            const acc_t c = s * pb[j * r + k];
            for (int64_t i = 0; i < in; ++i) row[i] += c * pa[k * in + i];
          }
          sq = sum_squares<acc_t, acc_t>(row.data(), in);
        }
        pn[j] = std::sqrt(std::max(sq, acc_t(0)));
      }
    });
  });
}

void dora_epilogue(at::Tensor& y, const at::Tensor& u, const at::Tensor& g,
                   const c10::optional<at::Tensor>& bias, bool accumulate) {
  const int64_t tokens = u.size(0), out = u.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "dora_epilogue_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* py = y.data_ptr<scalar_t>();
    const scalar_t* pu = u.data_ptr<scalar_t>();
    const acc_t* pg = g.data_ptr<acc_t>();
    const scalar_t* pbias = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(out, 1));
    at::parallel_for(0, tokens, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        scalar_t* yr = py + t * out;
        const scalar_t* ur = pu + t * out;
        for (int64_t j = 0; j < out; ++j) {
          acc_t v = pg[j] * static_cast<acc_t>(ur[j]);
          if (pbias) v += static_cast<acc_t>(pbias[j]);
          if (accumulate) v += static_cast<acc_t>(yr[j]);
          yr[j] = static_cast<scalar_t>(v);
        }
      }
    });
  });
}

void dora_grad(const at::Tensor& dy, const at::Tensor& u, const at::Tensor& g, const at::Tensor& norm,
               at::Tensor& du, at::Tensor& dm) {
  const int64_t tokens = dy.size(0), out = dy.size(1);
  constexpr int64_t kBlock = 256;  // columns per task: dm's partial sums stay in registers/L1
  const int64_t blocks = (out + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "dora_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pdy = dy.data_ptr<scalar_t>();
    const scalar_t* pu = u.data_ptr<scalar_t>();
    const acc_t* pg = g.data_ptr<acc_t>();
    const acc_t* pn = norm.data_ptr<acc_t>();
    scalar_t* pdu = du.data_ptr<scalar_t>();
    acc_t* pdm = dm.data_ptr<acc_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t j0 = blk * kBlock, w = std::min(kBlock, out - j0);
        acc_t acc[kBlock] = {};
        for (int64_t t = 0; t < tokens; ++t) {
          const scalar_t* dyr = pdy + t * out + j0;
          const scalar_t* ur = pu + t * out + j0;
          scalar_t* dur = pdu + t * out + j0;
          for (int64_t j = 0; j < w; ++j) {
            const acc_t d = static_cast<acc_t>(dyr[j]);
            dur[j] = static_cast<scalar_t>(d * pg[j0 + j]);
            acc[j] += d * static_cast<acc_t>(ur[j]);
          }
        }
        for (int64_t j = 0; j < w; ++j) pdm[j0 + j] = acc[j] / pn[j0 + j];
      }
    });
  });
}

}  // namespace lorabench::cpu
