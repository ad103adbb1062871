#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

// y (dtype of k and v) and the per-chunk incoming states (float32, (6, B, ceil(T/16), C)) kept for backward;
// with need_state false (inference) the state is an empty tensor and is not written.
std::tuple<at::Tensor, at::Tensor> bi_wkv_forward(const at::Tensor& w, const at::Tensor& u,
                                                       const at::Tensor& k, const at::Tensor& v, bool need_state);

// Gradients of w, u, k, v from grad_y and the state returned by bi_wkv_forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bi_wkv_backward(
    const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& state, const at::Tensor& grad_y);
