"""GAN on 2-D points: the discriminator step trains on G(z).detach().

The detach is deliberate (the discriminator must not update the generator), and
gradprobe lists it as such. The epoch loss is accumulated without .item(), which
keeps every step's graph alive until the epoch ends.
"""

import torch
from torch import nn

import gradprobe as gp


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 2)

    def forward(self, z):
        return self.fc2(torch.relu(self.fc1(z)))


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(2, 32)
        self.fc2 = nn.Linear(32, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def main(steps: int = 20) -> gp.Probe:
    torch.manual_seed(0)
    G, D = Generator(), Discriminator()
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3)
    bce = nn.BCEWithLogitsLoss()
    probe = gp.Probe({"G": G, "D": D})
    d_epoch_loss = 0.0
    with probe:
        for step in range(steps):
            real = torch.randn(64, 2) * 0.5 + 2.0
            z = torch.randn(64, 8)
            fake = G(z)
            # discriminator step: fake.detach() keeps the generator out of it
            d_loss = bce(D(real), torch.ones(64, 1)) + bce(D(fake.detach()), torch.zeros(64, 1))
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            d_epoch_loss += d_loss  # should be d_loss.item(): keeps every step's graph alive
            # generator step
            g_loss = bce(D(fake), torch.ones(64, 1))
            opt_g.zero_grad()
            g_loss.backward()
            opt_g.step()
            probe.step()
    print(probe.summary())
    return probe


if __name__ == "__main__":
    main()
