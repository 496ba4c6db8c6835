"""The Typer commands made from the config dataclasses (config.py): a field's default, help,
--help group and conversion are declared there once (options.opt); `command` turns them into
Typer parameters and the parsed values back into the config, and runs the job under `call`:
a user mistake (`UserError`) prints one line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from casm_deploy.errors import UserError
from casm_deploy.options import choices_of, field_types, make_config


def call(job: Callable[[], Any]) -> Any:
    try:
        return job()
    except UserError as error:  # config.py's ConfigError included: a value a config refused
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except ValueError as error:  # a value a job's own code refused
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        raise typer.Exit(130) from None


def _options(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that are command-line parameters (those with a help text), in the
    order --help shows them: by the class's PANELS (ungrouped first), a recipe first in its
    panel (it applies before the others), then as declared."""
    rank = {panel: i for i, panel in enumerate(getattr(cls, "PANELS", ()))}
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("help")]
    return sorted(
        fields, key=lambda f: (rank.get(f.metadata["panel"], -1), not f.metadata["recipes"])
    )


def _cli_type(f: dataclasses.Field, kind: Any) -> Any:
    """What the command line parses for field `f` of type `kind`, before `_value` converts it."""
    m = f.metadata
    many = kind == tuple[str, ...]
    if m["path"]:
        return list[Path] if many else Path
    if many:  # comma-separated, and repeatable where the field says so
        return list[str] if m["repeat"] else str
    if m["parse"] is not None:
        return str
    choices = choices_of(kind)
    return type(choices[0]) if choices else kind  # a Literal's values are checked by the config


def _cli_default(f: dataclasses.Field, cli_type: Any) -> Any:
    if f.metadata["required"]:
        return inspect.Parameter.empty
    if cli_type is Path:
        return Path(f.default)
    if cli_type == list[str]:
        return list(f.default)
    if cli_type is str and isinstance(f.default, tuple):
        return ",".join(f.default)
    return str(f.default) if cli_type is str else f.default


def _parameter(f: dataclasses.Field, kind: Any) -> inspect.Parameter:
    """The Typer parameter of field `f`, from its metadata (options.opt)."""
    m = f.metadata
    cli_type = _cli_type(f, kind)
    shared = dict(help=m["help"], show_default=m["show_default"], metavar=m["metavar"])
    if m["argument"]:
        info = typer.Argument(hidden=m["hidden"], **shared)
    else:
        flags = m["flag"]
        if cli_type is bool and not m["negatable"] and not flags:
            flags = ("--" + f.name.replace("_", "-"),)  # named once: no --no- form
        info = typer.Option(*flags, hidden=m["hidden"], rich_help_panel=m["panel"], **shared)
    return inspect.Parameter(
        m["name"] or f.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=_cli_default(f, cli_type),
        annotation=Annotated[cli_type, info],
    )


def _value(f: dataclasses.Field, kind: Any, given: Any) -> dict[str, Any]:
    """The config values of what was given for field `f` of type `kind`: its `parse` (a value,
    or a dict of several fields' values), a path as text, a comma list as a tuple."""
    parse = f.metadata["parse"]
    if parse is not None:
        value = parse(given)
        return value if isinstance(value, dict) else {f.name: value}
    if kind == tuple[str, ...]:
        items = [given] if isinstance(given, str) else given
        return {f.name: tuple(v.strip() for item in items for v in item.split(",") if v.strip())}
    return {f.name: str(given) if isinstance(given, Path) else given}


def _config(cls: type, ctx: typer.Context, values: dict[str, Any]) -> Any:
    """The config of the options given on the command line; the others keep their defaults (or
    their recipe's values: make_config)."""
    kinds, given = field_types(cls), {}
    for f in _options(cls):
        name = f.metadata["name"] or f.name
        # By the source's name: Typer ships its own copy of click's ParameterSource.
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT":
            given.update(_value(f, kinds[f.name], values[name]))
    return make_config(cls, **given)


def command(group: typer.Typer, cls: type, name: str = "", epilog: str = "") -> Callable:
    """Register `body(cfg)` as a command of `group` whose parameters are the fields of `cls`;
    it runs, under `_call`, on the config built from the parsed values."""

    def register(body: Callable[[Any], None]) -> Callable[..., None]:
        def run(ctx: typer.Context, **values: Any) -> None:
            call(lambda: body(_config(cls, ctx, values)))

        kinds = field_types(cls)
        context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        params = [context, *(_parameter(f, kinds[f.name]) for f in _options(cls))]
        run.__signature__ = inspect.Signature(params, return_annotation=None)
        run.__annotations__ = {p.name: p.annotation for p in params}
        run.__name__ = body.__name__
        # Rich keeps the newlines of a help text: join the lines of each docstring paragraph,
        # wrapped for the source, so that they do not break mid-sentence in the terminal.
        paragraphs = inspect.cleandoc(body.__doc__ or "").split("\n\n")
        run.__doc__ = "\n\n".join(" ".join(p.split()) for p in paragraphs)
        group.command(name or None, epilog=epilog)(run)
        return run

    return register
