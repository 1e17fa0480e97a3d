"""A network whose forward returns x.detach(): its loss cannot backward.

PyTorch says "element 0 of tensors does not require grad and does not have a
grad_fn"; gradprobe says which line cut the graph.
"""

import torch
from torch import nn

import gradprobe as gp


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = self.fc2(x)
        return x.detach()  # the bug: the output leaves the graph


def main() -> gp.Probe:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = gp.Probe(model)
    with probe:
        x, y = torch.randn(32, 10), torch.randn(32, 1)
        loss = nn.functional.mse_loss(model(x), y)
        try:
            loss.backward()
            opt.step()
        except RuntimeError as e:
            print(f"PyTorch raised: {e}")
    print(probe.summary())
    return probe


if __name__ == "__main__":
    main()
