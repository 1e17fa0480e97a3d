"""Two losses with retain_graph=True on a 1000-500-100-10 network, and the verdict gradprobe gives each.

1. Steps 0-2: the second loss comes from a fresh forward, so no later backward goes through the first
   graph: retain_graph=True only keeps its saved tensors (about 600 KiB) alive until the graph is
   dropped. Finding: `retain_graph_unneeded` (warning) at the first backward, with the bytes it held
   and how much lower the peak of saved tensors would have been without it.
2. Steps 3-5: both losses come from one forward and their backwards run back to back, with no
   optimizer step, zero_grad or other work between them: the second backward does reuse the graph,
   but `(loss1 + loss2).backward()` gives the same gradients in one pass. Finding:
   `retain_graph_avoidable` (info).
A retain_graph=True that is needed (an optimizer step or zero_grad between the two backwards, or a
gradient penalty with create_graph=True) gives no finding.
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
