"""A multi-head model: a frozen backbone, a head whose output never reaches the
loss, and a path through argmax that carries no gradient."""

import torch
from torch import nn

import gradprobe as gp


class MultiHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32))
        self.heads = nn.ModuleDict({
            "main": nn.Linear(32, 4),
            "aux": nn.Linear(32, 4),  # computed, never used in the loss
            "router": nn.Linear(32, 3),  # its choice goes through argmax
        })
        self.experts = nn.Embedding(3, 4)

    def forward(self, x):
        h = self.backbone(x)
        main = self.heads["main"](h)
        aux = self.heads["aux"](h)
        choice = self.heads["router"](h).argmax(dim=-1)  # no gradient through argmax
        return main + self.experts(choice), aux


def main(steps: int = 5) -> gp.Probe:
    torch.manual_seed(0)
    model = MultiHead()
    model.backbone.requires_grad_(False)  # frozen backbone (pretrained)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    probe = gp.Probe(model)
    with probe:
        for step in range(steps):
            x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
            out, aux = model(x)
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(probe.summary())
    return probe


if __name__ == "__main__":
    main()
