"""Depthwise convolutions whose weight gradient is fast on CPUs.

On CPU, PyTorch's depthwise convolution backward goes to oneDNN, whose *weight* gradient is
many times slower than the input gradient when the feature map is small. Those small maps are
exactly the late stages of a mobile network fed small images, where it dominates a fine-tuning
step (``benchmarks/depthwise.py`` measures it). Here the weight gradient of small maps is the sum, for each of the k x k kernel
offsets, of the output gradient times the shifted input: a few element-wise products,
memory-bound and cheap. Large maps keep oneDNN's kernel, which is faster there. The
forward pass and the input gradient are PyTorch's own, so results agree with plain
``F.conv2d`` to float rounding (``tests/test_depthwise.py``).

``fast_depthwise_grads(model)`` switches every depthwise ``nn.Conv2d`` of a model over; the
modules keep their parameters, state-dict keys and export graph (outside autograd they
call ``F.conv2d`` as before).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Output maps up to this many pixels get the element-wise weight gradient (measured on a
# 2-core AMD EPYC: 1x1 to 4x4 maps 4-35x faster than oneDNN, 16x16 maps 2.7x slower).
SMALL_MAP_PIXELS = 16


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> Tensor:
    """``F.conv2d``, taking the fast weight gradient where it applies (depthwise, training, CPU)."""
    if _fast_grad_applies(x, weight, dilation, groups):
        return _DepthwiseConv2d.apply(x, weight, bias, tuple(stride), tuple(padding))
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _fast_grad_applies(x: Tensor, weight: Tensor, dilation: tuple[int, int], groups: int) -> bool:
    return (
        weight.requires_grad
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and groups == x.shape[1] == weight.shape[0]
        and weight.shape[1] == 1
        and tuple(dilation) == (1, 1)
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.onnx.is_in_onnx_export()
    )


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        small = grad.shape[2] * grad.shape[3] <= SMALL_MAP_PIXELS
        need_x, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_x or (need_weight and not small):
            # under autocast the forward convolved x and weight cast to grad's dtype (bf16); some CPUs' kernels
            # (AVX2 without AVX-512) refuse mixed dtypes, so the backward takes them as the forward used them
            grad_x, grad_weight_onednn, _ = torch.ops.aten.convolution_backward(
                grad,
                x.to(grad.dtype),
                weight.to(grad.dtype),
                None,
                ctx.stride,
                ctx.padding,
                (1, 1),
                False,
                (0, 0),
                weight.shape[0],
                (need_x, need_weight and not small, False),
            )
            grad_x = None if grad_x is None else grad_x.to(x.dtype)
            grad_weight = None if grad_weight_onednn is None else grad_weight_onednn.to(weight.dtype)
        if need_weight and small:
            grad_weight = _small_map_weight_grad(x, grad, weight.shape, ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None


def _small_map_weight_grad(x: Tensor, grad: Tensor, shape: torch.Size, stride, padding) -> Tensor:
    """d loss / d weight of a depthwise convolution: for each kernel offset (i, j), the sum over
    batch and positions of the output gradient times the input seen at that offset."""
    (pad_h, pad_w), (step_h, step_w) = padding, stride
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
    out_h, out_w = grad.shape[2], grad.shape[3]
    kernel_h, kernel_w = shape[2], shape[3]
    columns = [
        (grad * padded[:, :, i : i + step_h * (out_h - 1) + 1 : step_h, j : j + step_w * (out_w - 1) + 1 : step_w]).sum(
            (0, 2, 3)
        )
        for i in range(kernel_h)
        for j in range(kernel_w)
    ]
    return torch.stack(columns, 1).view(shape)


class _FastGradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose convolution goes through :func:`conv2d`."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # noqa: A002
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def fast_depthwise_grads(model: nn.Module) -> int:
    """Switch the model's plain depthwise ``nn.Conv2d`` layers to :func:`conv2d`; returns how many.

    Only layers whose class is exactly ``nn.Conv2d`` with zero, explicit padding are switched
    (their class changes to a subclass that overrides ``_conv_forward``): subclasses with a
    forward of their own call :func:`conv2d` themselves, like ``Conv2dSame``.
    """
    switched = 0
    for module in model.modules():
        if (
            type(module) is nn.Conv2d
            and module.groups == module.in_channels == module.out_channels
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        ):
            module.__class__ = _FastGradConv2d
            switched += 1
    return switched
