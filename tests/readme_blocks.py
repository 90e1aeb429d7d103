"""README.md's code blocks as a script: find them, run them in order, report a failure by line.

`tests/test_readme.py` explains the design and turns every block into a test; this module holds
the two parts that do not need pytest:

- `read_blocks(path)`: every fenced ```bash, ```sh and ```python block, with its line, section
  and the marker comment right before it, if any (`MARKER` below).
- `Session`: one scratch directory in which the blocks run in README order, each as its own
  process group (`bash -e -o pipefail -c CODE` or `python -c CODE`) under a timeout, with
  background servers stopped when the reader moves on to the next heading.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

LANGUAGES = {"bash": "bash", "sh": "bash", "python": "python"}
# `<!-- readme-test: skip: REASON -->` or `<!-- readme-test: background: READY_URL -->`, on the
# line right before the opening fence.
MARKER = re.compile(r"^<!--\s*readme-test:\s*(skip|background):\s*(.+?)\s*-->\s*$")
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
# The ports README.md's servers and clients name (HTTP, gRPC, metrics); each block runs with
# them replaced by three free consecutive loopback ports, the same ones for the whole session.
README_PORTS = (8000, 8001, 8002)
BLOCK_TIMEOUT_S = 600
READY_TIMEOUT_S = 180
STOP_TIMEOUT_S = 20
TAIL_LINES = 60


@dataclass(frozen=True)
class Block:
    """One fenced code block of README.md."""

    line: int  # of the opening fence, 1-based
    language: str  # "bash" or "python": how it runs
    section: str  # the nearest heading above it
    code: str
    skip: str | None = None  # the reason a marker gives
    ready_url: str | None = None  # a background block: the URL that answers once it serves

    @property
    def id(self) -> str:
        """`L347-on-one-machine-lstm-deploy-triton`: `pytest -k L347` picks the block."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")
        return f"L{self.line}-{slug}"

    def padded(self) -> str:
        """The code, after as many blank lines as put its first line where README.md has it:
        bash's and Python's error messages then give README.md's line numbers."""
        return "\n" * self.line + self.code


def read_blocks(path: Path) -> list[Block]:
    """Every bash, sh and python block of the Markdown file at ``path``, in order.

    Raises ValueError for a marker that is not followed by a runnable block, or a fence left open.
    """
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    section = "top"
    i = 0
    while i < len(lines):
        if heading := HEADING.match(lines[i]):
            section = heading.group(2).replace("`", "")
        marker = MARKER.match(lines[i])
        if marker and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
            raise ValueError(
                f"{path.name}:{i + 1}: a readme-test marker must be right before a ```"
            )
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        ticks, language = fence.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == ticks), None)
        if end is None:
            raise ValueError(f"{path.name}:{i + 1}: the code block is never closed")
        before = MARKER.match(lines[i - 1]) if i > 0 else None
        if language in LANGUAGES:
            kind, value = before.groups() if before else (None, None)
            blocks.append(
                Block(
                    line=i + 1,
                    language=LANGUAGES[language],
                    section=section,
                    code="\n".join(lines[i + 1 : end]) + "\n",
                    skip=value if kind == "skip" else None,
                    ready_url=value if kind == "background" else None,
                )
            )
        elif before:
            raise ValueError(f"{path.name}:{i + 1}: a readme-test marker before a ```{language}")
        i = end + 1
    return blocks


def free_ports(count: int) -> tuple[int, ...]:
    """``count`` consecutive loopback ports that are free now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + count > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return tuple(range(first, first + count))
    raise RuntimeError(f"found no {count} consecutive free loopback ports")


class BlockFailed(Exception):
    """A block that exited non-zero, timed out, or (background) never became ready."""


@dataclass
class _Background:
    block: Block
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class Session:
    """Runs blocks in one scratch directory (``workdir``), logs beside it (``logs``).

    ``env`` is the environment every block gets; ``ports`` replace README_PORTS in the code.
    """

    workdir: Path
    logs: Path
    env: dict[str, str]
    ports: tuple[int, ...] = field(default_factory=lambda: free_ports(len(README_PORTS)))
    _background: list[_Background] = field(default_factory=list)

    def code_to_run(self, block: Block) -> str:
        code = block.padded()
        for readme_port, port in zip(README_PORTS, self.ports, strict=True):
            code = re.sub(rf"\b{readme_port}\b", str(port), code)
        return code

    def _command(self, block: Block) -> list[str]:
        code = self.code_to_run(block)
        if block.language == "python":
            return ["python", "-c", code]
        return ["bash", "-e", "-o", "pipefail", "-c", code]

    def _start(self, block: Block, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(
                self._command(block),
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group of its own, to stop it whole
            )

    def run(self, block: Block) -> None:
        """Run ``block`` to its end (a background block: until it serves); BlockFailed if not."""
        self.leave_section(block.section)
        log = self.logs / f"{block.id}.log"
        started = time.monotonic()
        process = self._start(block, log)
        if block.ready_url is not None:
            self._background.append(_Background(block, process, log))
            self._wait_ready(block, process, log, started)
            return
        try:
            code = process.wait(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _stop_group(process)
        took = time.monotonic() - started
        if code is None:
            raise BlockFailed(self.report(block, f"did not finish within {BLOCK_TIMEOUT_S} s", log))
        if code != 0:
            raise BlockFailed(self.report(block, f"exited {code} after {took:.1f} s", log))

    def _wait_ready(
        self, block: Block, process: subprocess.Popen[bytes], log: Path, started: float
    ) -> None:
        assert block.ready_url is not None
        url = self.code_to_run(Block(0, "bash", "", block.ready_url)).strip()
        while time.monotonic() - started < READY_TIMEOUT_S:
            if process.poll() is not None:
                why = f"exited {process.returncode} before {url} answered"
                raise BlockFailed(self.report(block, why, log))
            if _answers(url):
                return
            time.sleep(0.2)
        raise BlockFailed(
            self.report(block, f"{url} did not answer within {READY_TIMEOUT_S} s", log)
        )

    def leave_section(self, section: str | None) -> None:
        """Stop the background servers of every section but ``section`` (None: all of them)."""
        keep = []
        for bg in self._background:
            if bg.block.section == section:
                keep.append(bg)
            else:
                _stop_group(bg.process)
        self._background = keep

    def report(self, block: Block, what: str, log: Path) -> str:
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            lines = ["(no output)"]
        ports = ", ".join(f"{a} -> {b}" for a, b in zip(README_PORTS, self.ports, strict=True))
        return (
            f"README.md:{block.line} ({block.section}): the {block.language} block {what}\n"
            f"--- the block (run in {self.workdir}, ports {ports}) ---\n{block.code}"
            f"--- its output, last {TAIL_LINES} lines (all of it: {log}) ---\n"
            + "\n".join(lines[-TAIL_LINES:])
        )


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(url, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the block's process group (servers shut down cleanly), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(process.pid):
            return
        time.sleep(0.5)  # the leader has exited; give the rest of the group a moment
        if not _group_alive(process.pid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
