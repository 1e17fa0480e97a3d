# Adapted from pytorch/examples reinforcement_learning/actor_critic.py
# (BSD 3-Clause License, Copyright (c) 2017, Pytorch contributors). See tests/examples/LICENSE.
# Changes: no argparse/gymnasium: a tiny deterministic CartPole-like environment (FakeCartPole,
# seeded from torch) instead of gym's CartPole-v1; `run(wrap, steps)` runs `steps` episodes of at
# most MAX_T environment steps under `with wrap(model):`; model/optimizer are module globals set
# by run(), as in the original's module-level code.
import argparse
import numpy as np
from itertools import count
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.distributions import Categorical

from tests.identical import collect

# Cart Pole

args = argparse.Namespace(gamma=0.99, seed=543, render=False, log_interval=1)
MAX_T = 6


class FakeCartPole:
    """Deterministic stand-in for gym's CartPole-v1: 4 floats of state, 2 actions, reward 1 per step."""

    class spec:
        reward_threshold = 475.0

    def reset(self, seed=None):
        self.t = 0
        self.state = (torch.rand(4, dtype=torch.float64) * 0.1 - 0.05).numpy()
        return self.state.copy(), {}

    def step(self, action):
        x, x_dot, theta, theta_dot = self.state
        force = 1.0 if action == 1 else -1.0
        x_dot = x_dot + 0.02 * force
        theta_dot = theta_dot + 0.05 * theta - 0.01 * force
        self.state = np.array([x + 0.02 * x_dot, x_dot, theta + 0.02 * theta_dot, theta_dot])
        self.t += 1
        terminated = bool(abs(self.state[2]) > 0.2 or abs(self.state[0]) > 2.4)
        truncated = self.t >= MAX_T
        return self.state.copy(), 1.0, terminated, truncated, {}


SavedAction = namedtuple('SavedAction', ['log_prob', 'value'])


class Policy(nn.Module):
    """
    implements both actor and critic in one model
    """
    def __init__(self):
        super(Policy, self).__init__()
        self.affine1 = nn.Linear(4, 128)

        # actor's layer
        self.action_head = nn.Linear(128, 2)

        # critic's layer
        self.value_head = nn.Linear(128, 1)

        # action & reward buffer
        self.saved_actions = []
        self.rewards = []

    def forward(self, x):
        """
        forward of both actor and critic
        """
        x = F.relu(self.affine1(x))

        # actor: choses action to take from state s_t
        # by returning probability of each action
        action_prob = F.softmax(self.action_head(x), dim=-1)

        # critic: evaluates being in the state s_t
        state_values = self.value_head(x)

        # return values for both actor and critic as a tuple of 2 values:
        # 1. a list with the probability of each action over the action space
        # 2. the value from state s_t
        return action_prob, state_values


env = model = optimizer = None  # set by run()
eps = np.finfo(np.float32).eps.item()
losses = []


def select_action(state):
    state = torch.from_numpy(state).float()
    probs, state_value = model(state)

    # create a categorical distribution over the list of probabilities of actions
    m = Categorical(probs)

    # and sample an action using the distribution
    action = m.sample()

    # save to action buffer
    model.saved_actions.append(SavedAction(m.log_prob(action), state_value))

    # the action to take (left or right)
    return action.item()


def finish_episode():
    """
    Training code. Calculates actor and critic loss and performs backprop.
    """
    R = 0
    saved_actions = model.saved_actions
    policy_losses = [] # list to save actor (policy) loss
    value_losses = [] # list to save critic (value) loss
    returns = [] # list to save the true values

    # calculate the true value using rewards returned from the environment
    for r in model.rewards[::-1]:
        # calculate the discounted value
        R = r + args.gamma * R
        returns.insert(0, R)

    returns = torch.tensor(returns)
    returns = (returns - returns.mean()) / (returns.std() + eps)

    for (log_prob, value), R in zip(saved_actions, returns):
        advantage = R - value.item()

        # calculate actor (policy) loss
        policy_losses.append(-log_prob * advantage)

        # calculate critic (value) loss using L1 smooth loss
        value_losses.append(F.smooth_l1_loss(value, torch.tensor([R])))

    # reset gradients
    optimizer.zero_grad()

    # sum up all the values of policy_losses and value_losses
    loss = torch.stack(policy_losses).sum() + torch.stack(value_losses).sum()

    # perform backprop
    loss.backward()
    optimizer.step()
    losses.append(loss.detach().clone())

    # reset rewards and action buffer
    del model.rewards[:]
    del model.saved_actions[:]


def main(episodes):
    running_reward = 10

    # run infinitely many episodes
    for i_episode in count(1):

        # reset environment and episode reward
        state, _ = env.reset()
        ep_reward = 0

        # for each episode, only run 9999 steps so that we don't
        # infinite loop while learning
        for t in range(1, 10000):

            # select action from policy
            action = select_action(state)

            # take the action
            state, reward, terminated, truncated, _ = env.step(action)

            model.rewards.append(reward)
            ep_reward += reward
            if terminated or truncated:
                break

        # update cumulative reward
        running_reward = 0.05 * ep_reward + (1 - 0.05) * running_reward

        # perform backprop
        finish_episode()

        # log results
        if i_episode % args.log_interval == 0:
            print(f'Episode {i_episode}\tLast reward: {ep_reward:.2f}\tAverage reward: {running_reward:.2f}')

        # check if we have "solved" the cart pole problem
        if running_reward > env.spec.reward_threshold:
            print(f"Solved! Running reward is now {running_reward} and "
                  f"the last episode runs to {t} time steps!")
            break
        if i_episode >= episodes:
            break
    return running_reward


def run(wrap, steps=3):
    """`steps` episodes; the environment, policy and optimizer are built from the current seed."""
    global env, model, optimizer, losses
    losses = []
    env = FakeCartPole()
    env.reset(seed=args.seed)
    model = Policy()
    optimizer = optim.Adam(model.parameters(), lr=3e-2)
    with wrap(model):
        running_reward = main(steps)
    return collect(model, optimizer, losses=list(losses), running_reward=running_reward)
