"""`edge-agent calibrate`: fit a model's temperature, confidence method and threshold on data.

Reads labelled data, splits it (seeded), chooses on the calibration part, reports on the
test part only (table, report.json, plots) and writes the result into the model's config.toml.
"""

from __future__ import annotations

import json
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import typer

from edge_agent.calibration import (
    CalibrationError,
    Target,
    choose,
    evaluate,
    stratified_split,
)
from edge_agent.calibration_plots import write_plots
from model_runtime.confidence import OutputKind
from model_runtime.demo import CLOUD_REPOSITORY, EDGE_REPOSITORY, HELDOUT
from model_runtime.errors import ModelError
from model_runtime.model_config import (
    CONFIG_FILE,
    ModelConfig,
    load_model_config,
    write_model_config,
)
from model_runtime.onnx_model import OnnxModel
from model_runtime.tensors import DATATYPE_TO_DTYPE

__all__ = ["CalibrateError", "calibrate_command"]

Array = npt.NDArray[Any]
FloatArray = npt.NDArray[np.float64]

BUNDLED_MODEL = "digits"
BUNDLED_CLOUD_MODEL = CLOUD_REPOSITORY / "digits-large" / "1" / "model.onnx"
_BATCH = 1024
_CLOUD_BATCH = 256


class CalibrateError(Exception):
    """A problem the user can fix (data, options, model); `exit_code` 2, or 1 for a failed cloud."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --- data -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Data:
    path: Path
    x: Array
    y: npt.NDArray[np.int64]
    cloud_pred: npt.NDArray[np.int64] | None


def _labels(path: Path, name: str, values: Array, n: int) -> npt.NDArray[np.int64]:
    """A 1-D array of n whole-number class indices (range checked once K is known)."""
    if values.ndim != 1 or len(values) != n:
        raise CalibrateError(f"{path}: {name} has shape {list(values.shape)}, expected [{n}]")
    if values.dtype.kind not in "iuf" or (
        values.dtype.kind == "f" and not (np.isfinite(values).all() and (values % 1 == 0).all())
    ):
        raise CalibrateError(f"{path}: {name} must hold whole-number class indices")
    return values.astype(np.int64)


def load_data(path: Path) -> Data:
    """Read X, y and optionally cloud_pred from an .npz file, checking what a model can't."""
    if not path.is_file():
        raise CalibrateError(f"{path}: no such file")
    # np.load would take anything else for a pickle or a lone .npy array.
    if not zipfile.is_zipfile(path):
        raise CalibrateError(f"{path}: not an .npz file (numpy.savez writes one)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrateError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [name for name in ("X", "y") if name not in arrays]
    if missing:
        raise CalibrateError(
            f"{path}: missing array {', '.join(missing)} (found: {', '.join(arrays) or 'none'})"
        )
    x = arrays["X"]
    if x.ndim < 2 or len(x) == 0:
        raise CalibrateError(f"{path}: X has shape {list(x.shape)}, expected [items, features...]")
    if x.dtype.kind not in "iufb":
        raise CalibrateError(f"{path}: X has dtype {x.dtype}, expected numbers")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0].tolist()
        raise CalibrateError(f"{path}: X holds a non-finite value at index {bad}")
    y = _labels(path, "y", arrays["y"], len(x))
    cloud = arrays.get("cloud_pred")
    return Data(path, x, y, None if cloud is None else _labels(path, "cloud_pred", cloud, len(x)))


def _check_range(path: Path, name: str, labels: npt.NDArray[np.int64], classes: int) -> None:
    bad = labels[(labels < 0) | (labels >= classes)]
    if len(bad):
        raise CalibrateError(
            f"{path}: {name} has labels out of range ({int(bad[0])}; the model has "
            f"{classes} classes, 0..{classes - 1})"
        )


# --- models -------------------------------------------------------------------------------------


def _model_input(model: OnnxModel, data: Data) -> tuple[str, Array]:
    """X checked against the model's one input and cast to its datatype."""
    if len(model.inputs) != 1:
        names = ", ".join(spec.name for spec in model.inputs)
        raise CalibrateError(
            f"model '{model.name}' has {len(model.inputs)} inputs ({names}); "
            "calibrate feeds X to a model with one input"
        )
    spec = model.inputs[0]
    shape = data.x.shape
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) for got, want in zip(shape[1:], spec.shape[1:], strict=True)
    ):
        raise CalibrateError(
            f"{data.path}: X has shape {list(shape)}, but model '{model.name}' input "
            f"'{spec.name}' expects {list(spec.shape)}"
        )
    dtype = DATATYPE_TO_DTYPE.get(spec.datatype, np.dtype(np.float32))
    return spec.name, data.x.astype(dtype, copy=False)


def _model_scores(model: OnnxModel, data: Data) -> FloatArray:
    """The model's class scores for every item of X, in batches."""
    name, x = _model_input(model, data)
    parts = [
        model.predict({name: x[i : i + _BATCH]}).outputs[model.scores_output]
        for i in range(0, len(x), _BATCH)
    ]
    scores = np.concatenate(parts).astype(np.float64)
    if scores.ndim != 2 or not np.isfinite(scores).all():
        raise CalibrateError(f"model '{model.name}' gave non-finite or non-2-D class scores")
    if model.config.output_kind is OutputKind.PROBABILITIES and (scores < 0).any():
        raise CalibrateError(
            f"model '{model.name}': output '{model.scores_output}' has negative values, so it "
            'is not probabilities; set output_kind = "logits" in its config.toml'
        )
    return scores


def _load_model(repository: Path, name: str) -> OnnxModel:
    from model_runtime.repository import ModelRepository

    try:
        models = ModelRepository.load(repository)
    except ModelError as exc:
        raise CalibrateError(f"{repository}: {exc}") from None
    if name not in models.names():
        known = ", ".join(models.names())
        raise CalibrateError(f"{repository} has no model '{name}' (models: {known})")
    return models.get(name)


def _cloud_model_predictions(path: Path, data: Data) -> Array:
    """argmax of a cloud ONNX model; its config.toml is read when it sits in a repository."""
    name = path.parent.parent.name if path.parent.name.isdigit() else path.stem
    try:
        config = (
            load_model_config(name, path.parent.parent / CONFIG_FILE)
            if path.parent.name.isdigit()
            else ModelConfig()
        )
        if not path.is_file():
            raise CalibrateError(f"{path}: no such cloud model file")
        model = OnnxModel(name, 1, path, config)
    except ModelError as exc:
        raise CalibrateError(f"{path}: {exc}") from None
    return np.asarray(_model_scores(model, data).argmax(axis=1))


def _cloud_url_predictions(
    url: str, model: OnnxModel, data: Data, key_file: Path | None
) -> tuple[Array, str]:
    """Ask a v2 REST server (the cloud gateway, Triton, KServe...) for the cloud's answers."""
    import httpx

    from model_runtime.v2_json import decode_infer_response, encode_infer_request

    cloud_model = model.config.cloud_model
    if cloud_model is None:
        raise CalibrateError(
            f"model '{model.name}' names no cloud_model in its {CONFIG_FILE}; --cloud-url needs it"
        )
    headers = {}
    if key_file is not None:
        try:
            headers["Authorization"] = f"Bearer {key_file.read_text(encoding='utf-8').strip()}"
        except OSError as exc:
            raise CalibrateError(
                f"{key_file}: cannot read the device key ({exc.strerror})"
            ) from None
    endpoint = f"{url.rstrip('/')}/v2/models/{cloud_model}/infer"
    name, x = _model_input(model, data)
    labels: list[Array] = []
    with httpx.Client(timeout=30.0, headers=headers) as client:
        for i in range(0, len(x), _CLOUD_BATCH):
            part = x[i : i + _CLOUD_BATCH]
            request_id = str(uuid.uuid4())
            body = encode_infer_request({name: part}, request_id=request_id)
            try:
                response = client.post(endpoint, json=body, headers={"Idempotency-Key": request_id})
                response.raise_for_status()
                outputs = decode_infer_response(response.json()).outputs
            except httpx.HTTPStatusError as exc:
                status = exc.response.status_code
                raise CalibrateError(
                    f"{endpoint}: HTTP {status}: {exc.response.text[:200]}", 1
                ) from None
            except (httpx.HTTPError, ValueError, ModelError) as exc:
                raise CalibrateError(f"{endpoint}: {exc}", exit_code=1) from None
            labels.append(_labels_from_outputs(endpoint, outputs, len(part), model.scores_output))
    return np.concatenate(labels), f"{url} (model {cloud_model})"


def _labels_from_outputs(endpoint: str, outputs: dict[str, Array], n: int, prefer: str) -> Array:
    """Class indices: argmax of an [n, K] float output (the one named like the edge model's
    scores output first), else an [n] integer label output."""
    preferred = [outputs[prefer]] if prefer in outputs else []
    for a in [*preferred, *outputs.values()]:
        if a.ndim == 2 and a.shape[0] == n and a.dtype.kind == "f":
            return np.asarray(a.argmax(axis=1))
    for a in outputs.values():
        if a.shape == (n,) and a.dtype.kind in "iu":
            return a.astype(np.int64)
    raise CalibrateError(f"{endpoint}: no [{n}, K] scores or [{n}] labels in the response", 1)


def _is_bundled(model: OnnxModel, repository: Path) -> bool:
    """The bundled demo model, wherever it was copied to (same name, same ONNX bytes)."""
    bundled = EDGE_REPOSITORY / BUNDLED_MODEL / "1" / "model.onnx"
    mine = repository / model.name / str(model.version) / "model.onnx"
    return model.name == BUNDLED_MODEL and mine.read_bytes() == bundled.read_bytes()


# --- output -------------------------------------------------------------------------------------


def format_table(report: dict[str, Any]) -> str:
    """The report as aligned text: what was chosen, and how it does on the test part."""
    t, c, target = report["test"], report["chosen"], report["target"]

    def fmt(v: float | None, spec: str = ".4f") -> str:
        return "undefined" if v is None else format(v, spec)

    rows = [
        (
            "calibration / test part",
            f"{report['calibration_items']} / {report['test_items']} items",
        ),
        ("cloud answers from", report["cloud_source"]),
        ("target", f"{target['kind']} {target['value']:g}"),
        ("temperature", f"{c['temperature']:.4f}"),
        ("ECE before / after scaling", f"{t['ece_before']:.4f} / {t['ece_after']:.4f}"),
        *((f"AURC {m}", f"{v:.5f}") for m, v in t["aurc"].items()),
        ("confidence method", f"{c['confidence_method']} (lowest AURC on the calibration part)"),
        ("threshold", f"{c['threshold']:.6f}"),
        ("realized escalation", f"{t['escalation_rate']:.1%}"),
        ("accuracy edge / hybrid / cloud", " / ".join(f"{v:.4f}" for v in t["accuracy"].values())),
        ("PGR", fmt(t["pgr"])),
        ("APGR", fmt(t["apgr"])),
        *((f"CPT({k})", fmt(v, ".1%")) for k, v in t["cpt"].items()),
    ]
    width = max(len(name) for name, _ in rows)
    head = (
        f"calibration of {report['model']} version {report['version']} on {report['data']} "
        f"(seed {report['seed']}); figures on the test part only"
    )
    return "\n".join([head, *(f"  {name:<{width}}  {value}" for name, value in rows)])


# --- the command -------------------------------------------------------------------------------


def _target(escalation: float | None, accuracy: float | None, pgr: float | None) -> Target:
    options = (
        Target("escalation", escalation) if escalation is not None else None,
        Target("accuracy", accuracy) if accuracy is not None else None,
        Target("pgr", pgr) if pgr is not None else None,
    )
    given = [t for t in options if t is not None]
    if len(given) > 1:
        raise CalibrateError("give one of --target-escalation, --target-accuracy, --target-pgr")
    target = given[0] if given else Target("escalation", 0.2)
    if not 0.0 <= target.value <= 1.0:
        raise CalibrateError(f"--target-{target.kind} {target.value:g} is not in [0, 1]")
    return target


@dataclass(frozen=True, slots=True)
class Request:
    """The command's options, checked and with defaults filled in."""

    repository: Path
    model: str
    data: Path | None
    cloud_model: Path | None
    cloud_url: str | None
    device_key_file: Path | None
    target: Target
    report_dir: Path | None
    dry_run: bool
    seed: int
    share: float


def _cloud_correct(req: Request, model: OnnxModel, data: Data, bundled: bool) -> tuple[Array, str]:
    """Which items the cloud gets right, and where its answers came from."""
    if req.cloud_model is not None:
        pred, source = _cloud_model_predictions(req.cloud_model, data), str(req.cloud_model)
    elif req.cloud_url is not None:
        pred, source = _cloud_url_predictions(req.cloud_url, model, data, req.device_key_file)
    elif data.cloud_pred is not None:
        pred, source = data.cloud_pred, f"cloud_pred in {data.path.name}"
    elif bundled:
        pred, source = _cloud_model_predictions(BUNDLED_CLOUD_MODEL, data), "bundled digits-large"
    else:
        raise CalibrateError(
            f"{data.path} has no cloud_pred array: give --cloud-model PATH.onnx or --cloud-url URL"
        )
    return np.asarray(pred, dtype=np.int64), source


def run_calibration(req: Request) -> tuple[dict[str, Any], list[Path]]:
    """Everything `calibrate` does; raises CalibrateError before changing anything on disk."""
    if not 0.0 < req.share < 1.0:
        raise CalibrateError(f"--calibration-share {req.share:g} is not between 0 and 1")
    if req.cloud_model is not None and req.cloud_url is not None:
        raise CalibrateError("give one of --cloud-model and --cloud-url")
    if req.report_dir is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CalibrateError(
                "--report needs matplotlib: pip install 'edge-cloud-router[plots]'"
            ) from None
    model = _load_model(req.repository, req.model)
    bundled = _is_bundled(model, req.repository)
    if req.data is None and not bundled:
        raise CalibrateError(
            f"--data FILE.npz is required: the bundled held-out split fits only "
            f"the demo model, not '{req.model}'"
        )
    data = load_data(req.data or HELDOUT)
    scores = _model_scores(model, data)
    classes = scores.shape[1]
    _check_range(data.path, "y", data.y, classes)
    cloud_pred, source = _cloud_correct(req, model, data, bundled)
    _check_range(data.path, "cloud_pred", cloud_pred, classes)
    cloud_correct = cloud_pred == data.y

    cal_idx, test_idx = stratified_split(data.y, req.share, req.seed)
    if min(len(cal_idx), len(test_idx)) < 2:
        raise CalibrateError(f"{data.path}: {len(data.y)} items are too few to split in two")
    kind = model.config.output_kind
    try:
        choice = choose(scores[cal_idx], data.y[cal_idx], cloud_correct[cal_idx], kind, req.target)
        ev = evaluate(scores[test_idx], data.y[test_idx], cloud_correct[test_idx], kind, choice)
    except CalibrationError as exc:
        raise CalibrateError(str(exc)) from None

    config_path = req.repository / req.model / CONFIG_FILE
    report: dict[str, Any] = {
        "model": model.name,
        "version": model.version,
        "data": str(data.path),
        "items": len(data.y),
        "classes": classes,
        "seed": req.seed,
        "calibration_share": req.share,
        "calibration_items": len(cal_idx),
        "test_items": len(test_idx),
        "cloud_source": source,
        "target": {"kind": req.target.kind, "value": req.target.value},
        "chosen": {
            "confidence_method": choice.method.value,
            "threshold": choice.threshold,
            "temperature": choice.temperature,
            "aurc_on_calibration_part": {m.value: v for m, v in choice.aurc.items()},
        },
        "test": ev.summary(),
        "config": {"path": str(config_path), "written": False, "backup": None},
    }
    plots: list[Path] = []
    try:
        if req.report_dir is not None:
            req.report_dir.mkdir(parents=True, exist_ok=True)
            plots = write_plots(req.report_dir, ev, choice)
        # The config is written last, so any failure above leaves it as it was.
        if not req.dry_run:
            update = {
                "threshold": choice.threshold,
                "temperature": choice.temperature,
                "confidence_method": choice.method,
            }
            new = ModelConfig.model_validate(model.config.model_dump() | update)
            backup = write_model_config(config_path, new)
            report["config"].update(written=True, backup=None if backup is None else str(backup))
        if req.report_dir is not None:
            text = json.dumps(report, indent=2) + "\n"
            (req.report_dir / "report.json").write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CalibrateError(f"{exc.filename or config_path}: {exc.strerror or exc}", 1) from None
    return report, plots


def calibrate_command(
    model_repository: Annotated[
        Path | None, typer.Option(help="Model repository directory (default: the bundled demo).")
    ] = None,
    model: Annotated[str, typer.Option(help="Model to calibrate.")] = BUNDLED_MODEL,
    data: Annotated[
        Path | None,
        typer.Option(
            help=".npz of X (inputs), y (labels), optional cloud_pred "
            "(default: the demo's held-out split)."
        ),
    ] = None,
    cloud_model: Annotated[
        Path | None, typer.Option(help="Cloud model .onnx whose answers to compare with.")
    ] = None,
    cloud_url: Annotated[
        str | None, typer.Option(help="v2 REST server to ask for the cloud's answers.")
    ] = None,
    device_key_file: Annotated[
        Path | None, typer.Option(help="File holding the device key for --cloud-url.")
    ] = None,
    target_escalation: Annotated[
        float | None, typer.Option(help="Share of requests to send to the cloud (default: 0.2).")
    ] = None,
    target_accuracy: Annotated[
        float | None, typer.Option(help="Hybrid accuracy to reach with the fewest cloud calls.")
    ] = None,
    target_pgr: Annotated[
        float | None, typer.Option(help="Share of the edge-to-cloud accuracy gap to recover.")
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Directory to write report.json and PNG plots to.")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Report only; leave config.toml as it is.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the calibration/test split.")] = 0,
    calibration_share: Annotated[
        float, typer.Option(help="Share of the data to choose on; the rest is the test part.")
    ] = 0.5,
) -> None:
    """Fit temperature, confidence method and threshold on labelled data; report on held-out data."""
    try:
        req = Request(
            model_repository or EDGE_REPOSITORY,
            model,
            data,
            cloud_model,
            cloud_url,
            device_key_file,
            _target(target_escalation, target_accuracy, target_pgr),
            report,
            dry_run,
            seed,
            calibration_share,
        )
        result, plots = run_calibration(req)
    except CalibrateError as exc:
        typer.echo(f"edge-agent calibrate: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    typer.echo(format_table(result))
    config = result["config"]
    if config["written"]:
        kept = f" (previous config kept as {config['backup']})" if config["backup"] else ""
        typer.echo(f"wrote {config['path']}{kept}")
    else:
        typer.echo(f"dry run: {config['path']} left as it was")
    if report is not None:
        names = ", ".join(p.name for p in plots)
        typer.echo(f"report: {report / 'report.json'}; plots: {names}")
