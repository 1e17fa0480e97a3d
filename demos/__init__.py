"""Runnable demos built on the mission's seed examples; `gradprobe demo NAME` runs one.

Each module has `main() -> gradprobe.Probe`: it trains, prints `probe.summary()`
and returns the probe. Run one directly with `python demos/NAME.py`.
"""

DEMOS = {
    "gan": "GAN: the discriminator step uses G(z).detach(); the epoch loss is accumulated without .item()",
    "detached_output": "a network whose forward returns x.detach(), so its loss cannot backward",
    "multihead": "frozen backbone, a head whose output never reaches the loss, and an argmax path",
    "retain_graph": "two losses with retain_graph=True on a 1000-500-100-10 network: unneeded vs shared graph",
    "validation": "a validation loop without torch.no_grad(): graphs built and never used",
    "inplace": ".data vs .detach() in-place writes to a tensor saved for backward",
}
DEFAULT = "gan"
