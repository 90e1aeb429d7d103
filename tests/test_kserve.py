"""The bundle's KServe manifest against KServe's own files: its CRD schema and its Triton runtime.

tests/data/kserve/ holds them as KServe v0.20.0 ships them (README.md there): the
InferenceService CRD, whose v1beta1 openAPIV3Schema the manifest must satisfy as the API server
checks it, and the kserve-tritonserver ClusterServingRuntime, which must be the one the manifest
auto-selects, on the Triton release it pins. No cluster: the checks follow KServe's code, cited
in each helper.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import onnx
import pytest
import yaml
from lstm_deploy_export.export.triton import KSERVE_MANIFEST, KSERVE_TRITON_VERSION

DATA = Path(__file__).parent / "data" / "kserve"
ROOT = Path(__file__).resolve().parents[1]
# What Triton 24.10 reads (the sources are in KSERVE_TRITON_VERSION's comment): ONNX Runtime 1.19
# up to ONNX IR 10 and opset 21; libtorch 2.5 TorchScript file format versions 1 to 0xA
# (caffe2/serialize/versions.h, kMaxSupportedFileFormatVersion).
PINNED_READS = {"onnx_ir": 10, "onnx_opset": 21, "torchscript_format": 0xA}
# KServe's InferenceService name format (pkg/apis/serving/v1beta1/inference_service_validation.go).
ISVC_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real export with both models the manifest loads (onnxruntime and libtorch)."""
    import torch
    from lstm_deploy_export.export.writer import export_bundle

    import lstm_deploy

    torch.manual_seed(0)
    model = lstm_deploy.LSTM(3, 4, batch_first=True)
    out = tmp_path_factory.mktemp("kserve") / "bundle"
    return export_bundle(model, out, artifacts=("onnx", "torchscript")).path


@pytest.fixture(scope="module")
def service(bundle: Path) -> dict[str, Any]:
    return yaml.safe_load((bundle / KSERVE_MANIFEST).read_text())


# -- the CRD schema, as the API server applies it ---------------------------------------------


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields rejected, as `kubectl apply` (strict field validation) does.

    A structural CRD schema allows only the fields it lists, except under
    `x-kubernetes-preserve-unknown-fields`; JSON Schema allows any by default, so every object
    node that lists `properties` gets `additionalProperties: false`. Only structural positions
    (properties, items, additionalProperties) are walked, as Kubernetes does.
    """
    node = dict(schema)
    if "properties" in node:
        node["properties"] = {k: _closed(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
    if isinstance(node.get("items"), dict):
        node["items"] = _closed(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _closed(node["additionalProperties"])
    return node


def _list_type(
    validator: Any, list_type: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    # x-kubernetes-list-type: a `set` has unique items, a `map` unique x-kubernetes-list-map-keys.
    if not validator.is_type(instance, "array") or list_type == "atomic":
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = set()
    for item in instance:
        if list_type == "map" and isinstance(item, dict):
            key = json.dumps([item.get(k) for k in keys])
        else:
            key = json.dumps(item, sort_keys=True)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry {key} in a list-type={list_type}")
        seen.add(key)


# The other extensions need nothing: x-kubernetes-int-or-string comes with its anyOf
# [integer, string], and x-kubernetes-map-type only steers server-side apply.
CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type}
)


@pytest.fixture(scope="module")
def crd_schema() -> dict[str, Any]:
    text = gzip.decompress((DATA / "serving.kserve.io_inferenceservices.yaml.gz").read_bytes())
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 2 MB of YAML
    assert crd["spec"]["names"]["kind"] == "InferenceService"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    assert version["served"]
    return version["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def validator(crd_schema: dict[str, Any]) -> Any:
    return CRDValidator(_closed(crd_schema))


def _errors(validator: Any, service: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(service)
    ]


def test_manifest_validates_against_the_crd(service: dict[str, Any], validator: Any) -> None:
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    assert ISVC_NAME.fullmatch(service["metadata"]["name"])
    assert _errors(validator, service) == []


_DELETE = object()
MODEL = "spec.predictor.model"
UNKNOWN = "Additional properties are not allowed"
# (id, field, value or _DELETE, the error it must raise): each breaks one rule of the schema.
BROKEN = [
    ("misspelled-storageURI", f"{MODEL}.storageURI", "s3://b/triton", UNKNOWN),
    ("misspelled-runtimeVersion", f"{MODEL}.runtimeVerison", "24.10-py3", UNKNOWN),
    ("unknown-in-spec", "spec.predictorr", {}, UNKNOWN),
    ("args-not-a-list", f"{MODEL}.args", "--model-control-mode=explicit", "is not of type 'array'"),
    ("runtimeVersion-a-number", f"{MODEL}.runtimeVersion", 24.1, "is not of type 'string'"),
    ("minReplicas-a-string", "spec.predictor.minReplicas", "1", "is not of type 'integer'"),
    ("memory-not-a-quantity", f"{MODEL}.resources.limits.memory", "4GB", "does not match"),
    ("cpu-a-list", f"{MODEL}.resources.limits.cpu", [2], "is not valid under any of the given"),
    ("modelFormat-without-name", f"{MODEL}.modelFormat.name", _DELETE, "'name' is a required"),
    ("no-predictor", "spec.predictor", _DELETE, "'predictor' is a required property"),
    ("duplicate-port", f"{MODEL}.ports", [{"containerPort": 1}] * 2, "duplicate entry"),
]


def _set(service: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    broken = copy.deepcopy(service)
    *parents, leaf = path.split(".")
    node = broken
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return broken


@pytest.mark.parametrize(
    "path,value,error", [pytest.param(*case[1:], id=case[0]) for case in BROKEN]
)
def test_the_crd_check_fails_a_broken_manifest(
    service: dict[str, Any], validator: Any, path: str, value: Any, error: str
) -> None:
    errors = _errors(validator, _set(service, path, value))
    assert errors and any(error in e for e in errors), errors


def test_unknown_fields_pass_without_closing_the_schema(
    service: dict[str, Any], crd_schema: dict[str, Any]
) -> None:
    # Why _closed exists: the schema as JSON Schema reads it lets a misspelled field through.
    misspelled = _set(service, f"{MODEL}.storageURI", "s3://b/triton")
    assert _errors(CRDValidator(crd_schema), misspelled) == []


# -- the runtime KServe picks, and its image --------------------------------------------------


def _runtime() -> dict[str, Any]:
    return yaml.safe_load((DATA / "kserve-tritonserver.yaml").read_text())


def _auto_selects(runtime: dict[str, Any], model: dict[str, Any]) -> bool:
    """Whether KServe picks `runtime` for a predictor `model` that names no runtime.

    After ModelSpec.GetSupportingRuntimes and RuntimeSupportsModel
    (pkg/apis/serving/v1beta1/predictor_model.go): an enabled single-model, single-node runtime
    that lists the model's protocol (v1 when unset) and, among its autoSelect formats, the
    model's format name, or name and version when the model gives one.
    """
    spec = runtime["spec"]
    if spec.get("disabled") or spec.get("multiModel") or "workerSpec" in spec:
        return False
    protocols = spec.get("protocolVersions") or []
    if protocols and model.get("protocolVersion", "v1") not in protocols:
        return False
    labels = set()
    for fmt in spec["supportedModelFormats"]:
        if "runtime" in model or fmt.get("autoSelect"):
            labels.add(fmt["name"])
            if "version" in fmt:
                labels.add(f"{fmt['name']}:{fmt['version']}")
    wanted = model["modelFormat"]
    label = f"{wanted['name']}:{wanted['version']}" if "version" in wanted else wanted["name"]
    return label in labels


def test_manifest_auto_selects_kserve_tritonserver(service: dict[str, Any]) -> None:
    runtime = _runtime()
    assert runtime["kind"] == "ClusterServingRuntime"
    assert runtime["metadata"]["name"] == "kserve-tritonserver"
    model = service["spec"]["predictor"]["model"]
    assert "runtime" not in model  # auto-selected, so any cluster's kserve-tritonserver serves it
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert _auto_selects(runtime, model)


@pytest.mark.parametrize(
    "change",
    [
        {"protocolVersion": _DELETE},  # KServe's default is v1, which the runtime does not speak
        {"protocolVersion": "v1"},
        {"modelFormat": {"name": "pytorch"}},  # listed without autoSelect
        {"modelFormat": {"name": "triton", "version": "1"}},  # the runtime declares version 2
        {"modelFormat": {"name": "torchscript"}},
    ],
    ids=["no-protocol", "v1", "pytorch", "triton-v1", "torchscript"],
)
def test_the_selection_check_fails_a_model_it_would_not_select(
    service: dict[str, Any], change: dict[str, Any]
) -> None:
    model = dict(service["spec"]["predictor"]["model"])
    for key, value in change.items():
        if value is _DELETE:
            del model[key]
        else:
            model[key] = value
    assert not _auto_selects(_runtime(), model)


def _image(runtime_version: str | None) -> str:
    """The runtime's container image after kustomize and KServe's UpdateImageTag.

    config/runtimes/kustomization.yaml maps the placeholder image to NVIDIA's; a runtimeVersion
    replaces the tag (pkg/controller/v1beta1/inferenceservice/utils/utils.go).
    """
    (container,) = _runtime()["spec"]["containers"]
    placeholder = container["image"].split(":")[0]
    kustomization = yaml.safe_load((DATA / "kustomization.yaml").read_text())
    (mapping,) = [i for i in kustomization["images"] if i["name"] == placeholder]
    return f"{mapping['newName']}:{runtime_version or mapping['newTag']}"


def test_manifest_pins_a_triton_that_reads_the_bundle(bundle: Path, service: dict) -> None:
    model = service["spec"]["predictor"]["model"]
    assert _image(None) == "nvcr.io/nvidia/tritonserver:23.05-py3"  # ONNX Runtime 1.15: IR <= 9
    assert model["runtimeVersion"] == KSERVE_TRITON_VERSION
    pinned = _image(model["runtimeVersion"])
    assert pinned == "nvcr.io/nvidia/tritonserver:24.10-py3"
    # README's docker example runs the same image.
    assert pinned in (ROOT / "README.md").read_text()
    # What the bundle needs stays within what that Triton reads.
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    assert graph.ir_version <= PINNED_READS["onnx_ir"]
    assert all(
        o.version <= PINNED_READS["onnx_opset"] for o in graph.opset_import if o.domain == ""
    )
    with zipfile.ZipFile(bundle / "model.pt") as archive:
        (record,) = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/version", n)]
        assert int(archive.read(record)) <= PINNED_READS["torchscript_format"]
