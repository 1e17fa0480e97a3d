"""Walks of the autograd graph and of call arguments (pure: they read, and write nothing but a memo in node
metadata)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

_UPSTREAM = "gradprobe.upstream"


def leaves(roots) -> list:
    """Leaf tensors (AccumulateGrad.variable) reachable from the roots' grad_fn."""
    seen, stack, out = set(), [r.grad_fn for r in roots if r.grad_fn is not None], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            out.append(var)
        stack.extend(n for n, _ in node.next_functions)
    return out


def upstream(tensor, name_of) -> frozenset:
    """Names of the leaves requiring grad that `tensor` depends on (memoised per node: each graph walked once)."""
    if tensor.grad_fn is None:
        return frozenset((name_of(tensor),)) if tensor.requires_grad else frozenset()
    root = tensor.grad_fn
    stack = [(root, False)]
    while stack:  # iterative post-order walk
        node, done = stack.pop()
        meta = node.metadata
        if _UPSTREAM in meta:
            continue
        children = [n for n, _ in node.next_functions if n is not None]
        if done:
            found = set()
            var = getattr(node, "variable", None)
            if var is not None:
                found.add(name_of(var))
            for c in children:
                found |= c.metadata.get(_UPSTREAM, frozenset())
            meta[_UPSTREAM] = frozenset(found)
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if _UPSTREAM not in c.metadata)
    return root.metadata[_UPSTREAM]


def newest_seq(roots):
    """The largest autograd sequence number among the roots' nodes (None: no node)."""
    seqs = [r.grad_fn._sequence_nr() for r in roots if getattr(r, "grad_fn", None) is not None]
    return max(seqs) if seqs else None


def tensors_in(obj, limit: int | None = None) -> list:
    """The tensors in `obj`, in order: a tensor, or inside tuples, lists and mappings (dicts, HF `ModelOutput`),
    nested; other objects (caches, configs) are not looked into. At most `limit` objects are looked at
    (None: all)."""
    found, stack, seen = [], [obj], 0
    while stack and (limit is None or seen < limit):
        o = stack.pop()
        seen += 1
        if isinstance(o, torch.Tensor):
            found.append(o)
        elif isinstance(o, (tuple, list)):
            stack.extend(reversed(o))
        elif isinstance(o, Mapping):
            stack.extend(reversed(list(o.values())))
    return found
