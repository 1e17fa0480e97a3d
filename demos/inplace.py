"""In-place writes to a tensor that autograd saved for backward: `.data` vs `.detach()`.

sigmoid saves its output for backward. Zeroing that output through `.data` is invisible to
autograd and the gradients come out silently wrong; through `.detach()` PyTorch notices and
raises at backward. gradprobe names the line in both cases.
"""

import torch
from torch import nn

import gradprobe as gp


def main() -> gp.Probe:
    torch.manual_seed(0)
    layer = nn.Linear(3, 3)
    x = torch.randn(4, 3)

    with gp.Probe(layer) as probe:
        out = layer(x).sigmoid()
        c = out.data
        c.zero_()  # autograd cannot see this write
        out.sum().backward()
        print("after the .data write, layer.weight.grad is", layer.weight.grad.abs().sum().item(), "(wrong: zero)")
        layer.zero_grad()

        out = layer(x).sigmoid()
        c = out.detach()
        c.zero_()  # shares the version counter: backward will raise
        try:
            out.sum().backward()
        except RuntimeError as e:
            print("after the .detach() write, backward raised:", str(e).split(".")[0])

    print(probe.summary())
    return probe


if __name__ == "__main__":
    main()
