"""``facesearch attributes``: train the CelebA attribute classifier and label identity datasets (paper §3.2)."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from facesearch.cli._app import DEVICE_OPTION, StepBar, config_option, default_of, parse_size, user_errors
from facesearch.model.attributes import METHODS, AttributeTrainConfig, LabelConfig, label_identities
from facesearch.model.config import ARCHS
from facesearch.model.device import PRECISIONS
from facesearch.model.mgmtn import FUSIONS, MASK_SOURCES
from facesearch.model.tables import render_table
from facesearch.model.train_config import CROPS
from facesearch.model.trainer_data import DATA_FORMATS

_train_option = functools.partial(config_option, AttributeTrainConfig)
_label_option = functools.partial(config_option, LabelConfig)


@click.group("attributes")
def attributes_group() -> None:
    """Attribute predictors (icmr, moon, lnets-anet, mgmtn, mtl-cnn) and attribute labels for identity datasets."""


@attributes_group.command("train")
@click.option("--data", type=click.Path(path_type=Path), required=True, multiple=True,
              help="CelebA-format root (list_attr_celeba.txt); mtl-cnn: repeat for several databases (CelebA roots "
                   "or list CSVs).")  # fmt: skip
@_train_option("--method", type=click.Choice(METHODS),
               help="Predictor: moon (MOON classifier), icmr (multi-task network's head), lnets-anet, "
                    "mgmtn, mtl-cnn.")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run directory [default: runs/attributes/METHOD].")  # fmt: skip
@_train_option("--arch", type=click.Choice(ARCHS), help="Building block.")
@_train_option("--width", type=float, help="Filter-count multiplier.")
@click.option("--input-size", default="{}x{}".format(*default_of(AttributeTrainConfig, "input_size")),
              show_default=True, help="Aligned template HEIGHTxWIDTH (the margin crop is larger).")  # fmt: skip
@click.option("--crop", type=click.Choice(CROPS), default=None,
              help="What the network sees [default: margin (moon, mgmtn), template (icmr), views "
                   "(lnets-anet)].")  # fmt: skip
@_train_option("--iterations", type=int, help="Attribute-stage steps (lr x0.1 at 50/75 %).")
@click.option("--identity-iterations", type=int, default=None,
              help="Identity-stage steps of icmr / lnets-anet [default: --iterations].")  # fmt: skip
@_train_option("--lr", type=float, help="Base learning rate.")
@click.option("--batch-size", type=int, default=None, help="Images per step [default: 40 full, 48 fast/variant].")
@_train_option("--moon-target", type=float, help="MOON target positive rate per attribute (0.5 = balanced).")
@click.option("--pretrained", type=click.Path(path_type=Path), default=None,
              help="lnets-anet: fine-tune from this identity checkpoint instead of pretraining; mgmtn: start the "
                   "trunk from it.")  # fmt: skip
@click.option("--no-pretrain", "pretrain", flag_value=False, default=True,
              help="lnets-anet ablation: no identity pretraining.")  # fmt: skip
@_train_option("--views", type=click.Choice(["ten", "centre"]),
               help="lnets-anet: ten patch views, or the centred one (ablation).")  # fmt: skip
@_train_option("--svm-images", type=int, help="lnets-anet: at most this many training images fit the SVMs.")
@_train_option("--similarity-loss", type=float,
               help="lnets-anet: weight of the same-identity distance term in the identity pretraining.")  # fmt: skip
@_train_option("--masks", type=click.Choice(MASK_SOURCES),
               help="mgmtn: group masks drawn from the template's landmarks, or predicted by a mask "
                    "network.")  # fmt: skip
@_train_option("--fusion", type=click.Choice(FUSIONS),
               help="mgmtn: group + global features (G2FF), group features only, or global only.")  # fmt: skip
@_train_option("--mask-iterations", type=int, help="mgmtn --masks learned: mask-network training steps.")
@click.option("--categorical", multiple=True,
              help="mtl-cnn: a list-CSV column of integer classes (-1 or empty = unknown), as NAME or "
                   "NAME=class0,class1,... to name the classes; repeatable.")  # fmt: skip
@_train_option("--gates", type=click.Choice(["learned", "fixed"]),
               help="mtl-cnn: learned routing of the shared feature per task, or every gate 1 (ablation).")  # fmt: skip
@click.option("--correlation/--no-correlation", default=True, show_default=True,
              help="mtl-cnn: the correlation layer (fitted in a second stage).")  # fmt: skip
@_train_option("--correlation-iterations", type=int, help="mtl-cnn: steps of the correlation stage.")
@_train_option("--centre-loss", type=float, help="mtl-cnn: centre-loss weight (0 = off).")
@_train_option("--feature-dim", type=int, help="mtl-cnn: width of the shared feature (a multiple of 8).")
@_train_option("--val-fraction", type=float,
               help="mtl-cnn: people held out for calibration in a database without partitions.")  # fmt: skip
@_train_option("--precision", type=click.Choice(PRECISIONS), help="fp32/bf16/auto.")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes [default: min(2, CPUs)].")
@_train_option("--seed", type=int, help="Seed.")
@click.option("--detections", type=click.Path(path_type=Path), default=None,
              help="Face detection cache to use and extend [default: OUT/detections.jsonl].")  # fmt: skip
@_train_option("--min-readable", type=float, help="Stop unless this fraction of the listed images is readable.")
@_train_option("--max-skipped-steps", type=float,
               help="Stop when more than this fraction of the steps is skipped (< 2 readable images).")  # fmt: skip
@DEVICE_OPTION
@user_errors
def train_command(
    input_size: str, workers: int | None, out: Path | None, data: tuple[Path, ...], categorical: tuple[str, ...],
    **opts: object,
) -> None:  # fmt: skip
    """Train an attribute predictor on CelebA-format data, calibrated on its val split (resumes an unfinished run
    in --out)."""
    from facesearch.model.predictors.training import train_attribute_predictor

    size = parse_size(input_size)
    assert size is not None, "--input-size has a default"
    out = out or Path("runs/attributes") / str(opts["method"])
    cfg = AttributeTrainConfig(input_size=size, num_workers=workers, out=out, data=data[0], more_data=data[1:],
                               categorical=categorical, **opts)  # type: ignore[arg-type]  # fmt: skip
    bar = StepBar(None)
    try:
        result = train_attribute_predictor(cfg, progress=bar)
    finally:
        bar.close()
    _validation_table(result.validation, result.predictor.attributes)
    click.echo("seconds      " + ", ".join(f"{k} {v:g}" for k, v in result.seconds.items()))
    click.echo(f"predictor    {result.path}")
    click.echo(f"fingerprint  {result.predictor.fingerprint}")


def _validation_table(report: dict, attributes: tuple[str, ...]) -> None:
    rows = [[a, _pct(report["balanced_accuracy"][a]), _num(report["ece_uncalibrated"][a]),
             _num(report["attributes"][a]["ece"]), report["attributes"][a]["n_pos"], report["attributes"][a]["n_neg"]]
            for a in attributes]  # fmt: skip
    click.echo(f"validation ({report['split']} split, {report['images']} images)")
    click.echo(render_table(["attribute", "balanced acc %", "ECE raw", "ECE calibrated", "n+", "n-"], rows))


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _num(v: float | None) -> str:
    return "—" if v is None or v != v else f"{v:.3f}"


@attributes_group.command("label")
@click.option("--classifier", type=click.Path(path_type=Path), required=True,
              help="Attribute predictor (`attributes train`, any method) or network checkpoint.")  # fmt: skip
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Identity dataset to label.")
@click.option("--format", "data_format", type=click.Choice(DATA_FORMATS), default=None,
              help="Layout of --data [default: casia; flat with --identities].")  # fmt: skip
@click.option("--identities", type=click.Path(path_type=Path), default=None,
              help="Identity file ('file identity' lines) naming the images of a flat --data folder.")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Labels CSV to write (identity,<attr>...).")
@_label_option("--threshold", type=float, help="Per-image positive threshold.")
@_label_option("--batch-size", type=int, help="Images per forward pass.")
@_label_option("--precision", type=click.Choice(PRECISIONS), help="fp32/bf16/auto.")
@_label_option("--workers", "num_workers", type=int, help="Decode/align processes.")
@click.option("--detections", type=click.Path(path_type=Path), default=None,
              help="Face detection cache to use and extend [default: OUT stem + .detections.jsonl].")  # fmt: skip
@_label_option("--min-readable", type=float, help="Stop unless this fraction of the listed images is readable.")
@DEVICE_OPTION
@user_errors
def label_command(data_format: str | None, **opts: object) -> None:
    """Predict attributes on every image and write per-identity majority-vote labels for `facesearch train`."""
    fmt = data_format or ("flat" if opts.get("identities") is not None else "casia")
    result = label_identities(LabelConfig.from_dict({**opts, "data_format": fmt}))
    click.echo(f"labelled     {result.identities} identities from {result.images} images")
    if result.skipped_summary and result.skipped:
        click.echo(result.skipped_summary)
    rates = ", ".join(f"{k} {v:.2f}" for k, v in result.positive_rate.items())
    click.echo(f"positive     {rates}")
    click.echo(f"labels       {result.labels}")
    click.echo(f"provenance   {result.provenance}")


@attributes_group.command("calibrate")
@click.option("--classifier", type=click.Path(path_type=Path), required=True,
              help="Attribute predictor or network checkpoint (e.g. a `facesearch train` network).")  # fmt: skip
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="CelebA-format root, or a list CSV with attribute columns (--format list).")  # fmt: skip
@click.option("--format", "data_format", type=click.Choice(["celeba", "list"]), default="celeba", show_default=True,
              help="Layout of --data (list: people split 80/10/10 by identity hash).")  # fmt: skip
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="val", show_default=True,
              help="The people to fit the calibration on (never the ones you test on).")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Calibrated predictor file to write.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Decode/align processes.")
@DEVICE_OPTION
@user_errors
def calibrate_command(classifier: Path, data: Path, data_format: str, split: str, out: Path, workers: int,
                      device: str) -> None:  # fmt: skip
    """Fit Platt scaling of any predictor on labelled people and write it as a calibrated predictor."""
    from facesearch.benchmarks.attribute_compare import read_split
    from facesearch.model.predictors import load_predictor
    from facesearch.model.predictors.training import calibrate

    predictor = load_predictor(classifier, device=device)
    calibrated, report = calibrate(predictor, read_split(data, data_format, split), workers, split)
    calibrated.meta["calibrated_on"] = {"data": str(data), "format": data_format, "split": split}
    calibrated.save(out)
    _validation_table(report, calibrated.attributes)
    click.echo(f"predictor    {out} ({calibrated.key})")
    click.echo(f"fingerprint  {calibrated.fingerprint}")


@attributes_group.command("masks")
@click.option("--image", type=click.Path(path_type=Path), required=True, help="A face image (any size; detected).")
@click.option("--landmarks", default=None,
              help="The face's five landmarks 'x1,y1,...,x5,y5' (eyes, nose, mouth corners, image-left first) "
                   "[default: <image>.json sidecar, else YuNet].")  # fmt: skip
@click.option("--classifier", type=click.Path(path_type=Path), default=None,
              help="An mgmtn predictor: its crop, and its mask network's masks when they are learned.")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), required=True, help="PNG picture to write.")
@user_errors
def masks_command(image: Path, landmarks: str | None, classifier: Path | None, out: Path) -> None:
    """Draw MGMTN's eight group masks over the aligned face of one image (and the learned masks with --classifier)."""
    import cv2
    import numpy as np

    from facesearch.model.faces.detect import FaceDetector
    from facesearch.model.fileio import atomic_write_bytes
    from facesearch.model.predictors import load_predictor
    from facesearch.model.predictors.mgmtn import MgmtnPredictor, mask_picture

    size, margin, mask_net = default_of(AttributeTrainConfig, "input_size"), True, None
    if classifier is not None:
        predictor = load_predictor(classifier)
        if not isinstance(predictor, MgmtnPredictor):
            raise click.BadParameter(
                f"{classifier} is a {predictor.key} predictor, not mgmtn", param_hint="--classifier"
            )
        size, margin, mask_net = predictor.input_spec.size, predictor.input_spec.margin, predictor.mgmtn.mask_net
    lm = None
    if landmarks is not None:
        try:
            lm = np.array([float(v) for v in landmarks.split(",")], np.float32).reshape(5, 2)
        except ValueError:
            raise click.BadParameter(f"expected ten numbers 'x1,y1,...,x5,y5', got {landmarks!r}",
                                     param_hint="--landmarks") from None  # fmt: skip
    sidecar = lm is None and image.with_suffix(image.suffix + ".json").is_file()
    detector = None if lm is not None or sidecar else FaceDetector
    picture = mask_picture(image, lm, detector, size=size, margin=margin, mask_net=mask_net, sidecar=sidecar)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    if not ok:
        raise click.ClickException(f"could not encode {out} as PNG")
    atomic_write_bytes(out, buf.tobytes())
    click.echo(f"masks        {out} ({picture.shape[1]}x{picture.shape[0]}, {'learned + ' if mask_net else ''}"
               "from landmarks)")  # fmt: skip


@attributes_group.command("inspect")
@click.argument("predictor_file", metavar="W", type=click.Path(path_type=Path))
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="PNG: the correlation matrix beside the training labels' log-odds ratios [default: W stem + "
                   "_correlation.png].")  # fmt: skip
@click.option("--min-log-odds", type=float, default=0.3, show_default=True,
              help="Label dependences weaker than this are left out of the sign check.")  # fmt: skip
@user_errors
def inspect_command(predictor_file: Path, plot: Path | None, min_log_odds: float) -> None:
    """Show what an mtl-cnn predictor learned: routing weights per task, correlation signs against the labels'."""
    from facesearch.model.predictors import load_predictor
    from facesearch.model.predictors.mtl_cnn import MtlCnnPredictor
    from facesearch.model.predictors.mtl_inspect import correlation_figure, routing_rows, sign_agreement

    predictor = load_predictor(predictor_file)
    if not isinstance(predictor, MtlCnnPredictor):
        raise click.BadParameter(f"{predictor_file} is a {predictor.key} predictor; inspect reads mtl-cnn ones",
                                 param_hint="W")  # fmt: skip
    k = predictor.network.mcfg.groups
    click.echo(f"routing weights ({predictor.network.mcfg.gates} gates; share of each of the {k} feature groups)")
    click.echo(render_table(["task", *(f"g{i}" for i in range(k)), "top"], routing_rows(predictor)))
    check = sign_agreement(predictor, min_log_odds)
    rows = [[p["pair"], f"{p['log_odds']:+.2f}", f"{p['learned']:+.3f}", "yes" if p["agree"] else "NO"]
            for p in check["pairs"]]  # fmt: skip
    click.echo(f"correlation layer vs training labels (pairs labelled together, |log-odds| >= {min_log_odds})")
    click.echo(render_table(["pair", "label log-odds", "learned (C+Cᵀ)/2", "same sign"], rows))
    if check["agreement"] is not None:
        click.echo(f"signs agree  {sum(p['agree'] for p in check['pairs'])} of {len(check['pairs'])}")
    out = correlation_figure(predictor, plot or predictor_file.with_name(predictor_file.stem + "_correlation.png"))
    click.echo(f"plot         {out}")
