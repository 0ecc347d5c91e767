"""``facesearch bench lfw | attributes | lfw-pairs``: LFW verification (protocol §7), per-attribute accuracy on a
CelebA-format set (the paper's Table 4), and an LFW-format pairs set built from the ORL faces or any identity-labelled
images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from facesearch.benchmarks.attribute_accuracy import (
    SPLITS,
    attribute_result,
    evaluate_attributes,
    format_attribute_table,
    predict_celeba,
)
from facesearch.benchmarks.attribute_compare import DATA_FORMATS
from facesearch.benchmarks.lfw import (
    LFW_KEEP_FACE,
    embed_lfw_images,
    evaluate_lfw,
    format_lfw,
    load_features,
    read_pairs,
    write_lfw_pairs,
    write_orl_pairs,
)
from facesearch.benchmarks.split import SPLIT_FORMATS, read_identity_samples
from facesearch.cli._app import DEVICE_OPTION, config_option, user_errors
from facesearch.model.fileio import atomic_write_text

_P = click.Path(path_type=Path)


def _write_json(path: Path | None, document: dict[str, Any]) -> None:
    if path is not None:
        atomic_write_text(path, json.dumps(document, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
        click.echo(f"\nresult       {path}")


@click.command("lfw")
@click.option("--pairs", type=_P, required=True, help="LFW-format pairs.txt (header `<folds> <n>`).")
@click.option("--images", type=_P, help="Image root: <root>/<name>/<name>_<n:04d><ext> (needs --checkpoint).")
@click.option("--checkpoint", type=_P, help="Trained weights to embed --images with.")
@click.option("--features", type=_P, help="Precomputed features: .npz (keys, features) or a `facesearch embed` dir.")
@config_option(embed_lfw_images, "--ext", help="Image file extension under --images.")
@config_option(embed_lfw_images, "--batch-size", type=int, help="Crops per forward pass.")
@config_option(embed_lfw_images, "--keep-face", type=click.Choice(list(LFW_KEEP_FACE)),
               help="Which face of an image is embedded: the one nearest the centre (LFW images are centred on the "
                    "named person), the largest, or the best scored.")  # fmt: skip
@click.option("--out", type=_P, help="Write the result as JSON here.")
@DEVICE_OPTION
@user_errors
def lfw_command(
    pairs: Path,
    images: Path | None,
    checkpoint: Path | None,
    features: Path | None,
    ext: str,
    batch_size: int,
    keep_face: str,
    out: Path | None,
    device: str,
) -> None:
    """Ten-fold LFW verification accuracy (thresholds chosen on the other nine folds; mean ± standard error)."""
    if (features is None) == (images is None) or (images is not None) != (checkpoint is not None):
        raise click.UsageError("give either --images with --checkpoint, or --features")
    parsed = read_pairs(pairs)
    if features is not None:
        result = evaluate_lfw(parsed, load_features(features), features_from=str(features))
    else:
        assert images is not None and checkpoint is not None, "checked above"
        with tqdm(unit="img", desc="embed", dynamic_ncols=True) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            embedded = embed_lfw_images(images, parsed, checkpoint, device, batch_size, ext=ext, progress=progress,
                                        keep_face=keep_face)  # fmt: skip
        result = evaluate_lfw(
            parsed,
            embedded.features,
            no_face=len(embedded.no_face),
            images=str(images),
            checkpoint=str(checkpoint),
            keep_face=keep_face,
            fingerprint=embedded.fingerprint,
            no_face_images=embedded.no_face[:100],
        )
    click.echo(format_lfw(result))
    _write_json(out, result.to_dict())


def _predictor_specs(specs: str) -> dict[str, Path]:
    """``KEY``, ``NAME=PATH`` or ``PATH`` items -> {name: predictor file}; a bare key means the default output of
    ``facesearch attributes train --method KEY`` (runs/attributes/KEY/predictor.safetensors)."""
    from facesearch.model.predictors import PREDICTORS

    out: dict[str, Path] = {}
    for item in (x.strip() for x in specs.split(",")):
        if not item:
            continue
        name, _, target = item.partition("=")
        if target:
            path = Path(target)
        elif name in PREDICTORS:
            path = Path("runs/attributes") / name / "predictor.safetensors"
            if not path.is_file():
                hint = f"run `facesearch attributes train --method {name} --data ...` first, or give {name}=PATH"
                raise click.BadParameter(f"no trained {name} predictor at {path}: {hint}", param_hint="--predictors")
        else:
            path, name = Path(name), Path(name).parent.name or Path(name).stem
        if not path.is_file():
            raise click.BadParameter(f"{path} does not exist", param_hint="--predictors")
        if name in out:
            raise click.BadParameter(f"{name!r} is named twice (use NAME=PATH)", param_hint="--predictors")
        out[name] = path
    if not out:
        raise click.BadParameter("name at least one predictor", param_hint="--predictors")
    return out


@click.command("attributes")
@click.option("--data", type=_P, required=True,
              help="CelebA-format root, or a list CSV with attribute columns (--format list).")  # fmt: skip
@click.option("--checkpoint", type=_P, default=None, help="One network whose attribute head is evaluated (Table 4).")
@click.option("--predictors", default=None,
              help="Predictors side by side, comma-separated: KEY (runs/attributes/KEY), NAME=PATH, PATH.")  # fmt: skip
@click.option("--format", "data_format", type=click.Choice(DATA_FORMATS), default="celeba", show_default=True,
              help="Layout of --data (list: people split 80/10/10 by identity hash).")  # fmt: skip
@config_option(predict_celeba, "--split", type=click.Choice(list(SPLITS)),
               help="Partition of list_eval_partition.txt to evaluate (all = every labelled image).")  # fmt: skip
@config_option(evaluate_attributes, "--threshold", type=float, help="Positive when probability >= this.")
@click.option("--limit", type=int, help="Evaluate only the first N images of the split.")
@config_option(predict_celeba, "--batch-size", type=int, help="Crops per forward pass.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=1000, show_default=True,
              help="--predictors: identity-bootstrap resamples of the intervals.")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Decode/align processes.")
@click.option("--out", type=_P, help="Write the result as JSON here (--predictors: also .md and .png beside it).")
@DEVICE_OPTION
@user_errors
def attributes_command(
    data: Path,
    checkpoint: Path | None,
    predictors: str | None,
    data_format: str,
    split: str,
    threshold: float,
    limit: int | None,
    batch_size: int,
    bootstrap: int,
    workers: int,
    out: Path | None,
    device: str,
) -> None:
    """Per-attribute accuracy of predicted attributes: one network against CelebA-format labels (the paper's
    Table 4), or several attribute predictors side by side on one identity-disjoint split."""
    if (checkpoint is None) == (predictors is None):
        raise click.UsageError("give exactly one of --checkpoint (one network) or --predictors (a comparison)")
    if predictors is not None:
        _compare(data, _predictor_specs(predictors), data_format, split, limit, batch_size, bootstrap, workers, out,
                 device)  # fmt: skip
        return
    if data_format != "celeba":
        raise click.UsageError("--checkpoint evaluates a CelebA-format root; use --predictors for a list CSV")
    assert checkpoint is not None
    predictions = predict_celeba(data, checkpoint, device, batch_size, split, limit)
    scores = evaluate_attributes(predictions.probabilities, predictions.truth, threshold)
    click.echo(format_attribute_table(scores))
    if predictions.skipped_summary:
        click.echo(f"\n{predictions.skipped_summary}")
    document = attribute_result(
        scores,
        threshold,
        n=predictions.n,
        skipped=predictions.skipped,
        fingerprint=predictions.fingerprint,
        **predictions.meta,
    )
    _write_json(out, document)


def _compare(data: Path, specs: dict[str, Path], data_format: str, split: str, limit: int | None, batch_size: int,
             bootstrap: int, workers: int, out: Path | None, device: str) -> None:  # fmt: skip
    from facesearch.benchmarks.attribute_compare import (
        compare_predictors,
        plot_comparison,
        read_split,
        render_comparison,
    )
    from facesearch.model.predictors import load_predictor
    from facesearch.model.provenance import provenance

    samples = read_split(data, data_format, split)[:limit]
    loaded = {name: load_predictor(path, device=device, batch_size=batch_size) for name, path in specs.items()}
    result = compare_predictors(loaded, samples, batch_size, workers, bootstrap)
    result.meta.update(data=str(data), format=data_format, split=split, limit=limit, provenance=provenance())
    text = render_comparison(result)
    click.echo(text)
    if out is not None:
        atomic_write_text(out.with_suffix(".md"), text)
        plot = plot_comparison(result, out.with_suffix(".png"))
        click.echo(f"table        {out.with_suffix('.md')}\nchart        {plot}")
        _write_json(out, result.to_dict())


@click.command("lfw-pairs")
@click.option("--orl", type=_P, help="ORL/AT&T root with s1..s40/1..10.pgm.")
@click.option("--list", "data", type=_P, help="Instead of --orl: identity-labelled images, a list CSV "
              "(path,identity,...), a folder per identity (--format casia), a flat folder (--format flat) or a CelebA "
              "root.")  # fmt: skip
@click.option("--format", "data_format", type=click.Choice(SPLIT_FORMATS), default="list", show_default=True,
              help="Layout of --list.")  # fmt: skip
@click.option("--root", type=_P, help="Folder the --list CSV's paths are relative to [default: the CSV's folder].")
@click.option("--identities", type=_P, help="Identity file ('file identity' lines) naming a flat --list folder.")
@click.option("--people", type=_P, help="Use only these people (one identity per line; e.g. test_identities.txt "
              "of `facesearch split`: people a model never trained on).")  # fmt: skip
@config_option(write_lfw_pairs, "--pad", type=click.IntRange(min=0),
               help="--list: px of black added on each side of every image (helps detection on tight "
                    "crops).")  # fmt: skip
@click.option("--out", type=_P, required=True, help="Output folder: lfw/<name>/<name>_<n:04d>.jpg and pairs.txt.")
@config_option(write_orl_pairs, "--folds", type=int, help="Folds (disjoint groups of people).")
@config_option(write_orl_pairs, "--per-fold", type=int, help="Matched (and mismatched) pairs per fold.")
@config_option(write_orl_pairs, "--seed", type=int, help="Seed of the people split and pair sampling.")
@user_errors
def lfw_pairs_command(orl: Path | None, data: Path | None, data_format: str, root: Path | None,
                      identities: Path | None, people: Path | None, pad: int, out: Path, folds: int, per_fold: int,
                      seed: int) -> None:  # fmt: skip
    """Build an LFW-format verification set from the ORL faces or any identity-labelled images (for `bench lfw`).

    Folds hold disjoint people; each has --per-fold matched and --per-fold mismatched pairs. With --list, each person's
    images are numbered in path order (JPEGs copied, other formats converted) under an LFW name made of the identity
    (characters other than letters, digits, '.', '-', '_' become '_').
    """
    if (orl is None) == (data is None):
        raise click.UsageError("give exactly one of --orl and --list")
    if orl is not None:
        extra = [flag for flag, v in (("--root", root), ("--identities", identities), ("--people", people)) if v]
        if extra or pad:
            raise click.UsageError(f"{', '.join(extra or ['--pad'])}: only with --list (ORL is read as it is)")
        if not orl.is_dir():
            raise click.BadParameter(f"{orl} is not a directory", param_hint="--orl")
        pairs = write_orl_pairs(orl, out, folds=folds, per_fold=per_fold, seed=seed)
    else:
        assert data is not None, "checked above: exactly one of --orl and --list"
        samples = read_identity_samples(data, data_format, root, identities)
        wanted = None if people is None else [ln.strip() for ln in people.read_text("utf-8").splitlines() if ln.strip()]
        pairs = write_lfw_pairs(((s.path, str(s.identity)) for s in samples), out, folds=folds, per_fold=per_fold,
                                seed=seed, people=wanted, pad=pad)  # fmt: skip
    click.echo(f"pairs        {pairs} ({folds} folds x {per_fold} matched + {per_fold} mismatched)")
    click.echo(f"images       {out / 'lfw'}")
