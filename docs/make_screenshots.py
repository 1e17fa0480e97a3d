"""Regenerate docs/report-<demo>.png: run each demo, write its report, screenshot it in headless Chromium.

    python docs/make_screenshots.py [DEMO ...]      (from the repository root; needs chromium)

docs/report-synthetic.png is the report of the synthetic run in tests/synthetic.py, which
exercises every figure (memory ones included) without torch. docs/readme.png, the README's image,
is a crop of the README demo's report: its findings and one figure, at a width a README shows
without shrinking the text.
"""

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ("multihead", "branches", 1000, 890)  # demo, figure, width, height of docs/readme.png


def crop(html: Path, figure: str) -> Path:
    """A copy of a report showing only its title, findings and one figure (CSS hides the rest)."""
    hide = (".meta,nav,#headline,#summary,#tables,#figures>h2,.modebar-container,"
            f".figure:not(#fig-{figure}){{display:none!important}} #findings h2{{margin-top:8px}}")
    out = html.with_name(f"{html.stem}-crop.html")
    out.write_text(html.read_text().replace("</head>", f"<style>{hide}</style></head>", 1))
    return out


def screenshot(html: Path, png: Path, height: int = 3400, width: int = 1400) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("chromium not installed: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size={width},{height}",
                        "--virtual-time-budget=10000", f"--screenshot={png}", html.as_uri()],
                       check=True, capture_output=True)
    print(f"wrote {png.relative_to(ROOT)}", file=sys.stderr)


def main(names: list[str]) -> None:
    os.chdir(ROOT)  # sites in the report are relative to the working directory
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    try:
        demos = importlib.import_module("gradprobe_demos")
        load = lambda n: importlib.import_module(f"gradprobe_demos.{n}")  # noqa: E731
    except ImportError:  # not installed: import the demo files directly
        sys.path.insert(0, str(ROOT / "demos"))
        demos = importlib.import_module("__init__")
        load = importlib.import_module  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or [n for n in demos.DEMOS if (ROOT / "demos" / f"{n}.py").exists()]:
            html = Path(tmp) / f"{name}.html"
            load(name).main().report(html)
            screenshot(html, DOCS / f"report-{name}.png")
            if name == README[0]:
                screenshot(crop(html, README[1]), DOCS / "readme.png", height=README[3], width=README[2])
        if not names:
            from gradprobe.output.report import write_report
            from synthetic import small_run
            html = Path(write_report(*small_run(), Path(tmp) / "synthetic.html"))
            screenshot(html, DOCS / "report-synthetic.png", height=5200)


if __name__ == "__main__":
    main(sys.argv[1:])
