"""The ``training`` command line: one sub-command per step of the model workflow.

Each sub-command is a :class:`Command` (name, help, a function that adds its
arguments, a function that runs it) in :data:`COMMANDS`; adding ``fit`` or
``evaluate`` means writing those two functions and appending one entry.
Errors a user can fix (bad arguments, bad values, unwritable folders) become
a one-line message on stderr and a non-zero exit code, never a traceback: every
error the training side raises on purpose is a :class:`~training.errors.TrainingError`,
caught once in :func:`main`; the few foreign ones a step may raise (the model side's
``AnalysisError``, torch's run-time errors) are wrapped in :class:`CommandFailed`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from training.errors import TrainingError
from training.nih import CHEXNET_AUROC, FIT_PRESETS, TABLE_FILE, chexnet_table
from training.synth import VARIANTS, SynthError, parse_size, synthesize

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CLIError(TrainingError):
    """A problem the user can fix; its message is shown without a traceback."""


class Command(NamedTuple):
    """One sub-command: ``add_arguments(parser)`` then ``run(args) -> exit code``."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'"{text}" is not an integer') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'"{text}" is not an integer') from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be non-negative")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'"{text}" is not a number') from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not within 0..1")
    return value


def _size(text: str) -> tuple[int, int]:
    """``N`` (square) or ``RxC`` (rows x columns)."""
    parts = text.lower().split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'"{text}" is not N or ROWSxCOLUMNS (e.g. 1024 or 2500x2048)'
        ) from None
    if len(numbers) not in (1, 2):
        raise argparse.ArgumentTypeError(
            f'"{text}" is not N or ROWSxCOLUMNS (e.g. 1024 or 2500x2048)'
        )
    rows, cols = numbers[0], numbers[-1]
    try:
        parse_size((rows, cols))
    except SynthError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return rows, cols


def _variant_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f'unknown variant "{unknown[0] if unknown else text}"; choose from {", ".join(VARIANTS)}'
        )
    return names


# --------------------------------------------------------------------------- synth


def _add_synth(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="output folder (created if missing)")
    parser.add_argument("--count", type=_positive_int, help="number of studies to write")
    parser.add_argument("--seed", type=_seed, default=0, help="random seed (same seed, same files)")
    parser.add_argument(
        "--size", type=_size, help="N or ROWSxCOLUMNS; default: realistic detector sizes"
    )
    parser.add_argument(
        "--variants", type=_variant_list, help="comma-separated variants (see --list-variants)"
    )
    parser.add_argument(
        "--prevalence", type=_probability, default=0.3, help="probability of each finding"
    )
    parser.add_argument("--list-variants", action="store_true", help="list the variants and exit")


def _run_synth(args: argparse.Namespace) -> int:
    if args.list_variants:
        for name, description in VARIANTS.items():
            print(f"{name:26s} {description}")
        return EXIT_OK
    if args.out is None or args.count is None:
        raise CLIError("--out and --count are required")
    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f'--out "{args.out}" exists and is not a folder')
    with tqdm(total=args.count, unit="study", desc="synth", disable=args.quiet or None) as bar:
        summary = synthesize(
            args.out,
            args.count,
            args.seed,
            size=args.size,
            variants=args.variants,
            prevalence=args.prevalence,
            progress=bar.update,
        )
    positives = ", ".join(f"{k}={v}" for k, v in summary.positives.items())
    print(
        f"wrote {summary.images} images in {summary.studies} studies of {summary.patients} patients "
        f"to {summary.out_dir}\npositives: {positives}\nlabels: {summary.labels_csv}  boxes: {summary.boxes_json}"
        f"  locations: {summary.locations_json}"
    )
    return EXIT_OK


# --------------------------------------------------------------------------- evaluate, calibrate,
# export, deidentify (heavy modules are imported when the command runs, so `--help` stays fast)


class CommandFailed(TrainingError):
    """A step failed for a reason its message states (a model-side or torch error)."""


def _failures() -> tuple[type[BaseException], ...]:
    """Errors from outside ``training`` that the model-side steps turn into exit code 1
    (``TrainingError`` needs no wrapping: :func:`main` catches it)."""
    from ai.types import AnalysisError

    return (AnalysisError, RuntimeError)  # RuntimeError: torch out of memory, device errors


def _progress(args: argparse.Namespace, unit: str = "image") -> Callable[[int | None, str], tqdm]:
    return lambda total, desc: tqdm(total=total, desc=desc, unit=unit,
                                    disable=args.quiet or None)  # fmt: skip


def _add_labelled_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="folder tree of DICOM files")
    parser.add_argument(
        "--labels", type=Path, required=True,
        help="CSV keyed by sop_instance_uid, path (relative to --data) or study_instance_uid; "
        "one 0/1 column per label or a `label` column",
    )  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda:0")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward")
    parser.add_argument(
        "--all-images", action="store_true",
        help="also analyse images the node would ignore (lateral, non-CR/DX)",
    )  # fmt: skip


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle", type=Path, action="append", required=True,
        help="model bundle folder; repeat to evaluate several (run together, as the node does)",
    )  # fmt: skip
    _add_labelled_data(parser)
    parser.add_argument("--out", type=Path, required=True, help="report folder (created)")
    parser.add_argument("--boxes", type=Path, help="YOLO JSON box truth (detection bundles)")
    parser.add_argument("--locations", type=Path,
                        help="finding boxes and lung masks per image for the Grad-CAM "
                        "localisation figures (default: locations.json beside --labels)")
    parser.add_argument("--bootstrap", type=_positive_int, default=2000,
                        help="bootstrap resamples for the AUROC / F1 / AP intervals")  # fmt: skip
    parser.add_argument("--seed", type=_seed, default=0, help="bootstrap seed")
    parser.add_argument("--no-curves", action="store_true", help="skip the ROC/PR PNGs")


def _run_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import run_evaluation
    from training.report import (
        CLASSIFICATION_HEADERS,
        DETECTION_HEADERS,
        LOCALISATION_HEADERS,
        classification_rows,
        detection_rows,
        localisation_rows,
        markdown_table,
    )

    try:
        report, files = run_evaluation(
            args.bundle, args.data, args.labels, args.out, boxes_json=args.boxes,
            device=args.device, batch_size=args.batch_size, all_images=args.all_images,
            n_boot=args.bootstrap, seed=args.seed, curves=not args.no_curves,
            progress=_progress(args), locations_json=args.locations,
        )  # fmt: skip
    except _failures() as exc:
        raise CommandFailed(str(exc)) from exc
    for model in report.models:
        print(f"{model.identity.name} {model.identity.version} ({model.identity.device_uid})")
        if model.detection is not None:
            print(markdown_table(DETECTION_HEADERS, detection_rows(model.detection)))
        if model.labels or model.detection is None:
            print(markdown_table(CLASSIFICATION_HEADERS, classification_rows(model.labels)))
        if model.localisation is not None:
            print("Grad-CAM localisation on true positives:")
            print(markdown_table(LOCALISATION_HEADERS, localisation_rows(model.localisation)))
        nih_labels = {m.label: {"evaluated": {"auroc": m.auroc.as_dict()}}
                      for m in model.labels if m.label in CHEXNET_AUROC}  # fmt: skip
        if nih_labels:  # ChestX-ray14 labels: also the CheXNet paper's table
            print(chexnet_table(nih_labels, "evaluated"))
    print(f"report: {files['report']}  metrics: {files['metrics']}  "
          f"predictions: {files['predictions']}  curves: {len(files['curves'])}")  # fmt: skip
    return EXIT_OK


def _label_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f'"{text}" names no label')
    return names


def _add_calibrate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder to calibrate")
    _add_labelled_data(parser)
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--target-sensitivity", type=_probability, metavar="S",
                      help="highest threshold reaching sensitivity S (e.g. 0.9)")  # fmt: skip
    rule.add_argument("--youden", action="store_true", help="maximise sensitivity + specificity")
    parser.add_argument("--labels-subset", type=_label_list, metavar="A,B",
                        help="calibrate only these labels (the others keep their thresholds)")  # fmt: skip
    parser.add_argument("--out", type=Path,
                        help="write the calibrated bundle here (default: update --bundle)")  # fmt: skip
    parser.add_argument("--version", help="new version (default: bump the patch number)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def _run_calibrate(args: argparse.Namespace) -> int:
    from training.calibrate import run_calibration

    try:
        outcome = run_calibration(
            args.bundle, args.data, args.labels,
            method="youden" if args.youden else "target_sensitivity",
            target=args.target_sensitivity, labels_subset=args.labels_subset, out=args.out,
            version=args.version, device=args.device, batch_size=args.batch_size,
            all_images=args.all_images, progress=_progress(args), force=args.force,
        )  # fmt: skip
    except _failures() as exc:
        raise CommandFailed(str(exc)) from exc
    before, after = outcome.before, outcome.after
    print(f"{after.name}: {before.version} -> {after.version}, device UID {after.device_uid}")
    for r in outcome.labels:
        if r.threshold is None:
            print(f"  {r.label:20s} kept {r.previous_threshold:.4g} ({r.reason})")
        else:
            sens, spec = (r.sensitivity or {}).get("value"), (r.specificity or {}).get("value")
            print(f"  {r.label:20s} {r.previous_threshold:.4g} -> {r.threshold:.4g}  "
                  f"sens {_fmt3(sens)} spec {_fmt3(spec)} (n+ {r.n_pos}, n- {r.n_neg})")  # fmt: skip
    print(f"bundle: {outcome.bundle}")
    return EXIT_OK


def _fmt3(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _add_export(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", dest="run_dir", type=Path,
                        help="training run folder holding a bundle")  # fmt: skip
    source.add_argument("--bundle", type=Path, help="bundle folder")
    parser.add_argument("--out", type=Path, required=True, help="exported bundle folder")
    parser.add_argument("--name", help="model name (default: keep)")
    parser.add_argument("--version", help="model version (default: keep)")
    parser.add_argument("--description", help="one-line description")
    parser.add_argument("--metrics", type=Path,
                        help="metrics.json of `training evaluate` on this bundle")  # fmt: skip
    parser.add_argument("--check-dicom", type=Path, metavar="FILE",
                        help="run the exported bundle on this DICOM file as a smoke test")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="export without validation metrics or training record")  # fmt: skip


def _run_export(args: argparse.Namespace) -> int:
    from training.export import run_export

    try:
        outcome = run_export(
            args.out, bundle=args.bundle, run=args.run_dir, name=args.name, version=args.version,
            description=args.description, metrics_json=args.metrics,
            check_dicom=args.check_dicom, force=args.force,
            allow_incomplete=args.allow_incomplete,
        )  # fmt: skip
    except _failures() as exc:
        raise CommandFailed(str(exc)) from exc
    meta = outcome.metadata
    print(f"exported {meta.name} {meta.version} (device UID {meta.device_uid}) to {outcome.out}")
    _print_outcome(outcome)
    return EXIT_OK


def _print_outcome(outcome: Any) -> None:
    """Warnings and the ``--check-dicom`` result of an export or an import."""
    for warning in outcome.warnings:
        print(f"warning: {warning}")
    if outcome.check is not None:
        calls = ", ".join(f"{f.label} {f.probability:.3f}{'+' if f.positive else ''}"
                          for f in outcome.check.findings)  # fmt: skip
        print(f"check: loaded and analysed one image: {calls}")


def _threshold_list(text: str) -> list[float]:
    try:
        return [float(v) if v.strip() else float("nan") for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f'"{text}" is not a comma-separated list of numbers') from None


def _add_import_weights(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", dest="fmt", required=True,
                        choices=["torchvision-densenet121", "torchxrayvision-densenet121"],
                        help="checkpoint layout: torchvision's DenseNet121 (CheXNet "
                        "re-implementations) or torchxrayvision's DenseNet")  # fmt: skip
    parser.add_argument("--weights", type=Path, required=True, help="state dict file (.pt/.pth)")
    parser.add_argument("--labels", metavar="A,B,...|@FILE",
                        help="output names in checkpoint order, empty = skip that output "
                        "(default: the 14 CheXNet labels / torchxrayvision's 18 pathologies)")  # fmt: skip
    parser.add_argument("--thresholds", type=_threshold_list, metavar="T1,T2,...",
                        help="operating threshold per output (default: op_threshs in the file, "
                        "else 0.5: then run training calibrate)")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument("--name", help="model name (default: chexnet-densenet121 / xrv-densenet121)")
    parser.add_argument("--version", default="1.0.0", help="model version (1.0.0)")
    parser.add_argument("--description", help="one-line description")
    parser.add_argument("--check-dicom", type=Path, metavar="FILE",
                        help="run the imported bundle on this DICOM file as a smoke test")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--ood-images", type=Path, metavar="FOLDER",
                        help="DICOM images of your own in-distribution data: fits the "
                        "out-of-distribution gate (60 %% fit, 40 %% set the threshold); "
                        "without it the bundle has no gate")  # fmt: skip
    parser.add_argument("--ood-quantile", type=_probability, default=0.975,
                        help="fraction of those validation images that pass the gate (0.975)")


def _run_import_weights(args: argparse.Namespace) -> int:
    from training.import_weights import import_weights

    try:
        outcome = import_weights(
            args.fmt, args.weights, args.out, labels=args.labels, thresholds=args.thresholds,
            name=args.name, version=args.version, description=args.description,
            check_dicom=args.check_dicom, force=args.force, ood_images=args.ood_images,
            ood_quantile=args.ood_quantile,
        )  # fmt: skip
    except _failures() as exc:
        raise CommandFailed(str(exc)) from exc
    meta = outcome.metadata
    print(f"imported {meta.name} {meta.version} (device UID {meta.device_uid}) to {outcome.out}")
    print(f"input: {meta.input.channels} channel(s), {meta.input.size} px, values "
          f"{meta.input.value_range[0]:g}..{meta.input.value_range[1]:g}")  # fmt: skip
    for spec in meta.labels:
        print(f"  {spec.name:28s} threshold {spec.threshold:.4g}")
    print(f"out-of-distribution gate: threshold {meta.ood['threshold']:.2f} "
          f"({meta.ood['n_fit']} fit, {meta.ood['n_val']} validation images)" if meta.ood
          else "no out-of-distribution gate (give --ood-images to fit one)")
    _print_outcome(outcome)
    return EXIT_OK


def _add_ood_gate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder (rewritten)")
    parser.add_argument("--images", type=Path, required=True, metavar="FOLDER",
                        help="DICOM, PNG or JPEG images of the data the model is meant for: "
                        "60 %% fit the statistics, 40 %% set the threshold")  # fmt: skip
    parser.add_argument("--quantile", type=_probability, default=0.975,
                        help="fraction of the threshold images that pass (default 0.975)")
    parser.add_argument("--seed", type=_seed, default=0, help="split seed (default 0)")


def _run_ood_gate(args: argparse.Namespace) -> int:
    from training.ood import gate_bundle, image_files, split_files

    try:
        fit, val = split_files(image_files(args.images), 0.4, args.seed)
        gate = gate_bundle(args.bundle, fit, val, quantile=args.quantile,
                           fitted_on=f"{len(fit) + len(val)} images of {args.images.name}")
    except _failures() as exc:
        raise CommandFailed(str(exc)) from exc
    print(f"out-of-distribution gate of {args.bundle}: {gate.dim} features, threshold "
          f"{gate.threshold:.2f} ({gate.quantile:.1%} of {gate.n_val} validation images pass; "
          f"fitted on {gate.n_fit})")  # fmt: skip
    return EXIT_OK


def _add_deidentify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="in_dir", type=Path, required=True, help="DICOM tree")
    parser.add_argument("--out", type=Path, required=True, help="de-identified tree (new)")
    parser.add_argument("--salt",
                        help="secret key for UIDs and pseudonyms (or env TRAINING_DEID_SALT); "
                        "same salt, same mapping")  # fmt: skip
    parser.add_argument("--labels", type=Path, help="labels CSV to rewrite onto the new tree")
    parser.add_argument("--boxes", type=Path, help="YOLO JSON boxes to rewrite onto new paths")
    parser.add_argument("--allow-burned-in", action="store_true",
                        help="also write images flagged BurnedInAnnotation YES (counted)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")


def _run_deidentify(args: argparse.Namespace) -> int:
    from training.deidentify import REPORT_NAME, run_deidentify, salt_from

    logging.getLogger("pydicom").setLevel(logging.WARNING)  # its debug output quotes values
    with tqdm(unit="file", desc="deidentify", disable=args.quiet or None) as bar:

        def total(n: int) -> None:
            bar.total = n
            bar.refresh()

        try:
            result = run_deidentify(
                args.in_dir, args.out, salt=salt_from(args.salt), labels_csv=args.labels,
                boxes_json=args.boxes, allow_burned_in=args.allow_burned_in,
                force=args.force, progress=bar.update, on_total=total,
            )  # fmt: skip
        except _failures() as exc:
            raise CommandFailed(str(exc)) from exc
    files = ", ".join(f"{v} {k}" for k, v in result.report["files"].items())
    print(f"{result.report['instances']} instance(s), {result.report['studies']} study(ies), "
          f"{result.report['patients']} patient(s) written to {args.out}\nfiles: {files}\n"
          f"report: {args.out / REPORT_NAME}")  # fmt: skip
    return EXIT_OK


# --------------------------------------------------------------------------- fit


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f'"{text}" is not TRAIN,VAL,TEST (e.g. 0.7,0.15,0.15)') from None
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f'"{text}" must be three fractions summing to 1')
    return values  # type: ignore[return-value]


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f'"{text}" is not JSON: {exc}') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'"{text}" must be a JSON object')
    return value


def _name_tuple(text: str) -> tuple[str, ...]:
    return tuple(n.strip().upper() for n in text.split(",") if n.strip())


def _non_negative(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _add_fit(parser: argparse.ArgumentParser) -> None:
    # Defaults live in the task configurations (training.fit.classification.FitConfig,
    # training.fit.detection.DetectionFitConfig); SUPPRESS keeps unspecified options out of
    # the namespace so --resume can tell what the user asked to change.
    S = argparse.SUPPRESS
    add = parser.add_argument
    add("--data", type=Path, default=S,
        help="folder tree of exported DICOM (or PNG / JPEG images with an NIH label file)")
    add("--labels", type=Path, default=S,
        help="CSV keyed by sop_instance_uid, path (relative to --data) or study_instance_uid; "
        "one 0/1 column per label (multi-label) or a `label` column (multi-class); or the NIH "
        "ChestX-ray14 layout (Image Index, Finding Labels with |, Patient ID; .csv or .csv.gz). "
        "--task detection: YOLO boxes (folder of .txt or JSON map; empty list = negative "
        "image) or an NIH box CSV (Image Index, Finding Label, x, y, w, h)")
    add("--out", type=Path, default=S, help="run folder (created; must not hold a run)")
    add("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from last.pt")
    add("--task", choices=["classification", "detection"], default=S,
        help="what to train: classification (default) or detection (MONAI RetinaNet)")
    add("--labels-key", choices=["auto", "sop", "path", "study"], default=S,
        help="label CSV key column (default auto: sop, then path, then study)")
    add("--label-names", type=lambda t: tuple(_label_list(t)), default=S, metavar="A,B",
        help="label columns (multi-label) or class order (multi-class); default: all")
    add("--strict", action="store_true", default=S, help="fail on any label/image mismatch")
    add("--modalities", type=_name_tuple, default=S, metavar="CR,DX",
        help="train on these modalities only (default CR,DX; empty string: all)")
    add("--network", default=S,
        help="densenet121 (default), resnet18, resnet50, efficientnet-b0, densenet (with args)")
    add("--network-args", type=_json_object, default=S, metavar="JSON",
        help='extra network arguments, e.g. \'{"init_features": 16, "block_config": [2, 2, 2, 2]}\'')
    add("--pretrained", type=Path, default=S, metavar="FILE",
        help="initial weights: a state_dict file (mismatching tensors are reported and skipped)")
    add("--image-size", type=_positive_int, default=S, help="model input side in pixels (224)")
    add("--clahe", action="store_true", default=S, help="CLAHE in preprocessing (node does too)")
    add("--epochs", type=_positive_int, default=S, help="epochs (20)")
    add("--max-steps", type=_non_negative, default=S, help="stop after N optimiser steps (0: off)")
    add("--batch-size", type=_positive_int, default=S, help="images per step and process (16)")
    add("--lr", type=float, default=S, help="peak AdamW learning rate (1e-3)")
    add("--weight-decay", type=float, default=S, help="AdamW weight decay (1e-4)")
    add("--warmup-steps", type=int, default=S, help="linear warm-up steps (-1: 5%% of all)")
    add("--min-lr-ratio", type=float, default=S, help="cosine floor as a fraction of --lr (0.01)")
    add("--clip-grad", type=float, default=S, help="gradient norm clip (1.0; 0: off)")
    add("--loss", choices=["bce", "focal", "weighted-bce"], default=S,
        help="bce (BCE / CE), focal, or weighted-bce (CheXNet: per-label P/N weights)")
    add("--optimizer", choices=["adamw", "adam"], default=S, help="adamw (default) or adam")
    add("--schedule", choices=["cosine", "plateau"], default=S,
        help="cosine (default) or plateau (LR / 10 when the validation loss stops falling)")
    add("--preset", choices=sorted(FIT_PRESETS), default=S,
        help="chexnet: DenseNet121, the 14 ChestX-ray14 labels, 224 px, weighted BCE, Adam "
        "lr 1e-3 betas (0.9, 0.999), LR / 10 on plateau, batch 16, split 0.7,0.1,0.2 "
        "(options given explicitly win)")
    add("--focal-gamma", type=float, default=S, help="focal loss gamma (2.0)")
    add("--focal-alpha", type=_probability, default=S, help="focal loss alpha (off)")
    add("--gradcam-guidance", type=float, default=S, metavar="WEIGHT", help="add WEIGHT x the "
        "Grad-CAM energy share outside the lungs (locations.json beside --labels) to the loss")
    add("--sampler", choices=["uniform", "weighted", "oversample"], default=S,
        help="class imbalance: uniform, weighted (inverse frequency) or oversample (repeat rare)")
    add("--no-augment", dest="augment", action="store_false", default=S, help="no augmentation")
    add("--patience", type=_non_negative, default=S,
        help="early stopping: epochs without a better val mean AUROC (5; 0: off)")
    add("--min-delta", type=float, default=S, help="smallest improvement that counts (0)")
    add("--split", type=_fractions, default=S, metavar="TR,VA,TE",
        help="patient-level split fractions (0.7,0.15,0.15)")
    add("--split-file", type=Path, default=S, help="reuse the split.json of another run")
    add("--split-lists", type=Path, default=S, metavar="DIR",
        help="NIH official split: DIR holds train_val_list.txt and test_list.txt")
    add("--seed", type=_seed, default=S, help="seed for split, init, sampling, augmentation (0)")
    add("--device", default=S, help="auto (CUDA if available), cpu, cuda, cuda:1")
    add("--no-amp", dest="amp", action="store_false", default=S, help="no mixed precision on CUDA")
    add("--num-workers", type=_non_negative, default=S, help="DataLoader workers per process (0)")
    add("--threads", type=_non_negative, default=S, help="torch CPU threads (0: torch default)")
    add("--cache-dir", type=Path, default=S, help="preprocessed-array cache (RUN_DIR/cache)")
    add("--no-disk-cache", dest="disk_cache", action="store_false", default=S,
        help="cache in memory only")
    add("--cache-memory-mb", type=_non_negative, default=S, help="memory cache budget (4096)")
    add("--name", default=S, help="bundle name (cxr-classifier)")
    add("--version", default=S, help="bundle version (0.1.0)")
    add("--description", default=S, help="bundle description")
    det = parser.add_argument_group("detection (--task detection)")
    det.add_argument("--classes", type=Path, default=S,
                     help="classes.txt naming the YOLO class indexes (default: beside --labels)")
    det.add_argument("--train-crop", type=_non_negative, default=S, metavar="N",
                     help="train on N px crops (half over a box), validate on whole images (0)")
    det.add_argument("--unlabelled-as-negative", action="store_true", default=S,
                     help="images without a label entry are negative images")
    det.add_argument("--threshold-method", choices=["f1", "sensitivity"], default=S,
                     help="operating threshold: max lesion F1 (default) or --target-sensitivity")
    det.add_argument("--target-sensitivity", type=_probability, default=S,
                     help="lesion sensitivity the threshold must reach (0.8)")


_CLASSIFICATION_ONLY = ("labels_key", "loss", "focal_gamma", "focal_alpha", "sampler",
                        "split_lists", "preset", "gradcam_guidance")
_DETECTION_ONLY = ("classes", "train_crop", "unlabelled_as_negative", "threshold_method",
                   "target_sensitivity")


def _fit_task(args: argparse.Namespace) -> str:
    if "task" in vars(args):
        return str(args.task)
    if args.resume is not None:
        from training.fit.engine import saved_task

        return saved_task(args.resume)
    return "classification"


def _fit_api(task: str) -> tuple[Any, Callable[..., Any]]:
    """(config class, fit function) of ``task``."""
    if task == "detection":
        from training.fit.detection import DetectionFitConfig, fit_detection

        return DetectionFitConfig, fit_detection
    from training.fit.classification import FitConfig, fit

    return FitConfig, fit


def _run_fit(args: argparse.Namespace) -> int:
    """``fit`` of either task (or ``--resume`` of a saved run, whose task it keeps)."""
    detection = _fit_task(args) == "detection"
    foreign, why = ((_CLASSIFICATION_ONLY, "do not apply to --task detection") if detection
                    else (_DETECTION_ONLY, "need --task detection"))  # fmt: skip
    wrong = [f"--{k.replace('_', '-')}" for k in foreign if k in vars(args)]
    if wrong:
        raise CLIError(f"{', '.join(wrong)} {why}")
    import torch

    from ai.types import AnalysisError

    config_class, fit = _fit_api("detection" if detection else "classification")
    names = {f for f in config_class.__dataclass_fields__}
    given = {k: v for k, v in vars(args).items() if k in names}
    if "preset" in given and args.resume is None:
        given = {**FIT_PRESETS[given["preset"]], **given}
    given["progress"] = not args.quiet
    try:
        if args.resume is not None:
            config, resume = config_class.from_run(args.resume, given), True
        else:
            missing = [f"--{n}" for n in ("data", "labels", "out") if n not in given]
            if missing:
                raise CLIError(f"{', '.join(missing)} required (or --resume RUN_DIR)")
            config, resume = config_class(**given), False
        result = fit(config, resume=resume)
    except (AnalysisError, FloatingPointError) as exc:
        raise CommandFailed(str(exc)) from exc
    except torch.OutOfMemoryError as exc:
        raise CommandFailed(f"out of device memory ({exc}); lower --batch-size or --image-size") from exc
    if result.bundle_dir is None:  # a non-zero torchrun rank: rank 0 reports
        return EXIT_OK
    state = result.state
    print(f"{state.epoch} epoch(s), {state.step} step(s); best epoch {state.best_epoch} "
          f"({result.monitor} {state.best_metric}){' (stopped early)' if state.stopped_early else ''}")
    row = _detection_row if detection else _classification_row
    for name, entry in result.metrics["per_label"].items():
        parts = [f"{name:20s} threshold {entry['threshold']:.3f}"]
        parts += [f"{split}: {row(entry[split])}" for split in ("val", "test") if split in entry]
        print("  ".join(parts))
    table = result.run_dir / TABLE_FILE
    if not detection and table.is_file():
        print(table.read_text(encoding="utf-8"))
    print(f"run: {result.run_dir}  bundle: {result.bundle_dir}")
    return EXIT_OK


def _classification_row(fig: dict[str, Any]) -> str:
    auc, sens, spec = (fig[k]["value"] for k in ("auroc", "sensitivity", "specificity"))
    return f"AUROC {_fmt(auc)} sens {_fmt(sens)} spec {_fmt(spec)}"


def _detection_row(row: dict[str, Any]) -> str:
    return (f"AP50 {_fmt(row['map50'])} AP50-95 {_fmt(row['map50_95'])} "
            f"P {_fmt(row['precision'])} R {_fmt(row['recall'])}")  # fmt: skip


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="folder that receives one sub-folder per demo bundle")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long build for tests (quality not required)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they are drawn only on a terminal anyway)")


def _run_demo(args: argparse.Namespace) -> int:
    from training.demo import run

    if args.seed < 0:
        raise CLIError(f"--seed must be non-negative, got {args.seed}")
    args.no_progress = args.no_progress or args.quiet
    return run(args)


COMMANDS: list[Command] = [
    Command(
        "synth",
        "write procedural chest-radiograph phantoms as DICOM plus labels",
        _add_synth,
        _run_synth,
    ),
    Command(
        "fit",
        "train a classifier or a detector (--task detection) on exported DICOM + labels; "
        "writes a run folder and a bundle",
        _add_fit,
        _run_fit,
    ),
    Command(
        "evaluate",
        "measure bundles on a labelled DICOM set: metrics.json, report.md, predictions, curves",
        _add_evaluate,
        _run_evaluate,
    ),
    Command(
        "calibrate",
        "choose per-label thresholds on a validation set and write them into the bundle",
        _add_calibrate,
        _run_calibrate,
    ),
    Command(
        "export",
        "finalise a bundle (identity, metrics, record), check it loads, write it out",
        _add_export,
        _run_export,
    ),
    Command(
        "import-weights",
        "turn a public DenseNet121 checkpoint (CheXNet re-implementation, torchxrayvision) "
        "into a bundle the node runs",
        _add_import_weights,
        _run_import_weights,
    ),
    Command(
        "ood-gate",
        "fit a bundle's out-of-distribution gate on your own images (rewrites the bundle)",
        _add_ood_gate,
        _run_ood_gate,
    ),
    Command(
        "deidentify",
        "PS3.15 Basic Profile de-identification of a DICOM tree (and its labels)",
        _add_deidentify,
        _run_deidentify,
    ),
    Command(
        "demo-bundles",
        "train the node's DEMO bundles on phantoms (not for clinical use)",
        _add_demo,
        _run_demo,
    ),
]


# --------------------------------------------------------------------------- entry point


def build_parser(commands: list[Command] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="training", description="Train, evaluate and package chest X-ray models."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands or COMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(child)
        child.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (argparse usage errors: 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the message
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except TrainingError as exc:
        print(f"training {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, CLIError) else EXIT_FAILURE
    except OSError as exc:
        print(
            f"training {args.command}: error: {exc.strerror or exc}: {exc.filename or ''}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"training {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
