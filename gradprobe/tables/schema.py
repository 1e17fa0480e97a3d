"""Column names and dtypes of every table, so that recording, saving and loading agree.

Each table maps column -> pandas dtype. `str` columns hold None where missing,
`Int64` (nullable) is used for sizes and counts that can be missing, `float64`
for norms and times (NaN where missing), `object` for list-valued cells.
The first columns of each table are the ones ../shared/API.md promises.
"""

from __future__ import annotations

import pandas as pd

STR = "str"
INT = "int64"
NINT = "Int64"
FLOAT = "float64"
BOOL = "bool"
LIST = "object"

# The values a text column may hold (docs/API.md, "Values"); tests check every run against them.
STATUS = ("flow", "none", "zero", "nonfinite", "frozen")
CAUSE = ("detach", "data", "no_grad", "non_differentiable", "to_python", "requires_grad_false",
         "reentrant_checkpoint", "not_in_graph", "not_used")
CUT_KIND = ("detach", "detach_", "data", "no_grad", "requires_grad_false", "non_differentiable", "to_python",
            "reentrant_checkpoint")
SAVED_KIND = ("activation", "cast", "parameter", "buffer", "input")
FREED_BY = ("alive", "backward", "retained", "graph_dropped")  # in the order of capture/memlog's codes
EVENT = ("enter", "exit", "forward", "backward_begin", "backward_end", "step_end", "hooks_shadowed", "recompute",
         "memory_off", "now")
LEAK_CAUSE = ("carried", "accumulation", "create_graph", "retain_graph", "reference")
HOOKS = ("checkpoint", "save_on_cpu", "other")
SEVERITY = ("error", "warning", "info")
FINDING_KIND = ("no_gradient", "detach_cut", "backward_error", "nonfinite_grad", "nonfinite_weights",
                "amp_skipped_step", "inplace_saved", "retain_graph_unneeded", "retain_graph_avoidable",
                "graph_leak", "unused_graph", "saved_hooks_shadowed", "probe_limit", "ddp_unused",
                "ddp_ready_twice")
VALUES: dict[tuple[str, str], tuple[str, ...]] = {
    ("params", "status"): STATUS, ("params", "cause"): CAUSE, ("modules", "status"): STATUS,
    ("weights", "status"): STATUS, ("cuts", "kind"): CUT_KIND, ("saved", "kind"): SAVED_KIND,
    ("saved", "freed_by"): FREED_BY, ("memory", "event"): EVENT, ("memory", "leak_cause"): LEAK_CAUSE,
    ("memory", "hooks"): HOOKS,
    ("findings", "severity"): SEVERITY, ("findings", "kind"): FINDING_KIND,
}

TABLES: dict[str, dict[str, str]] = {
    "params": {
        "step": INT, "backward": INT, "param": STR, "module": STR, "status": STR,
        "cause": STR, "site": STR, "grad_norm": FLOAT,
        "grad_maxabs": FLOAT,  # max |g| of this backward's contribution
        "arrival": FLOAT,  # order in which gradients arrived in this backward (NaN: none)
        "numel": INT, "kind": STR,  # kind: parameter | leaf
    },
    "modules": {
        "step": INT, "backward": INT, "module": STR, "status": STR, "grad_norm": FLOAT,
        "saved_bytes": NINT,  # bytes its forward saved for this backward's graph (NA: memory not tracked)
        "type": STR,  # class name, e.g. Linear
        "parent": STR, "depth": INT, "order": INT,  # order: position in the module tree (named_modules)
        "n_params": INT,  # parameters (numel) directly and in children
        "params_flow": INT, "params_zero": INT, "params_nonfinite": INT,
        "params_none": INT, "params_frozen": INT,
    },
    "cuts": {
        "step": INT, "kind": STR, "site": STR, "module": STR, "upstream": LIST,
        "effective": BOOL,
        "cut": INT,  # id of the cut, unique in the run
        "op": STR,  # the torch function that cut (detach, argmax, item, ...)
        "count": INT,  # times this site cut in this step (rows are one per step x site x kind)
        "backward": NINT,  # first backward it was effective for
    },
    "saved": {
        "step": INT, "module": STR, "op": STR, "nbytes": INT, "kind": STR, "freed_by": STR,
        # freed_by may also be `retained`: a backward used it with retain_graph=True, released later
        "func": STR,  # the torch function called (linear, cross_entropy...); op is the grad_fn that saved it
        "param": STR,  # parameter name when kind is parameter
        "shape": STR, "dtype": STR, "device": STR,  # shape as "64x512"
        "storage": NINT,  # id of the storage record: rows with the same id share their bytes
        "storage_bytes": NINT,  # whole storage size (nbytes is it for the first row of a storage, else 0)
        "view_bytes": NINT,  # size of the saved view itself (a small view can hold a big storage)
        "alloc_bytes": NINT,  # CUDA: nbytes rounded up to the allocator's 512-byte blocks
        "graph": NINT,  # id of the forward (graph) that saved it
        "site": STR,  # line of that forward's root call
        "t_saved": FLOAT, "t_freed": FLOAT,  # seconds since the probe was made (t_freed NaN: alive)
        "backward": NINT, "last_backward": NINT,  # first / last backward that used it (NA: none)
        "inplace_site": STR,  # line that wrote in place into it while it was saved
        "inplace_kind": STR,  # data: autograd cannot see it (silently wrong); version: PyTorch raises
        "inplace_backward": NINT,  # first backward that used it after that write
    },
    "backward": {
        "step": INT, "backward": INT, "site": STR, "retain_graph": BOOL,
        "saved_bytes": NINT, "retained_bytes": NINT,
        "create_graph": BOOL,
        "api": STR,  # tensor.backward / autograd.backward / autograd.grad
        "t": FLOAT, "duration": FLOAT,
        # counts of tracked tensors by status; missing when grads are not tracked (zero and
        # nonfinite also off detail steps, where arrival is noted but nothing is measured)
        "params_flow": NINT, "params_none": NINT, "params_zero": NINT,
        "params_nonfinite": NINT, "params_frozen": NINT,
        "error": STR,  # PyTorch's message when the backward raised
        "detail": BOOL,  # a detail step of the schedule: norms, per-parameter rows, cuts, saved tensors
        "cut_kind": STR, "cut_site": STR,  # the cut its roots depend on (kind; description with site)
        "reused_by": NINT,  # retain_graph=True: first later backward that went through the retained graph
        "retained_until": FLOAT,  # when the retained bytes were released (NaN: still alive)
        "released_by": STR,  # what released them: "backward N", "graph dropped in step S ...", "alive"
        "retain_saving_bytes": NINT,  # how much lower the saved-bytes peak would have been while the graph
        # was retained, had this backward released it
        "retain_peak_saving_bytes": NINT,  # the same for the peak of the whole recording
        "opt_steps": NINT,  # optimizer steps (GradScaler skips included) taken before this backward began
        "grads_changed": BOOL,  # after a retain_graph=True backward: the gradients were zeroed, set to
        # None or changed in place (zero_grad, clipping) before this backward began; False otherwise
        "freed_graph": NINT,  # it failed on a freed graph: the graph (saved table `graph`) it reached whose
        # saved tensors an earlier backward had freed
        "carried_site": STR,  # the forward root call whose graph was given a tensor of that freed graph
    },
    "memory": {
        "t": FLOAT, "step": INT, "event": STR, "live_saved_bytes": INT,
        "rss_bytes": NINT, "cuda_allocated_bytes": NINT,
        # event: enter, exit, forward, backward_begin, backward_end, step_end, hooks_shadowed, memory_off, now
        "live_activation_bytes": NINT,  # live saved bytes of kind activation
        "counterfactual_saved_bytes": NINT,  # live saved bytes had each graph been freed at its first backward
        "peak_saved_bytes": NINT, "peak_counterfactual_bytes": NINT,  # peaks since the previous row (exact)
        "cuda_peak_bytes": NINT,  # torch.cuda.max_memory_allocated() (since the process or last reset)
        "backward": NINT, "site": STR, "note": STR,
        "leaked_graphs": NINT, "leaked_nodes": NINT,  # step_end: graphs of earlier steps still alive
        "leaked_bytes": NINT,  # their saved bytes (activations and inputs)
        "leak_site": STR, "leak_cause": STR,  # accumulation (op joining steps) | retain_graph | reference
        "hooks": STR,  # hooks_shadowed: whose saved_tensors_hooks took the tensors: checkpoint | save_on_cpu | other
    },
    "steps": {  # one row per finished step (and one per optimizer step a GradScaler skipped)
        "step": INT, "detail": BOOL,  # detail: the schedule captured this step in full
        "amp_skipped": BOOL,  # GradScaler found inf/NaN gradients and skipped the optimizer step
        "grad_scale": FLOAT,  # the scale after that skip (NaN: not a skip)
    },
    "weights": {  # parameters found NaN/Inf (checked when a detail backward finds non-finite gradients)
        "step": INT, "param": STR, "status": STR,
    },
    "limits": {  # what the probe could not see, one row per cause and place
        "step": INT,  # first step it happened
        "what": STR,  # torch.func | compile | thread | error
        "site": STR, "note": STR, "count": INT,
    },
    "findings": {
        "kind": STR, "severity": STR, "message": STR, "site": STR, "nbytes": NINT,
        "step": NINT,
        "params": LIST,  # parameters the finding is about
    },
    "dist": {  # the process group and the wrappers seen (one row per wrapper; empty in a single process)
        "rank": INT,  # this process's rank in the default process group
        "world_size": INT,  # number of ranks
        "backend": STR,  # gloo | nccl | ...
        "wrapper": STR,  # ddp | fsdp2 (missing: a process group without either)
        "find_unused_parameters": "boolean",  # DDP's flags as the wrapper was built (NA for FSDP2)
        "static_graph": "boolean",  # DDP's static_graph
        "gradient_as_bucket_view": "boolean",  # DDP's gradient_as_bucket_view
        "bucket_cap_mb": FLOAT,  # DDP's bucket size
    },
    "numerics": {  # first non-finite value, found by re-capturing the step after a non-finite gradient
        "step": INT, "phase": STR,  # forward | backward
        "module": STR, "type": STR, "op": STR, "site": STR,  # type: the module's class name
        "what": STR,  # nan | inf
        "inputs": STR,  # finite | nonfinite: whether the op's inputs were already NaN/Inf
    },
}


def conform(table: str, df: pd.DataFrame) -> pd.DataFrame:
    """Reapply the schema's dtypes to the columns `df` has (a table read from a file or concatenated from
    ranks), in place; text keeps its missing values on every pandas (pandas < 3's astype("str") would write
    them as "None")."""
    for c, dtype in TABLES.get(table, {}).items():
        if c in df.columns and str(df[c].dtype) != dtype:
            if dtype == STR:
                df[c] = pd.Series(df[c].where(df[c].notna(), None).tolist(), index=df.index, dtype=dtype)
            else:
                df[c] = df[c].astype(dtype)
    return df


def empty(table: str) -> pd.DataFrame:
    """An empty frame with the table's columns and dtypes."""
    return frame(table, [])


def frame(table: str, rows: list[dict] | dict[str, list]) -> pd.DataFrame:
    """Build a table from records (list of dicts) or columns (dict of lists).

    Columns missing from the records are filled with missing values; keys that
    the schema does not name are an error, so that tables never drift apart.
    """
    spec = TABLES[table]
    if isinstance(rows, dict):
        data = rows
        n = len(next(iter(rows.values()))) if rows else 0
    else:
        n = len(rows)
        data = {c: [r.get(c) for r in rows] for c in spec}
        extra = {k for r in rows for k in r} - set(spec)
        if extra:
            raise KeyError(f"table {table!r} has no column(s) {sorted(extra)}")
    out = {}
    for col, dtype in spec.items():
        values = data.get(col)
        if values is None:
            values = [None] * n
        if dtype == LIST:
            out[col] = pd.Series([list(v) if v is not None else [] for v in values], dtype=object)
        elif dtype == STR:
            out[col] = pd.Series(values, dtype="str")
        elif dtype == FLOAT:
            out[col] = pd.Series(values, dtype="float64")
        else:
            out[col] = pd.Series(values, dtype=dtype)
    return pd.DataFrame(out, index=pd.RangeIndex(n))
