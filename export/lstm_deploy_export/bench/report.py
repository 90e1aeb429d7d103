"""The outputs of `lstm-deploy bench`: targets summary, terminal table, bench.json/.md/.png."""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REFERENCE = "torch.nn.LSTM"
# The targets: median over the grid of the throughput ratio to nn.LSTM.
TARGETS = {"model.onnx": 1.0, "model.pt": 0.6, "model.scan.onnx": 0.8}
# ... and at batch 1, T 128, hidden 256 every artifact's latency within 1.5x of nn.LSTM's.
LATENCY_CELL = {"batch": 1, "steps": 128, "hidden": 256}
LATENCY_LIMIT = 1.5
MEMORY_METHOD = (
    "per backend, a child process runs the largest cell twice: VmHWM (peak RSS), and VmHWM minus "
    "VmRSS after imports (torch, onnxruntime)"
)


@contextlib.contextmanager
def progress(total: int) -> Iterator[Any]:
    """A progress bar on stderr over the grid's cells (silent when stderr is not a terminal)."""
    from tqdm import tqdm

    with tqdm(total=total, unit="cell", file=sys.stderr, disable=None, leave=False) as bar:
        yield bar


def summary(rows: list[dict[str, Any]], reference: str = REFERENCE) -> dict[str, Any]:
    """Per backend: the median, min and max ratio over the grid and the target; the latency cell.
    The targets are the CPU ones: they apply when `reference` is the CPU's nn.LSTM."""
    backends: dict[str, Any] = {}
    for name in dict.fromkeys(r["backend"] for r in rows):
        ratios = [r["ratio"] for r in rows if r["backend"] == name]
        entry: dict[str, Any] = {
            "cells": len(ratios),
            "median_ratio": statistics.median(ratios),
            "min_ratio": min(ratios),
            "max_ratio": max(ratios),
        }
        if name in TARGETS and reference == REFERENCE:
            entry["target"] = TARGETS[name]
            entry["met"] = entry["median_ratio"] >= TARGETS[name]
        backends[name] = entry
    cell = [r for r in rows if all(r[k] == v for k, v in LATENCY_CELL.items())]
    latency = None
    if cell:
        reference_ms = next(r["median_ms"] for r in cell if r["backend"] == reference)
        latency = {
            "cell": LATENCY_CELL,
            "limit": LATENCY_LIMIT,
            "backends": {
                r["backend"]: {
                    "median_ms": r["median_ms"],
                    "latency_ratio": r["median_ms"] / reference_ms,
                    "met": r["median_ms"] / reference_ms <= LATENCY_LIMIT,
                }
                for r in cell
                if r["backend"] != reference
            },
        }
    return {"backends": backends, "latency": latency}


def method(clock: str, reference: str = REFERENCE, device: str = "cpu") -> dict[str, str]:
    """How each number is measured, for bench.json and bench.md."""
    on_cuda = (
        "; on CUDA every backend's inputs and outputs stay on the device (ONNX Runtime's through "
        "I/O binding): no host-device copy is timed; a torch call ends with "
        "torch.cuda.synchronize(), ONNX Runtime's run returns when the device is done"
    )
    return {
        "time": f"{clock} clock ({'perf_counter' if clock == 'wall' else 'process_time'}) per "
        "call, after warm-up, backends interleaved; median and interquartile range"
        + (on_cuda if device == "cuda" else ""),
        "ratio": f"{reference} median time / the backend's median time (throughput ratio)",
        "flops": "GEMMs only: 2*T*B*4H*(I_l + H_out) per layer and direction "
        "(+ 2*T*B*H*P with a projection)",
        "gemm_peak": f"best of 5 torch.mm (n x n) @ (n x n) float32 on {device}, TF32 off, "
        "same threads, same run",
        **({"memory": MEMORY_METHOD} if device == "cpu" else {}),
    }


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "bench.md").write_text(markdown(result))
    plot(result, out / "bench.png")


def _reference(result: dict[str, Any]) -> str:
    return str(result.get("reference", REFERENCE))  # bench.json before --device had none


def _backends(result: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(r["backend"] for r in result["rows"]))


def _cells(result: dict[str, Any]) -> list[tuple[int, int, int]]:
    return list(dict.fromkeys((r["batch"], r["steps"], r["hidden"]) for r in result["rows"]))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


def summary_table(result: dict[str, Any]) -> str:
    rows = []
    for name, s in result["summary"]["backends"].items():
        target = f">= {s['target']:.1f}x" if "target" in s else ""
        met = ("met" if s["met"] else "NOT met") if "target" in s else ""
        rows.append(
            [name, f"{s['median_ratio']:.2f}x", f"{s['min_ratio']:.2f}x", f"{s['max_ratio']:.2f}x",
             target, met]
        )  # fmt: skip
    header = ["backend", "median ratio", "min", "max", "target", ""]
    text = _table(header, rows)
    latency = result["summary"]["latency"]
    if latency:
        c = latency["cell"]
        text += (
            f"\nLatency at batch {c['batch']}, T {c['steps']}, hidden {c['hidden']} "
            f"(limit {latency['limit']}x {_reference(result)}'s):\n\n"
        )
        text += _table(
            ["backend", "median ms", f"x {_reference(result)}'s latency", ""],
            [
                [n, f"{v['median_ms']:.3f}", f"{v['latency_ratio']:.2f}x",
                 "met" if v["met"] else "NOT met"]
                for n, v in latency["backends"].items()
            ],
        )  # fmt: skip
    return text


def cell_table(result: dict[str, Any]) -> str:
    """One row per cell: nn.LSTM's time, then each backend's ratio (and a flag if it mismatched)."""
    names = _backends(result)
    by_key = {(r["batch"], r["steps"], r["hidden"], r["backend"]): r for r in result["rows"]}
    rows = []
    for cell in _cells(result):
        row = [str(v) for v in cell]
        for name in names:
            r = by_key.get((*cell, name))
            if r is None:
                row.append("")
            elif name == _reference(result):
                row.append(f"{r['median_ms']:.3f} ms")
            else:
                flag = " (MISMATCH)" if r["mismatch"] else ""
                row.append(f"{r['ratio']:.2f}x{flag}")
        rows.append(row)
    return _table(["B", "T", "H", *names], rows)


def full_table(result: dict[str, Any]) -> str:
    header = ["B", "T", "H", "backend", "median ms", "spread", "rounds", "seq/s", "ratio",
              "GFLOP/s", "% GEMM peak", "max abs err"]  # fmt: skip
    rows = [
        [str(r["batch"]), str(r["steps"]), str(r["hidden"]), r["backend"],
         f"{r['median_ms']:.3f}", _spread(r), str(r["rounds"]),
         f"{r['sequences_per_s']:.1f}", f"{r['ratio']:.2f}", f"{r['gflops']:.1f}",
         f"{100 * r['peak_fraction']:.0f}%", f"{r['max_abs_err']:.1e}"]
        for r in result["rows"]
    ]  # fmt: skip
    return _table(header, rows)


def _spread(row: dict[str, Any]) -> str:
    """± half the interquartile range, in % of the median."""
    return f"±{50 * (row['p75_ms'] - row['p25_ms']) / row['median_ms']:.0f}%"


def _header(result: dict[str, Any]) -> str:
    m = result["machine"]
    gpu = f"{m['gpu']} (CUDA {m['cuda']}), " if "gpu" in m else ""
    return (
        f"{gpu}{m['cpu']}, {m['cores']} cores, {m['threads']} thread(s) per backend, "
        f"{result['clock']} clock; torch "
        f"{m['torch']}, onnxruntime {m['onnxruntime']}; GEMM peak {result['gemm_peak_gflops']:.0f}"
        f" GFLOP/s (torch.mm); load average at the start {_load(m)}.\n"
    )


def _model(config: dict[str, Any]) -> str:
    extras = [k for k in ("bidirectional",) if config[k]] + (
        [f"proj_size={config['proj_size']}"] if config["proj_size"] else []
    )
    return (
        f"input {config['input_size']}, hidden {config['hidden_size']}, "
        f"{config['num_layers']} layer(s)" + "".join(f", {e}" for e in extras)
    )


def _load(machine: dict[str, Any]) -> str:
    load = machine.get("load_average")
    return "/".join(f"{v:.1f}" for v in load) if load else "unknown"


def terminal(result: dict[str, Any]) -> str:
    return "\n".join([_header(result), summary_table(result), cell_table(result), _skipped(result)])


def _skipped(result: dict[str, Any]) -> str:
    return "".join(f"skipped: {s['backend']}: {s['reason']}\n" for s in result["skipped"])


def markdown(result: dict[str, Any]) -> str:
    parts = [
        "# lstm-deploy bench\n",
        _header(result),
        f"Command: `{result['command']}`; full lengths; models: "
        + "; ".join(_model(c) for c in result["models"].values())
        + ".\n",
        f"## Targets (throughput ratio to {_reference(result)}, median over the grid)\n",
        summary_table(result),
        f"## Per cell: {_reference(result)}'s median time, each backend's throughput ratio to it\n",
        cell_table(result),
        "## Every number (spread: ± half the interquartile range)\n",
        full_table(result),
    ]
    if result["memory"]:
        rows = [
            [name, f"{m['peak_rss_mb']:.0f}", f"{m['increase_mb']:.0f}"]
            if "peak_rss_mb" in m
            else [name, "error", str(m.get("error"))]
            for name, m in result["memory"].items()
        ]
        parts += [
            "## Peak memory (RSS), the largest cell, one child process per backend\n",
            _table(["backend", "peak RSS MB", "over the RSS after imports, MB"], rows),
        ]
    if result["skipped"]:
        parts += ["## Skipped\n", "".join(f"- {s['backend']}: {s['reason']}\n" for s in
                                          result["skipped"])]  # fmt: skip
    parts += ["## Method\n", "".join(f"- {k}: {v}\n" for k, v in result["method"].items())]
    return "\n".join(parts)


def plot(result: dict[str, Any], path: Path) -> None:
    """Sequences/s vs T per backend; one column of panels per batch size, one row per hidden."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    hiddens = sorted({r["hidden"] for r in rows})
    fig, axes = plt.subplots(
        len(hiddens), len(batches), figsize=(4.2 * len(batches), 3.3 * len(hiddens)),
        squeeze=False, sharex=True,
    )  # fmt: skip
    for i, hidden in enumerate(hiddens):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            for name in _backends(result):
                points = sorted(
                    (r["steps"], r["sequences_per_s"])
                    for r in rows
                    if r["backend"] == name and r["batch"] == batch and r["hidden"] == hidden
                )
                style = {"linewidth": 2.5, "color": "black"} if name == _reference(result) else {}
                ax.plot(*zip(*points), marker="o", label=name, **style)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["steps"] for r in rows}))
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"batch {batch}, hidden {hidden}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(hiddens) - 1:
                ax.set_xlabel("sequence length T")
            if j == 0:
                ax.set_ylabel("sequences / s")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['threads']} thread(s)"
    fig.suptitle(f"lstm-deploy bench: {where}", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
