# Adapted from pytorch/examples time_sequence_prediction/train.py and generate_sine_wave.py
# (BSD 3-Clause License, Copyright (c) 2017, Pytorch contributors). See tests/examples/LICENSE.
# Changes: no argparse/matplotlib/traindata.pt: the sine waves of generate_sine_wave.py are made
# in memory, smaller (N=5, L=8) and from the torch seed; LBFGS max_iter 2; future 4 instead of
# 1000; no plots; `run(wrap, steps)` runs `steps` LBFGS steps under `with wrap(seq):`.
from __future__ import print_function
import torch
import torch.nn as nn
import torch.optim as optim
import numpy as np

from tests.identical import collect


class Sequence(nn.Module):
    def __init__(self):
        super(Sequence, self).__init__()
        self.lstm1 = nn.LSTMCell(1, 51)
        self.lstm2 = nn.LSTMCell(51, 51)
        self.linear = nn.Linear(51, 1)

    def forward(self, input, future = 0):
        outputs = []
        h_t = torch.zeros(input.size(0), 51, dtype=torch.double)
        c_t = torch.zeros(input.size(0), 51, dtype=torch.double)
        h_t2 = torch.zeros(input.size(0), 51, dtype=torch.double)
        c_t2 = torch.zeros(input.size(0), 51, dtype=torch.double)

        for input_t in input.split(1, dim=1):
            h_t, c_t = self.lstm1(input_t, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs += [output]
        for i in range(future):# if we should predict the future
            h_t, c_t = self.lstm1(output, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs += [output]
        outputs = torch.cat(outputs, dim=1)
        return outputs


def generate_sine_wave(T=20, L=8, N=5):
    # generate_sine_wave.py, with the offsets drawn from torch's generator instead of numpy's
    x = np.empty((N, L), 'int64')
    x[:] = np.array(range(L)) + torch.randint(-4 * T, 4 * T, (N,)).numpy().reshape(N, 1)
    data = np.sin(x / 1.0 / T).astype('float64')
    return data


def run(wrap, steps=2, max_iter=2):
    """`steps` LBFGS steps (each calling the closure up to `max_iter` times) and a prediction after each."""
    # load data and make training set
    data = generate_sine_wave()
    input = torch.from_numpy(data[3:, :-1])
    target = torch.from_numpy(data[3:, 1:])
    test_input = torch.from_numpy(data[:3, :-1])
    test_target = torch.from_numpy(data[:3, 1:])
    # build the model
    seq = Sequence()
    seq.double()
    criterion = nn.MSELoss()
    # use LBFGS as optimizer since we can load the whole data to train
    optimizer = optim.LBFGS(seq.parameters(), lr=0.8, max_iter=max_iter)
    losses, test_losses, preds = [], [], []
    #begin to train
    with wrap(seq):
        for i in range(steps):
            print('STEP: ', i)
            def closure():
                optimizer.zero_grad()
                out = seq(input)
                loss = criterion(out, target)
                print('loss:', loss.item())
                losses.append(loss.item())
                loss.backward()
                return loss
            optimizer.step(closure)
            # begin to predict, no need to track gradient here
            with torch.no_grad():
                future = 4
                pred = seq(test_input, future=future)
                loss = criterion(pred[:, :-future], test_target)
                print('test loss:', loss.item())
                y = pred.detach().numpy()
            test_losses.append(loss.item())
            preds.append(torch.from_numpy(y.copy()))
    return collect(seq, optimizer, losses=losses, test_losses=test_losses, preds=preds)
