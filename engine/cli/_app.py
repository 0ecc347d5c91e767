"""The root click group and the helpers every command module shares."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="facesearch")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """facesearch: multi-task face network, million-scale gallery indexing, search and MegaFace-style benchmarks."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def user_errors(fn: F) -> F:
    """Turn the library's ``ValueError`` / ``FileNotFoundError`` into a one-line click error instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise click.ClickException(str(e)) from e

    return wrapper  # type: ignore[return-value]


DEVICE_OPTION = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto | cpu | cuda | cuda:N. A requested GPU that is absent is an error, never a silent CPU fallback.",
)
