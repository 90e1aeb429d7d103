"""Every ```bash, ```sh and ```python block of README.md runs here, in README order: one test each.

The design, in the order a reader meets it:

- One scratch directory (a pytest tmp dir) stands for the reader's checkout. The blocks run there
  top to bottom, so the `bundle/` that "Export" writes is the one "Serving" serves. It holds
  symlinks to the repository parts that README's commands name from the repository root
  (`REPO_LINKS`: `export/` for `cmake -S export/cpp`, `scripts/`, `examples/`, the Triton venv);
  whatever a block writes (bundle/, build/, in/, out-*) stays in the scratch directory, and the
  last test checks that none of it appeared in the repository.
- Each block runs as `bash -e -o pipefail -c CODE` (```bash, ```sh) or `python -c CODE`
  (```python) in a process group of its own, with the venv running pytest first on PATH, under a
  timeout; the group is killed afterwards. Error messages give README.md's line numbers. A
  failure names the block's line and section, the block, and the tail of its output.
- Markers, an HTML comment on the line right before the opening fence (see README.md's source):
  `<!-- readme-test: skip: REASON -->`: the block cannot run here; a pytest skip with that
  reason (`-ra` lists them). Nothing else skips: a block that cannot run and says nothing fails.
  `<!-- readme-test: background: URL -->`: a server run in the foreground, as a reader starts it
  in a second terminal. It runs in the background until URL answers 200; it is stopped (SIGTERM,
  then SIGKILL, to its process group) when the run reaches a block under another heading.
- Ports: README's 8000, 8001 and 8002 (HTTP, gRPC, metrics) are replaced, in every block, by
  three consecutive loopback ports free at the start of the session.
- `pytest -k L347` runs the block at README.md line 347: the blocks above it run first (as setup,
  not as tests), since a reader would have run them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from readme_blocks import Block, BlockFailed, Session, read_blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# What README's commands name relative to the repository root, linked into the scratch directory.
REPO_LINKS = ("export", "scripts", "examples", ".venv-triton")
BLOCKS = read_blocks(README)
# Set in every block's environment: README's `python -m pytest`, run inside a block, must not run
# README's blocks again inside itself.
NESTED = "LSTM_DEPLOY_README_BLOCK"

if os.environ.get(NESTED):
    pytest.skip(
        f"inside README.md's block at line {os.environ[NESTED]}: its blocks run in the outer pytest",
        allow_module_level=True,
    )


class Reader:
    """The session plus what happened to each block so far (index -> failure report or None)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.outcomes: dict[int, str | None] = {}

    def run_through(self, index: int) -> None:
        """Run every block up to ``index`` not run yet; fail the test if block ``index`` fails."""
        for i, block in enumerate(BLOCKS[: index + 1]):
            if i in self.outcomes or block.skip is not None:
                continue
            self.session.env[NESTED] = str(block.line)
            try:
                self.session.run(block)
                self.outcomes[i] = None
            except BlockFailed as e:
                self.outcomes[i] = str(e)
        failure = self.outcomes[index]
        if failure is not None:
            earlier = [BLOCKS[i].line for i, f in self.outcomes.items() if f and i < index]
            if earlier:
                failure += f"\n(earlier blocks failed too, at README.md lines {earlier})"
            pytest.fail(failure, pytrace=False)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("readme")
    for name in REPO_LINKS:
        if (ROOT / name).exists():
            (workdir / name).symlink_to(ROOT / name)
    return workdir


@pytest.fixture(scope="module")
def reader(scratch: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["VIRTUAL_ENV"] = sys.prefix
    session = Session(scratch, tmp_path_factory.mktemp("readme-logs"), env)
    yield Reader(session)
    session.leave_section(None)


@pytest.fixture(scope="module")
def repository_before() -> set[str]:
    return {p.name for p in ROOT.iterdir()}


def _param(index: int, block: Block) -> object:
    marks = [pytest.mark.skip(reason=f"README.md:{block.line}: {block.skip}")] if block.skip else []
    return pytest.param(index, id=block.id, marks=marks)


@pytest.mark.parametrize("index", [_param(i, b) for i, b in enumerate(BLOCKS)])
def test_block(index: int, reader: Reader, repository_before: set[str]) -> None:
    reader.run_through(index)


def test_blocks_left_the_repository_clean(scratch: Path, repository_before: set[str]) -> None:
    written = {p.name for p in scratch.iterdir()} - set(REPO_LINKS)
    leaked = {name for name in written if (ROOT / name).exists()} - repository_before
    assert not leaked, f"README blocks wrote into the repository root: {sorted(leaked)}"


def test_the_runner_reads_blocks_and_markers(tmp_path: Path) -> None:
    # The runner's own contract, on a small Markdown file.
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n```sh\necho one\n```\n\n## Two `words`\n\n"
        "<!-- readme-test: skip: needs a Docker engine -->\n```bash\ndocker ps\n```\n"
        "<!-- readme-test: background: http://127.0.0.1:8000/v2 -->\n```bash\nserve\n```\n"
        "````\n```python\nnot a block: inside a 4-backtick fence\n```\n````\n"
        "```\nplain text, not run\n```\n```python\nprint(2)\n```\n"
    )
    blocks = read_blocks(page)
    assert [(b.line, b.language, b.section, b.code) for b in blocks] == [
        (3, "bash", "Title", "echo one\n"),
        (10, "bash", "Two words", "docker ps\n"),
        (14, "bash", "Two words", "serve\n"),
        (25, "python", "Two words", "print(2)\n"),
    ]
    assert blocks[1].skip == "needs a Docker engine" and blocks[1].ready_url is None
    assert blocks[2].ready_url == "http://127.0.0.1:8000/v2" and blocks[2].skip is None
    assert blocks[1].id == "L10-two-words"
    assert blocks[3].padded().splitlines()[25] == "print(2)"  # line 26 runs as line 26
    page.write_text("<!-- readme-test: skip: why -->\n```\nplain\n```\n")
    with pytest.raises(ValueError, match=r"page\.md:2: a readme-test marker before a ```"):
        read_blocks(page)
    page.write_text("<!-- readme-test: skip: why -->\n\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match=r"page\.md:1: a readme-test marker must be right before"):
        read_blocks(page)
