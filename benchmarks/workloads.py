"""Training workloads for the overhead benchmark (COMPAT.md section D).

Each builder returns a `Workload`: the model the probe watches, the optimizer (None
where the training code has none), a `step()` closure that runs one full training
iteration (forward, loss, zero_grad, backward, optimizer step or manual update) and
returns the loss tensor, a label, and the default block size (iterations per timed
block) for the benchmark. Inputs are made once, up front, and cycled, so the timed
iterations contain training work only. A builder raises `Skip(reason)` when an
optional package is missing.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class Skip(Exception):
    """The workload cannot run here (an optional package is missing)."""


@dataclasses.dataclass
class Workload:
    model: nn.Module
    optimizer: Optional[torch.optim.Optimizer]
    step: Callable[[], torch.Tensor]
    label: str
    block: int = 10  # default iterations per timed block


def _cycle(items):
    state = {"i": 0}

    def nxt():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return item

    return nxt


def _standard_step(model, opt, nxt, loss_fn):
    def step():
        x, y = nxt()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return step


# --- MLP -------------------------------------------------------------------------------
def mlp() -> Workload:
    layers = []
    for _ in range(5):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = [(torch.randn(64, 512), torch.randn(64, 512)) for _ in range(8)]
    return Workload(model, opt, _standard_step(model, opt, _cycle(data), F.mse_loss),
                    "MLP 5 x (Linear(512)+ReLU), batch 64, SGD", block=10)


# --- CNN -------------------------------------------------------------------------------
def cnn() -> Workload:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    data = [(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))) for _ in range(8)]
    return Workload(model, opt, _standard_step(model, opt, _cycle(data), F.cross_entropy),
                    "CNN 2 x Conv + Linear, batch 32 of 3x32x32, SGD", block=10)


# --- torchvision resnet18 ----------------------------------------------------------------
def resnet18() -> Workload:
    try:
        import torchvision
    except ImportError:
        raise Skip("torchvision is not installed") from None
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    data = [(torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))) for _ in range(4)]
    return Workload(model, opt, _standard_step(model, opt, _cycle(data), F.cross_entropy),
                    "torchvision resnet18(num_classes=10), batch 8 of 3x64x64, SGD", block=4)


# --- HF GPT-2 ----------------------------------------------------------------------------
def gpt2() -> Workload:
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise Skip("transformers is not installed") from None
    transformers.logging.set_verbosity_error()
    config = GPT2Config(n_layer=2, n_embd=128, n_head=2, vocab_size=1000, n_positions=64)
    model = GPT2LMHeadModel(config)  # random init
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    nxt = _cycle([torch.randint(0, 1000, (8, 64)) for _ in range(4)])

    def step():
        ids = nxt()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return Workload(model, opt, step,
                    "HF GPT-2 (n_layer=2, n_embd=128, vocab 1000), batch 8 x 64 tokens, LM loss, AdamW",
                    block=5)


# --- LSTM language model (pytorch/examples word_language_model) ----------------------------
class RNNModel(nn.Module):
    """Encoder, LSTM, decoder: word_language_model/model.py with rnn_type='LSTM'."""

    def __init__(self, ntoken, ninp, nhid, nlayers, dropout=0.2):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nlayers, self.nhid = nlayers, nhid
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid),
                weight.new_zeros(self.nlayers, bsz, self.nhid))


def _repackage_hidden(h):
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(_repackage_hidden(v) for v in h)


def lstm_lm() -> Workload:
    ntokens, bptt, bsz, lr, clip = 1000, 35, 20, 20.0, 0.25
    model = RNNModel(ntokens, 200, 200, 2)
    model.train()
    criterion = nn.NLLLoss()
    # batchify(): a token stream laid out as (nbatch, bsz); get_batch() slices bptt rows
    train_data = torch.randint(0, ntokens, (bptt * 8 + 1, bsz))
    starts = list(range(0, train_data.size(0) - 1, bptt))
    nxt = _cycle(starts)
    state = {"hidden": model.init_hidden(bsz)}

    def step():
        i = nxt()
        seq_len = min(bptt, len(train_data) - 1 - i)
        data = train_data[i:i + seq_len]
        targets = train_data[i + 1:i + 1 + seq_len].reshape(-1)
        model.zero_grad()
        hidden = _repackage_hidden(state["hidden"])
        output, hidden = model(data, hidden)
        state["hidden"] = hidden
        loss = criterion(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        return loss

    return Workload(model, None, step,
                    "LSTM LM (word_language_model: emb 200, 2 x LSTM 200, vocab 1000), bptt 35, batch 20, "
                    "manual SGD", block=5)


# --- actor-critic (pytorch/examples reinforcement_learning/actor_critic.py) ------------------
class Policy(nn.Module):
    def __init__(self):
        super().__init__()
        self.affine1 = nn.Linear(4, 128)
        self.action_head = nn.Linear(128, 2)
        self.value_head = nn.Linear(128, 1)

    def forward(self, x):
        x = F.relu(self.affine1(x))
        action_prob = F.softmax(self.action_head(x), dim=-1)
        state_values = self.value_head(x)
        return action_prob, state_values


class FakeEnv:
    """CartPole-shaped stand-in: 4 random observation values, reward 1, `episode` steps."""

    def __init__(self, episode=20, seed=0):
        self.episode = episode
        self.gen = torch.Generator().manual_seed(seed)
        self.t = 0

    def reset(self):
        self.t = 0
        return torch.rand(4, generator=self.gen).tolist()

    def step(self, action):
        self.t += 1
        obs = torch.rand(4, generator=self.gen).tolist()
        return obs, 1.0, self.t >= self.episode


def actor_critic() -> Workload:
    gamma, eps = 0.99, torch.finfo(torch.float32).eps
    model = Policy()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)  # example: 3e-2; lower keeps long runs finite
    env = FakeEnv(episode=20)

    def step():  # one episode: 20 forwards at batch 1, then one backward and one Adam step
        saved_actions, rewards = [], []
        state, done = env.reset(), False
        while not done:
            probs, state_value = model(torch.tensor(state, dtype=torch.float32).unsqueeze(0))
            m = torch.distributions.Categorical(probs)
            action = m.sample()
            saved_actions.append((m.log_prob(action), state_value))
            state, reward, done = env.step(action.item())
            rewards.append(reward)
        R, returns = 0.0, []
        for r in rewards[::-1]:
            R = r + gamma * R
            returns.insert(0, R)
        returns = torch.tensor(returns)
        returns = (returns - returns.mean()) / (returns.std() + eps)
        policy_losses, value_losses = [], []
        for (log_prob, value), R in zip(saved_actions, returns):
            advantage = R - value.item()
            policy_losses.append(-log_prob * advantage)
            value_losses.append(F.smooth_l1_loss(value, torch.tensor([[R]])))
        opt.zero_grad()
        loss = torch.stack(policy_losses).sum() + torch.stack(value_losses).sum()
        loss.backward()
        opt.step()
        return loss

    return Workload(model, opt, step,
                    "actor-critic policy (Linear(4,128), heads 2+1), batch 1, 20 env steps/episode, Adam",
                    block=5)


# --- LSTMCell unrolled over 100 steps --------------------------------------------------------
class CellSeq(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(32, 64)
        self.head = nn.Linear(64, 1)

    def forward(self, xs):  # xs: (seq, batch, 32)
        h = xs.new_zeros(xs.size(1), 64)
        c = xs.new_zeros(xs.size(1), 64)
        outs = []
        for x in xs:
            h, c = self.cell(x, (h, c))
            outs.append(self.head(h))
        return torch.stack(outs)


def lstmcell() -> Workload:
    model = CellSeq()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = [(torch.randn(100, 4, 32), torch.randn(100, 4, 1)) for _ in range(4)]
    return Workload(model, opt, _standard_step(model, opt, _cycle(data), F.mse_loss),
                    "LSTMCell(32, 64) unrolled 100 steps, batch 4, one backward per sequence, SGD", block=5)


WORKLOADS = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet18": resnet18,
    "gpt2": gpt2,
    "lstm_lm": lstm_lm,
    "actor_critic": actor_critic,
    "lstmcell": lstmcell,
}


def tiny200() -> Workload:
    """200 parameters: 100 x Linear(8, 8) in a Sequential (for the host-memory check)."""
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(100)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = [(torch.randn(16, 8), torch.randn(16, 8)) for _ in range(8)]
    return Workload(model, opt, _standard_step(model, opt, _cycle(data), F.mse_loss),
                    "100 x Linear(8, 8) (200 parameters), batch 16, SGD", block=10)


def ddp_mlp() -> Workload:
    """The MLP inside DistributedDataParallel(find_unused_parameters=True) in a one-process gloo group: what the
    probe's DDP path costs (it compares every parameter's `.grad` before and after each backward). Not in
    WORKLOADS (it initialises a process group); `overhead.py --workloads ddp_mlp` runs it."""
    import socket

    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        raise Skip("torch.distributed with gloo is not available")
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    w = mlp()
    model = nn.parallel.DistributedDataParallel(w.model, find_unused_parameters=True)
    data = [(torch.randn(64, 512), torch.randn(64, 512)) for _ in range(8)]
    return Workload(model, w.optimizer, _standard_step(model, w.optimizer, _cycle(data), F.mse_loss),
                    "MLP 5 x (Linear(512)+ReLU) in DDP(find_unused_parameters=True), 1-process gloo, batch 64",
                    block=10)
