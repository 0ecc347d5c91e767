"""The root click group, the lazy group it is made of, and the helpers every command module shares.

Light on purpose: ``facesearch --help`` imports this module and no command module (see :class:`LazyGroup`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click
from tqdm import tqdm

F = TypeVar("F", bound=Callable[..., Any])
_NoSuchCommand: Any = getattr(click.exceptions, "NoSuchCommand", None)  # click >= 8.4: "No such command", with hints


@dataclasses.dataclass(frozen=True)
class LazyCommand:
    """A subcommand that a :class:`LazyGroup` imports only when it is used.

    ``target``: ``"package.module:attribute"``, the click command.  ``summary``: its short help, the first sentence of
    its docstring (what click's listing shows, shortened to the screen), so that listing the group imports nothing;
    tests/test_layers.py checks every summary against the loaded command's own."""

    target: str
    summary: str

    def load(self) -> click.Command:
        module, _, attribute = self.target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command), f"{self.target} is not a click command"
        return command


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use: click's documented ``LazyGroup`` pattern, plus a
    listing from each command's :class:`LazyCommand` summary.

    ``lazy_subcommands`` maps a command name to its :class:`LazyCommand`.  ``list_commands`` names them with any
    command added the ordinary way; ``get_command`` imports one module only; ``--help`` shows the summaries without
    importing anything, so ``facesearch --help`` never pays for torch, FAISS, Arrow or Dask."""

    def __init__(self, *args: Any, lazy_subcommands: Mapping[str, LazyCommand] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = dict(lazy_subcommands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_subcommands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        lazy = self.lazy_subcommands.get(cmd_name)
        return lazy.load() if lazy is not None else super().get_command(ctx, cmd_name)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:  # click suggests close names from self.commands: the loaded commands only
            if _NoSuchCommand is None or not isinstance(e, _NoSuchCommand):
                raise
            raise _NoSuchCommand(e.command_name, possibilities=self.list_commands(ctx), ctx=ctx) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's own listing, with a stand-in made of its summary for each lazy command (nothing is imported)."""
        listed = []
        for name in self.list_commands(ctx):
            lazy = self.lazy_subcommands.get(name)
            command = click.Command(name, help=lazy.summary) if lazy is not None else self.get_command(ctx, name)
            if command is not None and not command.hidden:
                listed.append((name, command))
        if listed:
            limit = formatter.width - 6 - max(len(name) for name, _ in listed)
            with formatter.section("Commands"):
                formatter.write_dl([(name, command.get_short_help_str(limit)) for name, command in listed])


def default_of(owner: Any, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``owner``, or of parameter ``name`` of the function ``owner``:
    an option takes its default from the library, which stays its one source (shown by ``show_default``)."""
    if isinstance(owner, type) and dataclasses.is_dataclass(owner):
        fields = {f.name: f for f in dataclasses.fields(owner)}
        if name not in fields:
            raise ValueError(f"{owner.__name__} has no field {name!r}; its fields: {list(fields)}")
        field = fields[name]
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        default = field.default
    else:
        parameters = inspect.signature(owner).parameters
        if name not in parameters:
            raise ValueError(f"{owner.__qualname__} has no parameter {name!r}; its parameters: {list(parameters)}")
        default = parameters[name].default
    if default is dataclasses.MISSING or default is inspect.Parameter.empty:
        raise ValueError(f"{getattr(owner, '__qualname__', owner)}: {name!r} has no default")
    return default


def config_option(config: Any, *param_decls: str, field: str | None = None, **attrs: Any) -> Callable[[F], F]:
    """``click.option(*param_decls, **attrs)`` defaulting to the default of a field of ``config`` (a dataclass, or a
    function's parameter; see :func:`default_of`), shown in ``--help``.  The field is ``field``, else the option's
    parameter name: a declared one (``"--set", "set_number"``), else the long flag with dashes as underscores."""
    if field is None:
        field = next((d for d in param_decls if d.isidentifier()), None)
    if field is None:
        field = max((d for d in param_decls if d.startswith("--")), key=len).removeprefix("--").replace("-", "_")
    attrs.setdefault("show_default", True)
    return click.option(*param_decls, default=default_of(config, field), **attrs)


#: Every ``facesearch`` command, imported when it runs (``facesearch --help`` imports none of them).
COMMANDS = {
    "ablate": LazyCommand("facesearch.cli.ablate:ablate_command", "Reproduce the paper's Tables 2-7 with paired "
                          "seeds, mean and sd over seeds and bootstrap intervals."),
    "attributes": LazyCommand("facesearch.cli.attributes:attributes_group", "Attribute predictors (icmr, moon, "
                              "lnets-anet, mgmtn, mtl-cnn) and attribute labels for identity datasets."),
    "bench": LazyCommand("facesearch.cli.bench:bench", "MegaFace-style identification/verification, LFW verification, "
                         "attribute accuracy, and result plots."),
    "demo": LazyCommand("facesearch.cli.demo:demo_command", "Synthesise faces, label attributes, train the multi-task "
                        "network, evaluate, and write a report."),
    "embed": LazyCommand("facesearch.cli.embed:embed_command", "Embed face images into Parquet shards on Dask "
                         "(resumable; failures become rows with a reason)."),
    "index": LazyCommand("facesearch.cli.index:index", "FAISS index directories built from embedding shards: "
                         "index.faiss, attributes.parquet, index_info.json (in a generation directory that the file "
                         "CURRENT names; every update switches it at once)."),
    "search": LazyCommand("facesearch.cli.search:search_command", "Rank-k identification of probe faces (images, "
                          "embeddings or gallery ids) against an index."),
    "serve": LazyCommand("facesearch.cli.serve:serve_command", "Serve rank-k identification over HTTP: /health, POST "
                         "/search/embedding, POST /search/image, /docs."),
    "split": LazyCommand("facesearch.cli.split:split_command", "Split identity-labelled images into identity-disjoint "
                         "training, probe and distractor people (MegaFace-style)."),
    "synth": LazyCommand("facesearch.cli.synth:synth", "Procedurally rendered synthetic faces in the CASIA, CelebA and "
                         "MegaFace/FaceScrub on-disk layouts."),
    "train": LazyCommand("facesearch.cli.train:train_command", "Train the multi-task network (paper §4.4 two-stage "
                         "schedule by default) and write a checkpoint."),
}  # fmt: skip


@click.group(
    cls=LazyGroup,
    lazy_subcommands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
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
    type=click.Choice(["auto", "int8", "bf16", "fp16", "none"]),
    default="auto",
    show_default=True,
    help="Flat index: low-precision screen of the exact search, re-scored in float32 (results stay exact; auto = "
    "int8 on a CPU with int8 dot-product units (VNNI, AMX), else bf16 where the hardware runs it natively).",
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

    The bar appears with the first record, so a run that fails while checking its input prints only the error.
    ``total`` None: each training run's own total (a job of several runs, e.g. pretraining then fine-tuning, draws
    one bar per run)."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.bar: tqdm | None = None
        self.post: dict[str, str] = {}

    def __call__(self, record: Mapping[str, Any]) -> None:
        run_total = record.get("total") if self.total is None else self.total
        new_run = self.bar is not None and self.total is None and record.get("event") == "train" and (
            run_total != self.bar.total or int(record["step"]) < self.bar.n)  # fmt: skip
        if new_run and self.bar is not None:
            self.bar.close()
            self.bar, self.post = None, {}
        if self.bar is None:
            if self.total is None and record.get("event") != "train":
                return  # a run's closing validation before its bar exists
            self.bar = tqdm(total=run_total, unit="step", dynamic_ncols=True, leave=True)
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
