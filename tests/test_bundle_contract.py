"""The bundle contract (lstm_deploy.bundle): a hostile or broken manifest is refused in one line
that names the field, by load_bundle and by every command that reads bundles, never with a
traceback; the contract imports without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lstm_deploy_export.export.writer import export_bundle
from lstm_deploy_serving import cli as serving_cli

from lstm_deploy import LSTM
from lstm_deploy.bundle import (
    MANIFEST,
    ONNX,
    TORCHSCRIPT,
    BundleError,
    Signature,
    file_entry,
    load_bundle,
    lstm_signature,
)
from lstm_deploy.config import LSTMConfig

Edit = Callable[[Any, Path], Any]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = LSTM(3, 4, batch_first=True)
    out = tmp_path_factory.mktemp("contract") / "bundle"
    return export_bundle(model, out, artifacts="torchscript,onnx").path


@pytest.fixture
def bundle(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "bundle"))


def edit_manifest(bundle: Path, edit: Edit) -> None:
    """Edit the manifest in place, or replace it with what `edit` returns (a list, say)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    replaced = edit(manifest, bundle)
    (bundle / MANIFEST).write_text(json.dumps(manifest if replaced is None else replaced))


def list_file(name: str, path: Path) -> Edit:
    """List `name` with the true sha256 and size of `path`: a checksum alone lets nothing in."""

    def edit(manifest: dict, bundle: Path) -> None:
        manifest["files"][name] = file_entry(path)

    return edit


def symlink_out(manifest: dict, bundle: Path) -> None:
    (bundle / "escape").symlink_to("/etc/hostname")
    manifest["files"]["escape"] = file_entry(Path("/etc/hostname"))


def set_key(key: str, value: Any) -> Edit:
    def edit(manifest: dict, bundle: Path) -> None:
        manifest[key] = value

    return edit


def drop_key(key: str) -> Edit:
    def edit(manifest: dict, bundle: Path) -> None:
        del manifest[key]

    return edit


# (id, edit, words the one-line error must hold: the field it names)
HOSTILE = [
    ("parent-path", list_file("../../etc/hostname", Path("/etc/hostname")),
     "files['../../etc/hostname']"),
    ("absolute-path", list_file("/etc/hostname", Path("/etc/hostname")),
     "files['/etc/hostname']: an absolute path"),
    ("symlink-out", symlink_out, "escape: a symlink that leaves the bundle"),
    ("files-not-a-mapping", set_key("files", ["model.onnx"]),
     "files must be a JSON object, got list"),
    ("not-an-object", lambda manifest, bundle: [], "the manifest must be a JSON object, got list"),
    ("format-version", set_key("format_version", 99), "format_version is 99"),
    ("bad-sha256", lambda m, b: m["files"][ONNX].update(sha256="abc"),
     "files['model.onnx'].sha256 must be 64 lowercase hex digits"),
    ("bad-size", lambda m, b: m["files"][ONNX].update(size=-1),
     "files['model.onnx'].size must be an integer >= 0"),
    ("signature-missing", drop_key("signature"),
     "signature must be a JSON object, got NoneType"),
    ("bad-dtype", lambda m, b: m["signature"]["inputs"][0].update(dtype="complex64"),
     "signature.inputs[0].dtype is 'complex64'"),
    ("bad-config", lambda m, b: m["config"].update(colour="blue"),
     "config: unknown LSTM config keys ['colour']"),
]  # fmt: skip
IDS = [case[0] for case in HOSTILE]


@pytest.mark.parametrize(("name", "edit", "words"), HOSTILE, ids=IDS)
def test_load_bundle_refuses_in_one_line(bundle: Path, name: str, edit: Edit, words: str) -> None:
    edit_manifest(bundle, edit)
    with pytest.raises(BundleError) as raised:
        load_bundle(bundle)
    message = str(raised.value)
    assert words in message and "\n" not in message, message
    with pytest.raises(BundleError):  # even when asked to verify one file only
        load_bundle(bundle, only=[ONNX])


def _one_line_error(err: str, prefix: str, words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(prefix) and words in lines[0], lines[0]


@pytest.mark.parametrize(("name", "edit", "words"), HOSTILE, ids=IDS)
def test_serve_refuses_in_one_line(
    bundle: Path, name: str, edit: Edit, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    edit_manifest(bundle, edit)
    assert serving_cli.main(["serve", str(bundle), "--port", "0"]) == 2
    _one_line_error(capsys.readouterr().err, "python -m lstm_deploy_serving serve: error: ", words)


@pytest.mark.parametrize(("name", "edit", "words"), HOSTILE, ids=IDS)
def test_validate_refuses_in_one_line(
    bundle: Path, name: str, edit: Edit, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from lstm_deploy_export.cli import main

    edit_manifest(bundle, edit)
    assert main(["validate", str(bundle), "--quick", "--no-progress"]) == 2
    _one_line_error(capsys.readouterr().err, "lstm-deploy validate: error: ", words)


def test_triton_refuses_in_one_line(bundle: Path) -> None:
    """The Triton launcher reads the bundle through the contract before it looks for Triton."""
    edit_manifest(bundle, list_file("../../etc/hostname", Path("/etc/hostname")))
    done = subprocess.run(
        [sys.executable, "-m", "lstm_deploy_export.cli", "triton", str(bundle), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    _one_line_error(done.stderr, "lstm-deploy triton: error: ", "files['../../etc/hostname']")


def test_manifest_that_is_not_json(bundle: Path) -> None:
    for text in ("{", "[" * 100_000, "\xff"):
        (bundle / MANIFEST).write_bytes(text.encode("latin-1"))
        with pytest.raises(BundleError, match=r"manifest\.json") as raised:
            load_bundle(bundle)
        assert "\n" not in str(raised.value)


def test_only_verifies_the_files_asked_for(bundle: Path) -> None:
    (bundle / TORCHSCRIPT).write_bytes(b"tampered")
    assert load_bundle(bundle, only=[ONNX]).has(TORCHSCRIPT)  # what a server reads is intact
    assert load_bundle(bundle, only=["triton/lstm_onnx/"]).has(ONNX)
    with pytest.raises(BundleError, match=r"model\.pt: sha256 mismatch"):
        load_bundle(bundle)
    with pytest.raises(BundleError, match=r"the bundle has no model\.scan\.onnx"):
        load_bundle(bundle, only=["model.scan.onnx"])


def test_write_manifest_refuses_what_load_would(exported: Path, tmp_path: Path) -> None:
    bundle = load_bundle(shutil.copytree(exported, tmp_path / "b"))
    bundle.manifest["files"]["../outside"] = bundle.manifest["files"][ONNX]
    with pytest.raises(BundleError, match=r"files\['../outside'\]"):
        bundle.write_manifest()


def test_signature_round_trips_and_names_its_axes() -> None:
    config = LSTMConfig(5, 8, num_layers=2, bidirectional=True, proj_size=3)
    sig = lstm_signature(config)
    assert Signature.from_json(json.loads(json.dumps(sig.to_json()))) == sig
    assert sig.input("h0").shape == ("batch", 4, 3) and sig.input("c0").shape == ("batch", 4, 8)
    assert sig.outputs[0].concrete({"batch": 2, "sequence": 7}) == (2, 7, 6)
    assert sig.outputs[0].wire_shape == [-1, -1, 6]


def test_the_contract_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "import lstm_deploy, lstm_deploy.bundle, lstm_deploy.cli_common\n"
        "bad = [m for m in ('torch', 'numpy', 'lstm_deploy.model') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
