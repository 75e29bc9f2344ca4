"""The README is a front door that works: its runnable blocks run as written, it stays small, CI finds its commands.

A fenced block is runnable when the line before its opening fence is `<!-- runnable -->`, or
`<!-- runnable requires="DIST ..." -->` naming the installed distributions it needs (without one it is skipped, and
the skip names the missing package). Python blocks run in this interpreter (`sys.executable -c BLOCK`), bash blocks
with `bash -euo pipefail -c BLOCK`, from the repository root, with this interpreter's scripts folder first on PATH
(where pip put `eesd`); each must exit with status 0. Only cheap blocks are marked: never the install commands.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packages import installed

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_BYTES = 12 * 1024
RUNNABLE = re.compile(r'^<!-- runnable(?: requires="(?P<requires>[^"]*)")? -->$')
FENCE = re.compile(r"^```(?P<language>\w*)$")
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
TIMEOUT_S = {"python": 600, "bash": 120}  # python: the first load of a packaged model converts its GGUF (20-60 s)
EXTERNAL_CITATION = re.compile(r"DESIGN\.md|\.\./shared")
SKIPPED_DIRS = {".git", ".venv", "runs", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cfg", ".txt", ".json"}


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # of the opening fence, 1-based
    requires: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.language}-line-{self.line}"


def runnable_blocks(text: str) -> list[Block]:
    """The fenced blocks marked runnable, in order; a marker not followed by a fenced block is an error."""
    lines = text.splitlines()
    blocks = []
    for index, line in enumerate(lines):
        marker = RUNNABLE.match(line.strip())
        if not marker:
            continue
        fence = FENCE.match(lines[index + 1]) if index + 1 < len(lines) else None
        if not fence or not fence["language"]:
            raise ValueError(f"README.md:{index + 1}: a runnable marker must precede a fence naming its language")
        end = next((j for j in range(index + 2, len(lines)) if lines[j] == "```"), None)
        if end is None:
            raise ValueError(f"README.md:{index + 2}: the runnable block is never closed")
        requires = tuple((marker["requires"] or "").split())
        blocks.append(Block(fence["language"], "\n".join(lines[index + 2 : end]) + "\n", index + 2, requires))
    return blocks


def marked_command(text: str, marker: str) -> list[str]:
    """The lines of the fenced block between `<!-- marker -->` and `<!-- /marker -->`, as .ci/run extracts them."""
    match = re.search(rf"^<!-- {marker} -->\n```bash\n(?P<body>.*?)\n```\n<!-- /{marker} -->$", text, re.M | re.S)
    assert match, f"README.md has no fenced bash block between <!-- {marker} --> and <!-- /{marker} -->"
    return match["body"].splitlines()


BLOCKS = runnable_blocks(README.read_text(encoding="utf-8"))


def test_readme_stays_a_front_door() -> None:
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/ (limit {README_MAX_BYTES})"


def test_the_two_fresh_machine_commands_are_where_ci_reads_them() -> None:
    text = README.read_text(encoding="utf-8")
    main, tests = marked_command(text, "main-command"), marked_command(text, "test-command")
    assert len(main) == 1 and len(tests) == 1, "each command is one line"
    assert main[0].endswith("eesd simulate scenarios/quickstart.yaml") and "torch" not in main[0]
    assert ".[executor,test]" in tests[0] and tests[0].endswith("python -m pytest")
    figures = text.split("<!-- quickstart-figures -->\n", 1)
    assert len(figures) == 2 and figures[1].split("\n", 1)[0].strip(), "the quickstart's expected figures line"


def test_the_readme_marks_a_python_and_a_bash_block_runnable() -> None:
    assert {block.language for block in BLOCKS} >= {"python", "bash"}


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.name)
def test_runnable_block_runs_as_written(block: Block) -> None:
    missing = [dist for dist in block.requires if not installed(dist)]
    if missing:
        pytest.skip(f"README.md:{block.line} needs {', '.join(missing)}: pip install --no-deps {' '.join(missing)}")
    command = {"python": [sys.executable, "-c", block.code], "bash": ["bash", "-euo", "pipefail", "-c", block.code]}
    assert block.language in command, f"README.md:{block.line}: cannot run a {block.language!r} block"
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")  # the snippets decode a 135M model: one thread is the fastest on small boxes
    done = subprocess.run(
        command[block.language], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S[block.language]
    )
    assert done.returncode == 0, f"README.md:{block.line} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"


def documentation_files() -> list[Path]:
    docs = sorted((ROOT / "docs").rglob("*.md"))
    return [README, *docs, ROOT / "calibration" / "README.md", ROOT / "scenarios" / "README.md"]


def heading_anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (lowercase, punctuation dropped, spaces to hyphens)."""
    anchors, fenced = set(), False
    for line in doc.read_text(encoding="utf-8").splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (heading := re.match(r"#+ (.+)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("doc", documentation_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    targets = [m["target"] for m in LINK.finditer(doc.read_text(encoding="utf-8"))]
    broken = []
    for target in (t for t in targets if not re.match(r"[a-z]+:", t)):
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path) if path else doc
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked)):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files or headings: {broken}"


def project_text_files() -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info") and not d.startswith(".")]
        files += [Path(folder, name) for name in names if Path(name).suffix in TEXT_SUFFIXES]
    return files


def test_the_project_cites_no_file_outside_it() -> None:
    cited = [
        str(path.relative_to(ROOT))
        for path in project_text_files()
        if EXTERNAL_CITATION.search(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not cited, f"these files cite a document outside the project; restate it in docs/ instead: {cited}"


def test_the_quickstarts_expected_figures_are_what_it_prints() -> None:
    """The figures the README promises for its main command (AR's tok/s, EESD's and PPSD's speedups, as rounded
    there) are the simulator's: a change that moves them must move the README too."""
    from sim.runner import run_points
    from sim.scenario import load_points

    line = README.read_text(encoding="utf-8").split("<!-- quickstart-figures -->\n", 1)[1].split("\n", 1)[0]
    found = re.search(r"AR ≈ (\d+) tok/s, EESD ≈ ([\d.]+)× and PPSD ≈ ([\d.]+)× AR", line)
    assert found, line
    results = {
        item.result.method: item for item in run_points(load_points(ROOT / "scenarios/quickstart.yaml"), progress=False)
    }
    ar = results["ar"].result.tokens_per_s
    assert round(ar) == int(found[1])
    for method, promised in (("eesd", found[2]), ("ppsd", found[3])):
        speedup = results[method].result.tokens_per_s / results[method].baseline.tokens_per_s
        assert f"{speedup:.{len(promised.split('.')[1])}f}" == promised, (method, speedup)
