"""The outputs of `lstm-deploy bench`: targets summary, terminal table, bench.json/.md, and two
figures: bench.png (throughput against T) and bench-ratio.png (the ratio to nn.LSTM against T)."""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REFERENCE = "torch.nn.LSTM"
# The targets: median over the grid of the throughput ratio to nn.LSTM.
TARGETS = {"model.onnx": 1.0, "model.pt": 0.6, "model.scan.onnx": 0.8, "model.int8.onnx": 1.5}
# ... and at batch 1, T 128, hidden 256 every artifact's latency within 1.5x of nn.LSTM's.
LATENCY_CELL = {"batch": 1, "steps": 128, "hidden": 256}
LATENCY_LIMIT = 1.5
MEMORY_METHOD = (
    "per backend, a child process runs the largest cell twice: VmHWM (peak RSS), and VmHWM minus "
    "VmRSS after imports (torch, onnxruntime); not the C++ programs (their own processes)"
)
CPP_METHOD = (
    "the C++ programs (export/cpp, same threads) are not interleaved with bench's rounds: after a "
    "cell's rounds, each runs in its own process once, with the inputs loaded once, the same "
    "warm-up, then as many timed runs as the rounds had, timed inside the process (the same "
    "clock); its median is compared with nn.LSTM's median from the rounds just before it. Alone in "
    "its process a model runs back to back with its weights in cache, which the interleaved rows "
    "share: on small cells that alone favours the C++ rows"
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


def method(
    clock: str, reference: str = REFERENCE, device: str = "cpu", cpp: bool = False
) -> dict[str, str]:
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
        "peak": "the highest of the ceilings, each measured at the start of the run with the "
        "backends' threads, best of 5 after one untimed call: "
        + (
            "torch.mm (cuBLAS, TF32 off)"
            if device == "cuda"
            else "torch.mm (MKL), oneDNN linear (torch.ops.mkldnn._linear_pointwise), nn.LSTM "
            "(oneDNN) at batch 64, 16 steps, input = hidden = n/2 (FLOPs as above), ONNX "
            "Runtime's MatMul; one library's GEMM is not the machine's peak (MKL's sgemm is "
            "slow on AMD)"
        ),
        "noise": "load average at the start and end; the CPU time of other processes: all "
        "CPUs' busy time (/proc/stat) minus bench's own and its finished children's (os.times), "
        "and the steal time; noisy when either averages over 10% of a core",
        **({"memory": MEMORY_METHOD} if device == "cpu" else {}),
        **({"cpp": CPP_METHOD} if cpp else {}),
    }


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "bench.md").write_text(markdown(result))
    for name, kind in FIGURES.items():
        plot(result, out / name, kind)


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
              "GFLOP/s", "% peak", "max abs err"]  # fmt: skip
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
        f"{result['clock']} clock; {_versions(m)}; peak {result['peak_gflops']:.0f} GFLOP/s "
        f"({result['peak_ceiling']}, the best of {_ceilings(result)}).\n\n"
        f"Machine: {result['noise']['verdict']}.\n"
    )


def _versions(machine: dict[str, Any]) -> str:
    v = machine.get("versions") or {}
    inside = ", ".join(f"{k} {v[k]}" for k in ("oneDNN", "MKL") if v.get(k))
    words = [f"torch {machine['torch']}" + (f" ({inside})" if inside else "")]
    words += [f"{k} {v[k]}" for k in ("onnxruntime", "onnx", "openvino", "numpy") if v.get(k)]
    if v.get("lstm-deploy"):
        words.append(f"lstm-deploy {v['lstm-deploy']}")
    return ", ".join(words)


def _ceilings(result: dict[str, Any]) -> str:
    return ", ".join(
        f"{c['name']} {c['gflops']:.0f}" if "gflops" in c else f"{c['name']} (failed: {c['error']})"
        for c in result["ceilings"]
    )


def noisy_cells(result: dict[str, Any]) -> list[str]:
    """The cells during which other processes used more than the noise limit."""
    limit = result["noise"].get("limit_cores")
    cells = {
        (r["batch"], r["steps"], r["hidden"]): r["others_cores"]
        for r in result["rows"]
        if limit is not None and (r.get("others_cores") or 0) > limit
    }
    return [f"B{b} T{t} H{h} ({100 * c:.0f}% of a core)" for (b, t, h), c in cells.items()]


def _model(config: dict[str, Any]) -> str:
    extras = [k for k in ("bidirectional",) if config[k]] + (
        [f"proj_size={config['proj_size']}"] if config["proj_size"] else []
    )
    return (
        f"input {config['input_size']}, hidden {config['hidden_size']}, "
        f"{config['num_layers']} layer(s)" + "".join(f", {e}" for e in extras)
    )


def terminal(result: dict[str, Any]) -> str:
    return "\n".join([_header(result), summary_table(result), cell_table(result), _skipped(result)])


def ceilings_table(result: dict[str, Any]) -> str:
    rows = [
        [c["name"], c["shape"], f"{c['gflops']:.1f}" if "gflops" in c else f"failed: {c['error']}"]
        for c in result["ceilings"]
    ]
    return _table(["ceiling", "shape", "GFLOP/s"], rows)


def _skipped(result: dict[str, Any]) -> str:
    return "".join(f"skipped: {s['backend']}: {s['reason']}\n" for s in result["skipped"])


def markdown(result: dict[str, Any]) -> str:
    noisy = noisy_cells(result)
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
        "## Ceilings (the peak is the highest) and noise\n",
        ceilings_table(result),
        f"Machine: {result['noise']['verdict']}.\n",
        ("Cells during which other processes used more than "
         f"{100 * result['noise']['limit_cores']:.0f}% of a core: " + "; ".join(noisy) + ".\n")
        if noisy else "",
    ]  # fmt: skip
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


FIGURES = {"bench.png": "throughput", "bench-ratio.png": "ratio"}


def plot(result: dict[str, Any], path: Path, kind: str = "throughput") -> None:
    """throughput: sequences/s against T per backend, one panel per batch size and hidden size.
    ratio: each backend's throughput ratio to the reference against T, one panel per batch size,
    the geometric mean over the hidden sizes (the band: their min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, reference = result["rows"], _reference(result)
    batches = sorted({r["batch"] for r in rows})
    hiddens = sorted({r["hidden"] for r in rows}) if kind == "throughput" else [None]
    styles = {n: _style(k, n == reference) for k, n in enumerate(_backends(result))}
    names = [n for n in styles if kind == "throughput" or n != reference]
    fig, axes = plt.subplots(
        len(hiddens), len(batches), figsize=(4.2 * len(batches), 3.3 * len(hiddens)),
        squeeze=False, sharex=True,
    )  # fmt: skip
    for i, hidden in enumerate(hiddens):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            for name in names:
                cell = [r for r in rows if r["backend"] == name and r["batch"] == batch]
                style = styles[name]
                if kind == "throughput":
                    points = sorted((r["steps"], r["sequences_per_s"]) for r in cell
                                    if r["hidden"] == hidden)  # fmt: skip
                    ax.plot(*zip(*points), label=name, **style)
                    continue
                by_steps: dict[int, list[float]] = {}
                for r in cell:
                    by_steps.setdefault(r["steps"], []).append(r["ratio"])
                steps = sorted(by_steps)
                ratios = [by_steps[t] for t in steps]
                ax.plot(steps, [statistics.geometric_mean(v) for v in ratios], label=name, **style)
                if any(len(v) > 1 for v in ratios):
                    lows, highs = [min(v) for v in ratios], [max(v) for v in ratios]
                    ax.fill_between(steps, lows, highs, color=style["color"], alpha=0.12)
            if kind == "ratio":
                ax.axhline(1.0, color="black", linewidth=2, label=f"{reference} (1.0)")
            _axes(ax, sorted({r["steps"] for r in rows}), 10 if kind == "throughput" else 2)
            where = f"batch {batch}" + (f", hidden {hidden}" if hidden is not None else "")
            ax.set_title(where, fontsize=10)
            if i == len(hiddens) - 1:
                ax.set_xlabel("sequence length T")
            if j == 0:
                ax.set_ylabel("sequences / s" if kind == "throughput" else f"x {reference}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = min(len(labels), 4)
    legend_rows = -(-len(labels) // columns)
    fig.legend(handles, labels, loc="lower center", ncol=columns, frameon=False, fontsize=9)
    all_hidden = ", ".join(map(str, sorted({r["hidden"] for r in rows})))
    what = "sequences/s" if kind == "throughput" else f"throughput ratio to {reference}"
    if kind == "ratio" and "," in all_hidden:
        what += f" (geometric mean over hidden {all_hidden}; band: min to max)"
    width, height = fig.get_size_inches()
    title = textwrap.fill(f"lstm-deploy bench, {what}. {_title(result)}", int(width * 14))
    fig.suptitle(title, fontsize=10)
    top = 1 - 0.13 * (title.count("\n") + 1) / height
    fig.tight_layout(rect=(0, min(0.03 + 0.2 * legend_rows / height, 0.4), 1, top))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _title(result: dict[str, Any]) -> str:
    """The machine, the threads, torch's and ONNX Runtime's versions, and a noisy run flagged."""
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['threads']} thread(s)"
    noisy = ". NOISY run (bench.md says why)" if result.get("noisy") else ""
    return f"{where}; torch {m['torch']}, onnxruntime {m['onnxruntime']}{noisy}"


def _style(index: int, reference: bool) -> dict[str, Any]:
    if reference:
        return {"color": "black", "linewidth": 2.5, "marker": "o"}
    import matplotlib

    # tab10's colours, then tab20's light ones (tab20 pairs each tab10 colour with a light one)
    colors = matplotlib.colormaps["tab10" if index < 10 else "tab20"]
    color = colors(index) if index < 10 else colors((2 * (index - 10) + 1) % 20)
    return {"color": color, "marker": "osD^v<>ph*"[index % 10]}


def _axes(ax: Any, steps: list[int], base: int) -> None:
    import matplotlib.ticker

    ax.set_xscale("log", base=2)
    ax.set_xticks(steps)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yscale("log", base=base)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
