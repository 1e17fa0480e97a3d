"""Writes the column reference of docs/API.md from gradprobe/tables/schema.py (names, dtypes, comments).

    python docs/make_api.py > /tmp/cols.md   # then paste between the markers in docs/API.md
"""

import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from gradprobe.tables.schema import TABLES  # noqa: E402

SRC = (pathlib.Path(__file__).resolve().parents[1] / "gradprobe" / "tables" / "schema.py").read_text().splitlines()
DTYPES = {"str": "text", "int64": "int", "Int64": "int or NA", "float64": "float (NaN: missing)", "bool": "bool", "boolean": "bool or NA",
          "object": "list"}


def comment(table: str, col: str) -> str:
    """The schema comment on the line that defines `col` in `table` (or on the lines just after it)."""
    inside = False
    for i, line in enumerate(SRC):
        if re.match(rf'\s*"{table}": {{', line):
            inside = True
        elif inside and re.match(r'\s*"\w+": {', line) and not line.strip().startswith(f'"{table}"'):
            break
        code = line.split("#", 1)[0]
        keys = re.findall(r'"(\w+)":', code)
        if inside and keys and keys[-1] == col and "#" in line:
            text = line.split("#", 1)[1].strip()
            for more in SRC[i + 1:i + 3]:
                if more.strip().startswith("#"):
                    text += " " + more.strip()[1:].strip()
                else:
                    break
            return text
    return BASIC.get(col, "")


BASIC = {
    "step": "step number, from 0 (see README: Steps)", "backward": "backward call number, unique in the run",
    "param": "qualified parameter name (`fc1.weight`; `G.fc1.weight` with a dict of models)",
    "module": "qualified module name (`\"\"`: the root module)",
    "status": "`flow`, `zero`, `nonfinite`, `none`, `frozen`",
    "cause": "why `none`: `detach`, `data`, `no_grad`, `non_differentiable`, `to_python`, `requires_grad_false`, "
             "`reentrant_checkpoint`, `not_in_graph`, `not_used`",
    "site": "`FILE:LINE` in the user's code", "grad_norm": "norm of the gradient the optimizer steps with",
    "kind": "see Values below", "upstream": "trainable tensors the cut tensor depended on",
    "effective": "a backward of the same step would have reached them through it", "op": "the op",
    "nbytes": "bytes", "freed_by": "`backward`, `retained`, `graph_dropped`, `alive`",
    "retain_graph": "backward called with retain_graph=True", "saved_bytes": "bytes saved for it (NA: not sampled)",
    "retained_bytes": "saved bytes still held after it because of retain_graph=True",
    "t": "seconds since the probe was made", "event": "timeline event", "live_saved_bytes": "saved bytes held then",
    "rss_bytes": "process resident set size", "cuda_allocated_bytes": "torch.cuda.memory_allocated()",
    "severity": "`error`, `warning`, `info`", "message": "what happened, where, and the fix",
}


def main() -> None:
    for table, cols in TABLES.items():
        print(f"### `{table}`\n\n| column | type | meaning |\n| --- | --- | --- |")
        for col, dtype in cols.items():
            text = comment(table, col).replace("|", "\\|")
            print(f"| `{col}` | {DTYPES.get(dtype, dtype)} | {text} |")
        print()


if __name__ == "__main__":
    main()
