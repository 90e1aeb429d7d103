"""Build and run the C++ programs of `export/cpp/` (LibTorch and ONNX Runtime C++ API).

`build()` compiles them with CMake, cached in a build directory, and returns `CppPrograms`, whose
`run(program, model, inputs)` runs a bundle's model on numpy inputs through the programs' .npy
files, named as the signature in the bundle's manifest. Where they come from:

- LibTorch: the installed torch wheel's headers, libraries and CMake files (`lstm_torchscript`;
  `lstm_aoti`, whose AOTIModelPackageLoader is in libtorch_cpu).
- ONNX Runtime: the installed onnxruntime wheel's `libonnxruntime.so.1.x.y`; the wheel has no
  headers, so they are Debian trixie's `libonnxruntime-dev`, fetched by package name with a
  private, throw-away apt state (nothing is installed), or taken from `$LSTM_DEPLOY_ORT_INCLUDE_DIR`
  (a directory holding `onnxruntime_cxx_api.h`, e.g. from Microsoft's release tarball).
- nlohmann/json, which every program reads the manifest with: Debian trixie's
  `nlohmann-json3-dev` (header-only), fetched the same way, or `$LSTM_DEPLOY_JSON_INCLUDE_DIR`
  (a directory holding `nlohmann/json.hpp`).

A program whose dependency is missing is not built: `CppPrograms.unavailable` says why. Building
needs cmake and a C++17 compiler; the first build takes about a minute (LibTorch's headers).

    lstm-deploy cpp [--build-dir DIR]    builds them and prints their paths
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lstm_deploy.bundle import MANIFEST, Signature, load_bundle
from lstm_deploy.versions import installed

__all__ = ["PROGRAMS", "CppError", "CppPrograms", "build", "default_build_dir"]


def _source_dir() -> Path:
    # A wheel carries export/cpp inside the package (pyproject.toml's force-include); a checkout
    # (or an editable install) has it beside the package.
    package = Path(__file__).resolve().parents[1]
    packaged = package / "cpp"
    return packaged if (packaged / "CMakeLists.txt").is_file() else package.parent / "cpp"


SOURCE_DIR = _source_dir()
TORCHSCRIPT = "lstm_torchscript"
ONNXRUNTIME = "lstm_onnxruntime"
AOTI = "lstm_aoti"  # model.pt2 with LibTorch's AOTIModelPackageLoader
PROGRAMS = {TORCHSCRIPT: "C++ LibTorch", ONNXRUNTIME: "C++ ONNX Runtime"}  # program -> row label
PROGRAMS[AOTI] = "C++ AOTInductor"
LIBTORCH_PROGRAMS = (TORCHSCRIPT, AOTI)  # what a missing LibTorch leaves unbuilt

DEBIAN_SUITE = "trixie"  # the first Debian release whose libonnxruntime-dev has the C++ API
APT_SOURCES = (Path("/etc/apt/sources.list.d"), Path("/etc/apt/sources.list"))
FETCH_TIMEOUT_S = 180
CONFIGURE_TIMEOUT_S = 300
BUILD_TIMEOUT_S = 1200


@dataclass(frozen=True)
class Headers:
    """Headers that the build takes from a Debian package, fetched by name, or from `env`."""

    package: str  # the Debian package, e.g. "libonnxruntime-dev"
    include: str  # the include directory inside it, e.g. "usr/include/onnxruntime"
    header: str  # a header that the include directory must hold, relative to it
    env: str  # the variable that names an include directory to use instead
    option: str  # the CMake option that takes the include directory


ORT_HEADERS = Headers(
    "libonnxruntime-dev",
    "usr/include/onnxruntime",
    "onnxruntime_cxx_api.h",
    "LSTM_DEPLOY_ORT_INCLUDE_DIR",
    "ONNXRUNTIME_INCLUDE_DIR",
)
JSON_HEADERS = Headers(
    "nlohmann-json3-dev",
    "usr/include",
    "nlohmann/json.hpp",
    "LSTM_DEPLOY_JSON_INCLUDE_DIR",
    "NLOHMANN_JSON_INCLUDE_DIR",
)
ORT_INCLUDE_ENV = ORT_HEADERS.env


class CppError(RuntimeError):
    """A C++ program that cannot be built or run; the message carries the tool's own error."""


@dataclass(frozen=True)
class CppPrograms:
    """The built programs (`paths`) and, for each one not built, the reason (`unavailable`).

    Keys are program names, `lstm_torchscript`, `lstm_onnxruntime`, `lstm_aoti` (see `PROGRAMS`).
    """

    paths: dict[str, Path] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def run(
        self,
        program: str,
        model: Path,
        inputs: Mapping[str, np.ndarray],
        *,
        threads: int | None = 1,
        timeout: float = 600,
    ) -> dict[str, np.ndarray]:
        """Run `program` (a key of `PROGRAMS`) on `model`: model.pt with LibTorch
        (`lstm_torchscript`), model.onnx with the ONNX Runtime C++ API, CPU execution provider
        (`lstm_onnxruntime`), model.pt2 with AOTIModelPackageLoader (`lstm_aoti`). Inputs and
        outputs are named as the signature in the manifest.json beside `model` (in its bundle);
        the outputs come back in the signature's order.

        threads: the program's intra-op threads. One by default: an LSTM step is many small ops,
        and on a busy machine a second thread mostly waits at barriers (seconds at T=300); None
        leaves the library's default.
        """
        return self._run(program, model, inputs, threads, timeout, [])[0]

    def time(
        self,
        program: str,
        model: Path,
        inputs: Mapping[str, np.ndarray],
        *,
        repeat: int,
        warmup: int = 1,
        threads: int | None = 1,
        timeout: float = 600,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """`run`, then the program's timing mode in the same process: `warmup` untimed and
        `repeat` timed runs on the inputs loaded once. Returns the outputs (of the first run) and
        the program's timing line: `times_ms` and `cpu_times_ms` per timed run (wall and process
        CPU time), their `median_ms`, `min_ms`, `p90_ms`, `max_ms` (wall)."""
        extra = ["--repeat", str(repeat), "--warmup", str(warmup)]
        outputs, stdout = self._run(program, model, inputs, threads, timeout, extra)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        try:
            timing = json.loads(lines[-1])
            if len(timing["times_ms"]) != repeat:
                raise ValueError(f"{len(timing['times_ms'])} times for --repeat {repeat}")
        except (IndexError, KeyError, TypeError, ValueError) as e:
            message = f"{program} --repeat printed no timing line ({e!r}): {stdout[-300:]!r}"
            raise CppError(message) from None
        return outputs, timing

    def _run(
        self,
        program: str,
        model: Path,
        inputs: Mapping[str, np.ndarray],
        threads: int | None,
        timeout: float,
        extra: list[str],
    ) -> tuple[dict[str, np.ndarray], str]:
        """The outputs of one run of `program` with `extra` arguments, and its stdout."""
        if program not in self.paths:
            reason = self.unavailable.get(program, "not built")
            raise CppError(f"{program} is not available: {reason}")
        signature = _signature_beside(model)
        if signature is not None:
            _check_inputs(signature, inputs)
        with tempfile.TemporaryDirectory(prefix="lstm-deploy-cpp-") as tmp:
            in_dir, out_dir = Path(tmp, "inputs"), Path(tmp, "outputs")
            in_dir.mkdir()
            for name, array in inputs.items():
                np.save(in_dir / f"{name}.npy", np.ascontiguousarray(array))
            command = [str(self.paths[program]), "--model", str(model)]
            command += ["--inputs", str(in_dir), "--outputs", str(out_dir)]
            if threads is not None:
                command += ["--threads", str(threads)]
            command += extra
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise CppError(f"{program} did not finish within {timeout:g} s") from None
            if done.returncode != 0 or signature is None:  # without a manifest, it fails
                message = done.stderr.strip() or done.stdout.strip() or "no message"
                raise CppError(f"{program} failed (exit {done.returncode}): {message}")
            outputs = {name: np.load(out_dir / f"{name}.npy") for name in signature.output_names}
            return outputs, done.stdout


def _signature_beside(model: Path) -> Signature | None:
    """The signature of the bundle that holds `model`; None where it has no manifest.json, which
    the program then reports (after the model itself: a missing model is named first)."""
    if not (Path(model).parent / MANIFEST).is_file():
        return None
    return load_bundle(Path(model).parent, only=()).signature  # the schema; no file hashed


def _check_inputs(signature: Signature, inputs: Mapping[str, np.ndarray]) -> None:
    """The caller's mistakes as ValueError, before a process starts: names and dtypes."""
    if set(inputs) != set(signature.input_names):
        raise ValueError(f"inputs must be {signature.input_names}, got {sorted(inputs)}")
    for spec in signature.inputs:
        dtype = np.asarray(inputs[spec.name]).dtype
        if dtype != np.dtype(spec.dtype):
            raise ValueError(f"{spec.name} must be {spec.dtype}, got {dtype}")


def default_build_dir() -> Path:
    """`$XDG_CACHE_HOME/lstm-deploy/cpp`, by default `~/.cache/lstm-deploy/cpp`."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lstm-deploy" / "cpp"


def build(
    build_dir: Path | None = None, progress: Callable[[str], None] | None = None
) -> CppPrograms:
    """Build both programs with CMake (Release) in `build_dir`, or reuse that build.

    A second call with nothing changed only checks that the build is up to date (a second or
    two). Never raises for a missing dependency or a failed build: the program is then listed in
    `unavailable` with the reason.
    """
    root = Path(build_dir) if build_dir is not None else default_build_dir()
    say = progress or (lambda _: None)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / ".lock"):
            return _build(root, say)
    except OSError as e:
        return CppPrograms(unavailable=dict.fromkeys(PROGRAMS, f"build directory {root}: {e}"))


def _build(root: Path, say: Callable[[str], None]) -> CppPrograms:
    if not (SOURCE_DIR / "CMakeLists.txt").is_file():
        reason = f"{SOURCE_DIR}: no C++ sources; reinstall lstm-deploy (its wheel ships them)"
        return CppPrograms(unavailable=dict.fromkeys(PROGRAMS, reason))
    if shutil.which("cmake") is None:
        reason = "cmake is not on PATH (install it, e.g. apt-get install cmake)"
        return CppPrograms(unavailable=dict.fromkeys(PROGRAMS, reason))
    reasons: dict[str, str] = {}
    options = ["-DCMAKE_BUILD_TYPE=Release"]
    try:  # every program reads the manifest with it
        options.append(f"-D{JSON_HEADERS.option}={_headers(root, JSON_HEADERS, say)}")
    except CppError as e:
        return CppPrograms(unavailable=dict.fromkeys(PROGRAMS, str(e)))
    try:
        options.append(f"-DCMAKE_PREFIX_PATH={_torch_cmake_prefix()}")
    except CppError as e:
        reasons.update(dict.fromkeys(LIBTORCH_PROGRAMS, str(e)))
    try:
        options.append(f"-DONNXRUNTIME_LIBRARY={_onnxruntime_library()}")
        options.append(f"-D{ORT_HEADERS.option}={_headers(root, ORT_HEADERS, say)}")
    except CppError as e:
        reasons[ONNXRUNTIME] = str(e)

    # One binary directory per checkout and Python environment, so that neither undoes the other.
    key = hashlib.sha256(f"{SOURCE_DIR}\n{sys.prefix}".encode()).hexdigest()[:12]
    binary = root / f"build-{key}"
    stamp = binary / "lstm-deploy-configure.json"
    wanted = json.dumps({"options": options, "versions": _versions()}, indent=1)
    cache = binary / "CMakeCache.txt"
    if not cache.is_file() or not stamp.is_file() or stamp.read_text() != wanted:
        say(f"configuring the C++ programs in {binary}")
        cache.unlink(missing_ok=True)  # a fresh configure: find LibTorch and ONNX Runtime anew
        stamp.unlink(missing_ok=True)
        command = ["cmake", "-S", str(SOURCE_DIR), "-B", str(binary), *options]
        try:
            _check(command, "cmake configure", CONFIGURE_TIMEOUT_S)
        except CppError as e:
            return CppPrograms(unavailable=dict.fromkeys(PROGRAMS, str(e)))
        stamp.write_text(wanted)

    paths: dict[str, Path] = {}
    for program, label in PROGRAMS.items():
        skipped = binary / "unavailable" / f"{program}.txt"  # written by CMakeLists.txt
        if program in reasons or skipped.is_file():
            reasons.setdefault(program, skipped.read_text().strip())
            continue
        first_time = " (tens of seconds the first time)" if program in LIBTORCH_PROGRAMS else ""
        say(f"building {program}, {label}{first_time}")
        command = ["cmake", "--build", str(binary), "--target", program, "-j2"]
        try:
            _check(command, f"building {program}", BUILD_TIMEOUT_S)
        except CppError as e:
            reasons[program] = str(e)
            continue
        paths[program] = binary / program
    return CppPrograms(paths, reasons)


def _versions() -> dict[str, str | None]:
    return {name: installed(name) for name in ("torch", "onnxruntime")}


def _package_dir(name: str) -> Path | None:
    # Found without importing: importing torch takes seconds, and build() is called often.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _torch_cmake_prefix() -> Path:
    """What `torch.utils.cmake_prefix_path` returns, without importing torch."""
    torch_dir = _package_dir("torch")
    if torch_dir is None:
        raise CppError("torch is not installed (LibTorch comes from the torch wheel)")
    prefix = torch_dir / "share" / "cmake"
    if not (prefix / "Torch" / "TorchConfig.cmake").is_file():
        raise CppError(f"{prefix}: the torch installation has no LibTorch CMake files")
    return prefix


def _onnxruntime_library() -> Path:
    ort_dir = _package_dir("onnxruntime")
    if ort_dir is None:
        raise CppError("onnxruntime is not installed (its wheel provides libonnxruntime.so)")
    libraries = [p for p in (ort_dir / "capi").glob("libonnxruntime.so*") if not p.is_symlink()]
    if not libraries:
        raise CppError(f"{ort_dir / 'capi'}: no libonnxruntime.so* in the onnxruntime wheel")
    return max(libraries, key=lambda p: len(p.name))  # libonnxruntime.so.1.32.0


def _headers(root: Path, headers: Headers, say: Callable[[str], None]) -> Path:
    """The include directory of `headers`: the environment's, cached in `root`, or fetched."""
    if os.environ.get(headers.env):
        include = Path(os.environ[headers.env])
        if not (include / headers.header).is_file():
            raise CppError(f"{headers.env}={include} has no {headers.header}")
        return include
    dest = root / headers.package
    include = dest / headers.include
    if (include / headers.header).is_file():
        return include
    hint = f"; or set {headers.env} to a directory with {headers.header}"
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise CppError(
            f"cannot fetch {headers.package}: {' and '.join(missing)} not found (not a "
            f"Debian-based system?){hint}"
        )
    mirror = _debian_mirror()
    if mirror is None:
        raise CppError(
            f"cannot fetch {headers.package}: no Debian archive in this machine's apt sources "
            f"(/etc/apt){hint}"
        )
    say(f"fetching {headers.header} ({headers.package} from Debian {DEBIAN_SUITE})")
    with tempfile.TemporaryDirectory(dir=root, prefix="fetch-") as tmp:
        work = Path(tmp)
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        (work / "sources.list").write_text(f"deb {mirror} {DEBIAN_SUITE} main\n")
        apt = ["apt-get", "-q"]
        for option in (
            f"Dir::Etc::SourceList={work / 'sources.list'}",
            "Dir::Etc::SourceParts=/dev/null",
            f"Dir::State::Lists={work / 'lists'}",
            f"Dir::Cache={work / 'cache'}",
            "Acquire::Retries=2",
            "Acquire::http::Timeout=30",
            "APT::Update::Error-Mode=any",  # fail on a failed fetch (apt >= 2.1), not just warn
            *(["APT::Sandbox::User=root"] if os.geteuid() == 0 else []),
        ):
            apt += ["-o", option]
        for step in (["update"], ["download", headers.package]):
            what = f"apt-get {step[0]} (Debian {DEBIAN_SUITE})"
            _check([*apt, *step], what, FETCH_TIMEOUT_S, work, hint)
        debs = sorted(work.glob(f"{headers.package}_*.deb"))
        if not debs:
            raise CppError(f"apt-get download wrote no {headers.package}_*.deb{hint}")
        extracted = work / "extracted"
        _check(["dpkg-deb", "-x", str(debs[0]), str(extracted)], "dpkg-deb -x", FETCH_TIMEOUT_S)
        if not (extracted / headers.include / headers.header).is_file():
            raise CppError(f"{debs[0].name} has no {headers.include}/{headers.header}{hint}")
        (extracted / "PACKAGE").write_text(debs[0].name + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        extracted.rename(dest)
    return include


def _debian_mirror() -> str | None:
    """The Debian archive this machine's apt already uses (its first `debian` URI), or None."""
    files = [p for d in APT_SOURCES for p in (sorted(d.glob("*")) if d.is_dir() else [d])]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] or words[:1] == ["deb"]:
                uris = [w for w in words[1:] if "://" in w]
                if uris and uris[0].rstrip("/").endswith("/debian"):
                    return uris[0].rstrip("/")
    return None


def _check(
    command: Sequence[str], what: str, timeout: float, cwd: Path | None = None, hint: str = ""
) -> None:
    """Run a build tool; on failure raise CppError with the end of its output."""
    try:
        done = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise CppError(f"{what} did not finish within {timeout:g} s{hint}") from None
    except OSError as e:
        raise CppError(f"{what} could not start: {e}{hint}") from None
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines()
        errors = [line for line in lines if "error" in line.lower() or line.startswith("E:")]
        tail = " | ".join((errors or lines)[-8:])
        raise CppError(f"{what} failed (exit {done.returncode}): {tail}{hint}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Two processes (a test run and `lstm-deploy validate --cpp`) may build in the same directory.
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
