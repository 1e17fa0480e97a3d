"""How cuts are named in findings: the cause a cut kind gives, and the code a user would write. No torch."""

from __future__ import annotations


def cause_of(kind: str) -> str:
    """The `cause` a cut gives a parameter it starved (API.md): `.detach_()` is a detach."""
    return "detach" if kind == "detach_" else kind


_CAUSE_LABEL = {"detach": ".detach()", "data": ".data", "no_grad": "torch.no_grad()/inference_mode",
                "non_differentiable": "a non-differentiable op", "to_python": "a conversion to Python",
                "requires_grad_false": "requires_grad_(False)",
                "reentrant_checkpoint": "a reentrant checkpoint(...) whose inputs do not require grad"}


def cut_label(kind: str, op: str | None) -> str:
    """How a user would write the cut: `.detach()`, `argmax()`, `.item()`..."""
    if kind == "non_differentiable" and op:
        return f"non-differentiable {op}()"
    if kind == "to_python" and op:
        return f".{op}()" if op in ("item", "tolist", "numpy") else f"{op}(tensor)"
    if kind == "no_grad" and op:
        return f"{op}() under torch.no_grad()/inference_mode"
    if kind == "detach_":
        return ".detach_()"
    return _CAUSE_LABEL.get(kind, kind)
