"""Was the machine quiet while bench ran? The load average, and the CPU time of other processes.

Bench's ratios come from one process with the backends interleaved, which holds under a steady
load but not under a neighbour: issue 14's README numbers came from a run where another process
slowed nn.LSTM (oneDNN's AVX-512 kernel) to 14.8 ms at B16 T128 H256, where it takes 7.3 ms on a
quiet machine, and slowed the other backends less. So bench records, around its whole run and
around each cell:

- the 1-minute load average at the start and at the end (/proc/loadavg; bench itself adds ~1);
- the CPU time of the other processes: the busy time of all CPUs (/proc/stat) minus bench's own,
  its finished children included (os.times: the peak-RSS children and the C++ programs are
  bench's work), in cores (CPU seconds per second of the run). Over the whole run also the sum
  of each other process's own CPU time (/proc/PID/stat), and the larger of the two counts: the
  first samples the CPUs at each tick and misses short bursts (kernel workers), the second misses
  processes that came and went between the samples;
- the CPU time the hypervisor stole (/proc/stat's steal): our virtual CPUs waiting for real ones;
- which other processes used the most (/proc/PID/stat), by name and pid.

More than LIMIT (a tenth of a core) of others' CPU or of steal, on average over the run, makes the
run noisy: bench warns on stderr and its report says so, with these figures. What this cannot see:
another virtual machine on the same physical core (beyond the steal it causes), or clock changes.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LIMIT = 0.10  # cores: others' CPU or steal above this, on average, makes a run noisy
TOP = 3  # the other processes named in the verdict

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Sample:
    """The counters at one moment (CPU times in seconds)."""

    wall: float  # time.monotonic()
    busy: float  # all CPUs, every process and the kernel: /proc/stat user..softirq
    steal: float  # all CPUs: /proc/stat steal
    ours: float  # this process and its finished (reaped) children: os.times()
    load: float  # 1-minute load average
    processes: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid: (name, CPU s)


def sample(processes: bool = False) -> Sample | None:
    """The counters now, with every process's CPU time if `processes`; None without /proc/stat
    (not Linux)."""
    try:
        words = Path("/proc/stat").read_text().splitlines()[0].split()
        load = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(w) for w in words[1:9])
    t = os.times()
    return Sample(
        wall=time.monotonic(),
        busy=(user + nice + system + irq + softirq) / _TICK,
        steal=steal / _TICK,
        ours=t.user + t.system + t.children_user + t.children_system,
        load=load,
        processes=_processes() if processes else {},
    )


def _processes() -> dict[int, tuple[str, float]]:
    """{pid: (name, user + system CPU seconds)} of every process but this one."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):  # gone meanwhile
            text = (entry / "stat").read_text()
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()  # from field 3, state
            found[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / _TICK)
    return found


@dataclass(frozen=True)
class Noise:
    """What others did between two samples; CPU in cores (CPU seconds per second)."""

    seconds: float
    others: float  # other processes' CPU
    steal: float
    ours: float  # bench's CPU, its finished children included
    load_start: float
    load_end: float
    top: list[tuple[str, int, float]]  # (name, pid, cores) of the busiest other processes
    limit: float = LIMIT

    @property
    def noisy(self) -> bool:
        return self.others > self.limit or self.steal > self.limit

    def verdict(self) -> str:
        """One line: "quiet (...)" or "NOISY: ..." with the figures."""
        figures = (
            f"other processes {_percent(self.others)} of a core, steal {_percent(self.steal)}, "
            f"load {self.load_start:.2f} at the start and {self.load_end:.2f} at the end, "
            f"over {self.seconds:.0f} s"
        )
        if not self.noisy:
            return f"quiet ({figures})"
        busiest = ", ".join(f"{name} [pid {pid}] {_percent(c)}" for name, pid, c in self.top)
        return (
            f"NOISY: {figures}" + (f"; busiest: {busiest}" if busiest else "")
            + f". More than {_percent(self.limit)} of a core went elsewhere: rerun on a quiet "
            "machine before publishing these numbers"
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "noisy": self.noisy,
            "verdict": self.verdict(),
            "seconds": self.seconds,
            "others_cores": self.others,
            "steal_cores": self.steal,
            "bench_cores": self.ours,
            "load_start": self.load_start,
            "load_end": self.load_end,
            "limit_cores": self.limit,
            "busiest": [{"name": n, "pid": p, "cores": c} for n, p, c in self.top],
        }


def between(start: Sample, end: Sample) -> Noise:
    """The noise between two samples (the busiest processes if both have them)."""
    seconds = max(end.wall - start.wall, 1e-9)
    ours = end.ours - start.ours
    others = max(end.busy - start.busy - ours, 0.0)  # the two counters tick apart: never < 0
    used = []
    for pid, (name, cpu) in end.processes.items():
        before = start.processes.get(pid)
        delta = cpu - (before[1] if before and before[0] == name else 0.0)  # new pid: all of it
        if delta > 0:
            used.append((name, pid, delta / seconds))
    top = sorted(used, key=lambda t: -t[2])[:TOP]
    return Noise(
        seconds=seconds,
        others=max(others / seconds, sum(cores for _, _, cores in used)),
        steal=(end.steal - start.steal) / seconds,
        ours=ours / seconds,
        load_start=start.load,
        load_end=end.load,
        top=top,
    )


def _percent(cores: float) -> str:
    return f"{100 * cores:.0f}%"
