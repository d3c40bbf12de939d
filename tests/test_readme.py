"""The README's Python quickstart runs as written.

The block is the first ```python fence after the ``<!-- tested: tests/test_readme.py -->``
marker in README.md. It runs in a fresh interpreter, in a temporary folder (its
``tempfile.mkdtemp`` lands there too, through TMPDIR), as a user would paste it into a
notebook; its overrides keep it to a two-step run (about 10 s on 2 CPU cores, with other work running).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tested: tests/test_readme.py -->"


def quickstart_code(text: str) -> str:
    """The first ```python block after the marker."""
    start = text.index(MARKER)
    match = re.search(r"```python\n(.*?)```", text[start:], flags=re.DOTALL)
    assert match is not None, f"no ```python block after {MARKER} in README.md"
    return match.group(1)


def test_the_marker_finds_the_python_block():
    code = quickstart_code(README.read_text(encoding="utf-8"))
    assert "import tether" in code
    compile(code, "README.md", "exec")  # valid Python


def test_the_readme_python_quickstart_runs(tmp_path: Path):
    code = quickstart_code(README.read_text(encoding="utf-8"))
    env = {**os.environ, "TMPDIR": str(tmp_path), "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"the README's Python block failed:\n{done.stderr[-4000:]}"
    runs = list(tmp_path.glob("*/run/summary.json"))
    assert len(runs) == 1, "the example trains one run into a temporary folder"
    assert (runs[0].parent / "model" / "config.json").is_file()
    assert done.stdout.strip(), "the example prints its figures and samples"


# ----------------------------------------------------------------- the manual's cross-references

DOCS = [README, *sorted((README.parent / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(((?:[\w./-]+\.(?:md|png))?(?:#[\w-]+)?)\)")
MODULE_REF = re.compile(r"`(tether(?:\.[A-Za-z_]\w*)+)")


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated heading numbered."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M):
        slug = "".join(c for c in heading.strip().lower() if c.isalnum() or c in "-_ ")
        slug = slug.replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_link_of_the_readme_and_docs_resolves():
    broken = []
    for page in DOCS:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                if anchor not in heading_anchors(linked.read_text(encoding="utf-8")):
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_module_the_docs_name_exists():
    """`tether.x.y` in the README and docs names a module, or an attribute of one."""
    missing = []
    for page in DOCS:
        for name in set(MODULE_REF.findall(page.read_text(encoding="utf-8"))):
            if name == "tether.json":  # the checkpoint's metadata file, not a module
                continue
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    found: object = importlib.import_module(".".join(parts[:cut]))
                    break
                except ImportError:
                    continue
            for attr in parts[cut:]:
                found = getattr(found, attr, None)
            if found is None:
                missing.append(f"{page.name}: {name}")
    assert not missing, "\n".join(sorted(missing))
