"""The fast depthwise weight gradient computes the same gradients as PyTorch's own convolution."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fmtl.training.depthwise import SMALL_MAP_PIXELS, conv2d, fast_depthwise_grads
from fmtl.training.models import create_model


@pytest.mark.parametrize(
    ("channels", "side", "kernel", "stride", "padding", "bias"),
    [
        (48, 1, 5, 1, 2, False),  # 1x1 maps, kernel larger than the map: the case oneDNN is slowest at
        (32, 4, 3, 1, 1, True),  # 4x4: still the element-wise path
        (16, 7, 3, 2, 0, False),  # stride 2, no padding (Conv2dSame pads outside)
        (8, 12, 3, 1, 1, False),  # 144 pixels: oneDNN's weight gradient
    ],
)
def test_gradients_match_pytorch(channels, side, kernel, stride, padding, bias):
    torch.manual_seed(0)
    x = torch.randn(6, channels, side, side, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(channels, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(channels, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, weight, b) if bias else (x, weight)
    expected_out = F.conv2d(x, weight, b, stride, padding, 1, channels)
    grad = torch.randn_like(expected_out)
    expected = torch.autograd.grad(expected_out, inputs, grad)
    out = conv2d(x, weight, b, (stride, stride), (padding, padding), (1, 1), channels)
    got = torch.autograd.grad(out, inputs, grad)
    torch.testing.assert_close(out, expected_out)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("side", [4, 12])  # the element-wise weight gradient, and oneDNN's
def test_under_bf16_autocast_the_gradients_match_pytorchs_whatever_the_cpu(side):
    """The forward convolves bf16 casts of float32 tensors; the backward must take them the same way (AVX2
    CPUs' kernels refuse a bf16 gradient with a float32 input)."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, side, side, requires_grad=True)
    weight = torch.randn(16, 1, 3, 3, requires_grad=True)
    grads = []
    for convolve in (F.conv2d, conv2d):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = convolve(x, weight, None, (1, 1), (1, 1), (1, 1), 16)
        grads.append(torch.autograd.grad(out.float().square().sum(), (x, weight)))
    for got, expected in zip(grads[1], grads[0], strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0.01, atol=0.01 * expected.abs().max().item())  # bf16's rounding


class _Ops(TorchDispatchMode):
    """The ATen operators that run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _weight_gradient_ops(side: int) -> list[str]:
    """Operators the backward of a 3x3 depthwise convolution runs for a ``side`` x ``side`` map, when only the
    weight needs a gradient (a frozen input, as in a fine-tuned block's first layer)."""
    x = torch.randn(2, 4, side, side)
    weight = torch.randn(4, 1, 3, 3, requires_grad=True)
    out = conv2d(x, weight, None, (1, 1), (1, 1), (1, 1), 4)
    assert out.grad_fn.name().endswith("_DepthwiseConv2dBackward")
    with _Ops() as ops:
        out.sum().backward()
    return ops.names


def test_small_maps_take_the_elementwise_path_and_larger_ones_onednns():
    """Not only equal: the element-wise weight gradient really runs for maps up to SMALL_MAP_PIXELS pixels (else
    the test above proves nothing), and PyTorch's own (oneDNN) above them."""
    small = int(SMALL_MAP_PIXELS**0.5)  # a square map of exactly SMALL_MAP_PIXELS pixels
    assert "convolution_backward" not in _weight_gradient_ops(small)
    assert "convolution_backward" in _weight_gradient_ops(small + 1)
    x, weight = torch.randn(2, 4, 2, 2), torch.randn(4, 1, 3, 3, requires_grad=True)
    with torch.no_grad():  # outside autograd it is plain F.conv2d
        assert conv2d(x, weight, None, (1, 1), (1, 1), (1, 1), 4).grad_fn is None


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2"])
def test_models_switch_their_depthwise_layers_and_train_the_same(name):
    torch.manual_seed(0)
    model = create_model(name, 10, weights="none" if name != "efficientnet_lite0" else "DEFAULT").double()
    switched = [m for m in model.modules() if type(m).__name__ == "_FastGradConv2d"]
    assert len(switched) >= 10
    reference = create_model(name, 10, weights="none" if name != "efficientnet_lite0" else "DEFAULT").double()
    reference.load_state_dict(model.state_dict())
    for module in reference.modules():  # back to plain nn.Conv2d: PyTorch's own gradients
        if type(module).__name__ == "_FastGradConv2d":
            module.__class__ = nn.Conv2d
    model.eval(), reference.eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    for net in (model, reference):
        net.zero_grad()
        net(x).square().mean().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    assert fast_depthwise_grads(model) == 0  # already switched: idempotent
