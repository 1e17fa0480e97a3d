"""Small real models shared by the tests."""

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in=6, hidden=8, d_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.heads = nn.ModuleDict({"main": nn.Linear(8, 3), "aux": nn.Linear(8, 3)})
        self.unused = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return self.heads["main"](h), self.heads["aux"](h)
