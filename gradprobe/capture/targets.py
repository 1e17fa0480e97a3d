"""What a probe observes: named modules and named trainable tensors.

Holds names, numbers and weak references only, so the probe keeps no tensor alive.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary


class Tracked:
    """One observed leaf tensor (a parameter or a loose/watched leaf)."""

    __slots__ = ("index", "name", "module", "ref", "numel", "kind")

    def __init__(self, index, name, module, tensor, kind):
        self.index, self.name, self.module, self.kind = index, name, module, kind
        self.ref = weakref.ref(tensor)
        self.numel = tensor.numel()


class ModuleInfo:
    __slots__ = ("name", "parent", "depth", "order", "n_params", "params", "ref", "type")

    def __init__(self, name, parent, depth, order, module):
        self.name, self.parent, self.depth, self.order = name, parent, depth, order
        self.type = type(module).__name__
        self.ref = weakref.ref(module)
        self.params: list[int] = []  # indices of Tracked directly or in children
        self.n_params = 0


class Targets:
    """Names for modules and leaves; `by_tensor` maps a live tensor to its Tracked entry."""

    def __init__(self) -> None:
        self.tracked: list[Tracked] = []
        self.by_tensor = WeakIdKeyDictionary()
        self.modules: list[ModuleInfo] = []
        self.by_id: dict[int, ModuleInfo] = {}  # id(module) -> ModuleInfo (checked against info.ref)
        self.leaf_names = WeakIdKeyDictionary()  # leaf tensor -> tensor@FILE:LINE
        self.leaf_by_name: dict[str, Tracked] = {}  # loose leaves found by backward walks
        self._anonymous = 0
        self._classes: dict[str, int] = {}
        self.on_new = None  # callback(Tracked) when a tensor starts being tracked
        self.lazy: list = []  # uninitialised parameters of lazy modules, waiting to be materialised

    def add_root(self, prefix: str, module: torch.nn.Module) -> None:
        """Register a model and all its sub-modules and parameters under `prefix`."""
        if self.info_of(module) is not None:
            return

        def full(qual):
            return ".".join(p for p in (prefix, qual) if p)

        local: dict[str, ModuleInfo] = {}  # qualified name inside this model -> info
        for qual, sub in module.named_modules(remove_duplicate=True):
            if self.info_of(sub) is not None:
                continue
            parent = full(qual.rpartition(".")[0]) if qual else None
            info = ModuleInfo(full(qual), parent, qual.count(".") + 1 if qual else 0, len(self.modules), sub)
            self.modules.append(info)
            self.by_id[id(sub)] = info
            local[qual] = info
        for qual, p in module.named_parameters(remove_duplicate=True):
            owner = qual.rpartition(".")[0]
            if _is_lazy(p):  # nn.LazyLinear before its first call: picked up once materialised
                self.lazy.append((weakref.ref(p), full(qual), full(owner), owner, local))
                continue
            self._add_param(p, full(qual), full(owner), owner, local)

    def _add_param(self, p, name, module_name, owner, local) -> None:
        t = self.track(p, name, module_name, "parameter")
        parts = owner.split(".") if owner else []
        for k in range(len(parts) + 1):  # the owner and its ancestors: O(depth), not O(modules)
            info = local.get(".".join(parts[:k]))
            if info is not None:
                info.params.append(t.index)
                info.n_params += t.numel

    def materialised(self) -> None:
        """Track lazy parameters that have been materialised since the last call."""
        if not self.lazy:
            return
        still = []
        for entry in self.lazy:
            p = entry[0]()
            if p is None:
                continue
            if _is_lazy(p):
                still.append(entry)
            else:
                self._add_param(p, *entry[1:])
        self.lazy = still

    def info_of(self, module) -> "ModuleInfo | None":
        """The module's info; a plain id lookup (hot path), guarded against id reuse."""
        info = self.by_id.get(id(module))
        return info if info is not None and info.ref() is module else None

    def discover(self, module: torch.nn.Module) -> None:
        """model=None: a top-level module seen running, named after its class."""
        from .dist import unwrap
        inner = unwrap(module)
        cls = type(inner).__name__
        k = self._classes.get(cls, 0) + 1
        self._classes[cls] = k
        name = cls if k == 1 else f"{cls}#{k}"
        if inner is not module:  # DDP runs first: known under its model's name, its model without `module.`
            info = ModuleInfo(name, None, 0, len(self.modules), module)
            self.modules.append(info)
            self.by_id[id(module)] = info
        self.add_root(name, inner)

    def track(self, tensor: torch.Tensor, name: str, module: str | None, kind: str) -> Tracked:
        t = self.by_tensor.get(tensor)
        if t is not None:
            return t
        t = Tracked(len(self.tracked), name, module, tensor, kind)
        self.tracked.append(t)
        self.by_tensor[tensor] = t
        if self.on_new is not None:
            self.on_new(t)
        return t

    def name_of(self, tensor: torch.Tensor) -> str:
        """The name of any leaf: tracked name, else tensor@FILE:LINE, else tensor#N."""
        t = self.by_tensor.get(tensor)
        if t is not None:
            return t.name
        name = self.leaf_names.get(tensor)
        if name is None:
            self._anonymous += 1
            name = f"tensor#{self._anonymous}"
            self.leaf_names[tensor] = name
        return name

    def track_leaf(self, tensor: torch.Tensor) -> Tracked:
        """A leaf reached by a backward (model=None). A new tensor made at the same line as a dead
        one (an input with requires_grad each step) takes over its entry, so entries do not pile up."""
        t = self.by_tensor.get(tensor)
        if t is not None:
            return t
        name = self.name_of(tensor)
        old = self.leaf_by_name.get(name)
        if old is not None and old.ref() is None:
            old.ref = weakref.ref(tensor)
            old.numel = tensor.numel()
            self.by_tensor[tensor] = old
            if self.on_new is not None:
                self.on_new(old)
            return old
        t = self.track(tensor, name, None, "leaf")
        self.leaf_by_name[name] = t
        return t


def _is_lazy(p) -> bool:
    return isinstance(p, torch.nn.parameter.UninitializedTensorMixin)
