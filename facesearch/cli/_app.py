"""The root click group and the helpers every command module shares."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click
from tqdm import tqdm

F = TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="facesearch")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """facesearch: multi-task face network, million-scale gallery indexing, search and MegaFace-style benchmarks."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def error_message(e: BaseException) -> str:
    """One line for a user's mistake: an ``OSError`` as ``<file>: <reason>``, anything else as its text, with line
    breaks folded (click prints ``Error: <this>``)."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.filename}: {e.strerror}" + (f" ({e.filename2})" if e.filename2 is not None else "")
    else:
        text = str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) or type(e).__name__


def user_errors(fn: F) -> F:
    """Turn the library's ``ValueError``, any ``OSError`` (a missing, unreadable or unwritable file, a full disk) and
    a ``MemoryError`` (sizes beyond the machine) into a one-line click error instead of a traceback: the one place
    the CLI maps them.  A broken pipe (output piped into ``head``) is left to click, which exits quietly."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            raise
        except (ValueError, OSError) as e:
            raise click.ClickException(error_message(e)) from e
        except MemoryError as e:  # e.g. a dimension or a size far beyond the machine: numpy says how much was asked
            raise click.ClickException(f"out of memory: {error_message(e)} (are the sizes asked for right?)") from e

    return wrapper  # type: ignore[return-value]


def finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """A click callback refusing NaN and infinity (``click.FloatRange`` lets NaN through its bounds)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}", ctx=ctx, param=param)
    return value


SCREEN_OPTION = click.option(
    "--screen",
    type=click.Choice(["auto", "bf16", "fp16", "none"]),
    default="auto",
    show_default=True,
    help="Flat index: low-precision screen of the exact search, re-scored in float32 (results stay exact; auto = "
    "bf16 where the hardware runs it natively).",
)
C_INT = click.IntRange(1, 2**31 - 1)  # a FAISS / C ``int`` parameter: a larger value would overflow, not mean more
DEVICE_OPTION = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto | cpu | cuda | cuda:N. A requested GPU that is absent is an error, never a silent CPU fallback.",
)


def parse_size(value: str | None) -> tuple[int, int] | None:
    """``HEIGHTxWIDTH`` (e.g. ``112x96``) -> (height, width)."""
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected HEIGHTxWIDTH such as 112x96, got {value!r}") from None
    return h, w


class StepBar:
    """Draws the training library's progress records as a tqdm bar (the library itself never prints).

    The bar appears with the first record, so a run that fails while checking its input prints only the error."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: tqdm | None = None
        self.post: dict[str, str] = {}

    def __call__(self, record: Mapping[str, Any]) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.total, unit="step", dynamic_ncols=True, leave=True)
        if record.get("event") == "train":
            self.bar.update(max(0, int(record["step"]) - self.bar.n))
            self.post.update(loss=f"{record.get('loss', float('nan')):.4f}", lr=f"{record['lr']:.2g}")
            if "acc" in record:
                self.post["acc"] = f"{record['acc']:.3f}"
            self.post["img/s"] = f"{record['images_per_s']:.0f}"
        elif record.get("event") == "val" and "val_top1" in record:
            self.post["val"] = f"{record['val_top1']:.3f}"
        self.bar.set_postfix(self.post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
