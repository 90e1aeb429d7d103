"""Where a real tritonserver can run: the platform, and a Python environment with nvidia-pytriton.

The nvidia-pytriton wheel bundles tritonserver and its python backend; the backend's stub embeds
the environment's Python. `TritonEnvironment.find` probes that Python (in a subprocess: it is
usually another venv, with numpy<2) and says clearly what is missing.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_PYTHON = "LSTM_DEPLOY_TRITON_PYTHON"
MIN_GLIBC = (2, 35)
_SETUP_HINT = (
    "create it with scripts/setup_triton_venv.sh, or `pip install 'lstm-deploy[triton]'` "
    "into a venv, and pass its Python with --python or $" + ENV_PYTHON
)


class TritonSetupError(Exception):
    """Triton cannot run here as asked; the message says what is wrong and how to fix it."""


# -- the environment -------------------------------------------------------------------------


def check_platform() -> None:
    """Raise TritonSetupError unless this machine can run the nvidia-pytriton wheel."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        raise TritonSetupError(
            f"nvidia-pytriton's tritonserver runs on Linux x86_64/aarch64, not "
            f"{sys.platform} {platform.machine()}; use NVIDIA's Triton container instead"
        )
    libc, version = platform.libc_ver()
    found = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if libc != "glibc" or found < MIN_GLIBC:
        raise TritonSetupError(
            f"nvidia-pytriton's tritonserver needs glibc >= {'.'.join(map(str, MIN_GLIBC))}, "
            f"this machine has {libc or 'no glibc'} {version}; use NVIDIA's Triton container"
        )


# Run by the environment's own Python: its version, prefix, libpython and packages, as JSON.
_PROBE = """
import importlib.util, json, sys, sysconfig
from importlib import metadata
def where(name):
    spec = importlib.util.find_spec(name)
    return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
try:
    numpy = metadata.version("numpy")
except metadata.PackageNotFoundError:
    numpy = None
var = sysconfig.get_config_var
print(json.dumps({
    "version": "%d.%d" % sys.version_info[:2], "prefix": sys.prefix, "libdir": var("LIBDIR"),
    "shared": var("Py_ENABLE_SHARED"), "instsoname": var("INSTSONAME"), "numpy": numpy,
    "pytriton": where("pytriton"), "onnxruntime": where("onnxruntime"),
}))
"""


@dataclass(frozen=True)
class TritonEnvironment:
    """A Python environment with nvidia-pytriton: where its tritonserver and stub live.

    The python backend's stub embeds that Python: it needs its shared libpython (found through
    LD_LIBRARY_PATH, or the system's copy of another 3.x build would load and fail) and its
    `bin/` first on PATH (from which the embedded interpreter finds its prefix and site-packages).
    """

    python: Path
    prefix: Path
    libdir: Path
    pytriton: Path
    version: str

    @property
    def tritonserver(self) -> Path:
        return self.pytriton / "tritonserver" / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.pytriton / "tritonserver" / "backends" / "python"

    @property
    def stub(self) -> Path:
        return (
            self.pytriton
            / "tritonserver"
            / "python_backend_stubs"
            / self.version
            / "triton_python_backend_stub"
        )

    @property
    def libs(self) -> Path:
        return self.pytriton.parent / "nvidia_pytriton.libs"

    @classmethod
    def find(cls, python: str | Path | None = None) -> TritonEnvironment:
        """Probe `python` (default: $LSTM_DEPLOY_TRITON_PYTHON, else this Python)."""
        check_platform()
        chosen = python or os.environ.get(ENV_PYTHON) or sys.executable
        exe = Path(chosen)
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            raise TritonSetupError(f"no Python at {exe}: {_SETUP_HINT}")
        try:
            done = subprocess.run(
                [str(exe), "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
            )
            info = json.loads(done.stdout)
        except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as e:
            raise TritonSetupError(f"cannot run {exe} to inspect its environment: {e}") from None
        if info["pytriton"] is None:
            raise TritonSetupError(
                f"{exe} has no nvidia-pytriton (the [triton] extra, which brings tritonserver): "
                + _SETUP_HINT
            )
        if info["numpy"] is None or int(info["numpy"].split(".")[0]) >= 2:
            raise TritonSetupError(
                f"{exe} has numpy {info['numpy']}: nvidia-pytriton 0.7 needs numpy<2 "
                "(pip install 'numpy<2' there)"
            )
        if info["onnxruntime"] is None:
            raise TritonSetupError(
                f"{exe} has no onnxruntime, which the python-backend models run model.onnx "
                "with: pip install onnxruntime there"
            )
        libdir = Path(info["libdir"] or "")
        if not info["shared"] or not (libdir / str(info["instsoname"])).is_file():
            raise TritonSetupError(
                f"{exe} has no shared libpython{info['version']} (the python backend stub links "
                "it): use a Python built with --enable-shared (Debian's, or pyenv with "
                "PYTHON_CONFIGURE_OPTS=--enable-shared)"
            )
        env = cls(exe, Path(info["prefix"]), libdir, Path(info["pytriton"]), info["version"])
        for path in (env.tritonserver, env.stub):
            if not path.is_file():
                raise TritonSetupError(
                    f"{path} is missing: this nvidia-pytriton has no tritonserver or python "
                    f"backend stub for Python {env.version}"
                )
        return env

    def process_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.pop("PYTHONHOME", None)  # the stub finds its prefix from PATH
        search = [str(self.libdir), str(self.libs), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = ":".join(p for p in search if p)
        env["PATH"] = f"{self.prefix / 'bin'}:{env.get('PATH', '')}"
        return env
