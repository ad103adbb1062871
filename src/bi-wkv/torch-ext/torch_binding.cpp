#include <torch/library.h>

#include "registration.h"
#include "torch_binding.h"

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def("bi_wkv_forward(Tensor w, Tensor u, Tensor k, Tensor v, bool need_state) -> (Tensor, Tensor)");
  ops.impl("bi_wkv_forward", c10::kCUDA, &bi_wkv_forward);
  ops.def(
      "bi_wkv_backward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor state, Tensor grad_y) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  ops.impl("bi_wkv_backward", c10::kCUDA, &bi_wkv_backward);
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
