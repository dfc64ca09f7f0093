"""What the fp8 autograd functions share."""
import torch


def refuse_double_backward(what: str) -> None:
    """Call first in an fp8 backward: that backward is not itself differentiable (its products
    are fp8 casts, which have no derivative), so a backward with ``create_graph=True`` is
    refused with what to do, instead of PyTorch's internal "no autograd formula" error."""
    if torch.is_grad_enabled():  # backward(create_graph=True) / autograd.grad(create_graph=True)
        raise RuntimeError(
            f"a second derivative through an fp8 {what} (backward with create_graph=True, e.g. a gradient "
            "penalty or a Hessian-vector product) is not supported: its backward products are fp8 casts, "
            "which have no derivative. Run the forward that you differentiate twice outside fp8 "
            "(inside fp8_autocast(enabled=False), or with a stock copy of the layer)")
