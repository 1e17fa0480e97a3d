"""A validation loop without torch.no_grad(): every validation forward builds a graph nobody uses."""

import torch
from torch import nn

import gradprobe as gp


def main() -> gp.Probe:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = [(torch.randn(32, 100), torch.randint(0, 10, (32,))) for _ in range(8)]
    val = [(torch.randn(128, 100), torch.randint(0, 10, (128,))) for _ in range(4)]

    with gp.Probe(model) as probe:
        for epoch in range(2):
            model.train()
            for x, y in train:
                loss = criterion(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

            model.eval()
            val_loss = 0.0
            for x, y in val:  # missing: with torch.no_grad():
                out = model(x)
                val_loss += criterion(out, y).item()
            print(f"epoch {epoch}: validation loss {val_loss / len(val):.3f}")

    print(probe.summary())
    return probe


if __name__ == "__main__":
    main()
