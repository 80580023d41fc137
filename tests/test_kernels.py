"""Fast kernels against their plain references."""
import torch

from dsv3.kernels.grouped import grouped_mm, grouped_mm_reference


def test_grouped_mm_forward_and_backward_match_reference():
    torch.manual_seed(0)
    E, I, O = 5, 16, 24  # _grouped_mm needs 16-byte aligned strides
    counts = torch.tensor([3, 0, 6, 1, 0])
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(int(counts.sum()), I, requires_grad=True)
    w = torch.randn(E, I, O, requires_grad=True)
    g = torch.randn(int(counts.sum()), O)
    y = grouped_mm(x, w, offsets)
    (y * g).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y_ref = grouped_mm_reference(x, w, offsets)
    (y_ref * g).sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-6)
    assert torch.allclose(gx, x.grad, atol=1e-5)
    assert torch.allclose(gw, w.grad, atol=1e-5)
    assert torch.equal(gw[1], torch.zeros(I, O))  # an empty group gets an exact zero gradient
