"""Two losses with retain_graph=True on a 1000-500-100-10 network.

First the second loss comes from a fresh forward, so retain_graph=True only keeps the
first graph alive for nothing; then both losses share one forward, where retain_graph
is needed but (loss1 + loss2).backward() would do the same in one pass.
"""

import torch
from torch import nn

import gradprobe as gp


def main() -> gp.Probe:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 500), nn.ReLU(), nn.Linear(500, 100), nn.ReLU(), nn.Linear(100, 10))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 1000)
    y = torch.randint(0, 10, (64,))

    with gp.Probe(model) as probe:
        # 1. the second loss comes from a new forward: retain_graph=True is not needed
        for step in range(3):
            out = model(x)
            loss1 = criterion(out, y)
            loss1.backward(retain_graph=True)
            out2 = model(x + 0.1 * torch.randn_like(x))
            loss2 = out2.pow(2).mean()
            loss2.backward()
            optimizer.step()
            optimizer.zero_grad()

        # 2. both losses come from the same forward: the second backward reuses the graph
        for step in range(3):
            out = model(x)
            loss1 = criterion(out, y)
            loss2 = out.pow(2).mean()
            loss1.backward(retain_graph=True)
            loss2.backward()
            optimizer.step()
            optimizer.zero_grad()

    print(probe.summary())
    return probe


if __name__ == "__main__":
    main()
