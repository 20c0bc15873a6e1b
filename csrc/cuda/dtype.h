// The element type of a kernel's tensors: the one definition every csrc/cuda header and binding uses
// (two enums of one name with different values would break the one-definition rule).
#pragma once

namespace lorabench::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace lorabench::cuda
