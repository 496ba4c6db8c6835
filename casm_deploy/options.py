"""How a config field is also a command-line option, and how a config checks its values.

Below `config.py` (whose dataclasses declare their fields with `opt`) and read by `cli.py`,
which builds each command's options from those fields: the option's names, help and
conversion live in the field's metadata, its default is the field's. No torch here.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any, Literal, get_args, get_origin, get_type_hints

from casm_deploy.errors import UserError


class ConfigError(UserError, ValueError):
    """A value a config refuses: a user mistake (the CLI prints it as one line, exit status 2),
    and a ValueError to code that builds a config from its own values."""


def opt(
    default: Any,
    help: str = "",
    *,
    panel: str | None = None,
    flag: str | tuple[str, ...] = (),
    negatable: bool = True,
    argument: bool = False,
    name: str = "",
    required: bool = False,
    path: bool = False,
    repeat: bool = False,
    parse: Any = None,
    at_least: float | None = None,
    show_default: bool = True,
    metavar: str | None = None,
    hidden: bool = False,
    recipes: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """A config field and, when it has a `help`, its command-line option (how cli.py reads it).

    panel: the --help group; flag: the option's names when not `--field-name`; negatable: False
    for a bool flag without its --no- form; argument: positional (`name`: its name in --help,
    `required`: no default); path: given as a path, kept as a str; repeat: a tuple option that
    may be given more than once (a tuple is always also a comma-separated list); parse: turns
    the text given into the value, or into a dict of several fields' values; recipes: the
    option names a set of other fields' values, which the options given beside it override.
    at_least: the smallest value the config takes (None, an unset override, passes).
    """
    meta = dict(help=help, panel=panel, flag=(flag,) if isinstance(flag, str) else flag)
    meta.update(negatable=negatable, argument=argument, name=name, required=required)
    meta.update(path=path, repeat=repeat, parse=parse, at_least=at_least)
    meta.update(show_default=show_default, metavar=metavar, hidden=hidden, recipes=recipes)
    return dataclasses.field(default=default, metadata=meta)


def resolved() -> Any:
    """A config field that is not an option: a value its `__post_init__` resolves from the
    options (set there once), left out of the config's file (`config.config_to_dict`)."""
    return dataclasses.field(init=False, repr=False, compare=False)


def is_option(f: dataclasses.Field) -> bool:
    """Whether field `f` is one of the config's values as given (not a `resolved` one)."""
    return f.init


def flag_of(f: dataclasses.Field) -> str:
    """The option that sets field `f`, as messages name it: batch_size -> --batch-size."""
    flags = f.metadata.get("flag")
    return flags[0] if flags else "--" + f.name.replace("_", "-")


@cache
def field_types(cls: type) -> dict[str, Any]:
    """The type of each field of config class `cls`, resolved (config.py's annotations are text)."""
    return get_type_hints(cls)


def choices_of(kind: Any) -> tuple[Any, ...]:
    """The values a `Literal[...]` type allows; () for any other type."""
    return get_args(kind) if get_origin(kind) is Literal else ()


def _alternatives(choices: tuple[Any, ...]) -> str:
    names = [str(c) for c in choices]
    if len(names) > 4:
        return "one of " + ", ".join(names)
    return ", ".join(names[:-1]) + " or " + names[-1]


def refuse_choice(f: dataclasses.Field, choices: tuple[Any, ...], value: Any) -> ConfigError:
    return ConfigError(f"{flag_of(f)} must be {_alternatives(choices)}, not {value!r}")


def check_fields(cfg: Any) -> None:
    """Refuse a field's value outside the choices of its Literal type or below its `at_least`.

    Raises:
        ConfigError: naming the option and the value.
    """
    types = field_types(type(cfg))
    for f in filter(is_option, dataclasses.fields(cfg)):
        value = getattr(cfg, f.name)
        choices = choices_of(types[f.name])
        if choices and value not in choices:
            raise refuse_choice(f, choices, value)
        low = f.metadata.get("at_least")
        if low is not None and value is not None and value < low:
            raise ConfigError(f"{flag_of(f)} must be at least {low}, not {value}")


def make_config(cls: type, **given: Any) -> Any:
    """`cls` of the values in `given` (the options a user gave) on top of the recipe they name
    (a field with `recipes`: the others take that recipe's values, then their defaults).

    Raises:
        ConfigError: an unknown recipe, or a value `cls` refuses.
    """
    for f in dataclasses.fields(cls):
        recipes = f.metadata.get("recipes")
        if recipes is not None:
            chosen = given.get(f.name, f.default)
            if chosen not in recipes:
                raise refuse_choice(f, tuple(recipes), chosen)
            given = {**recipes[chosen], **given, f.name: chosen}
    return cls(**given)


__all__ = [
    "ConfigError",
    "check_fields",
    "choices_of",
    "field_types",
    "flag_of",
    "is_option",
    "make_config",
    "opt",
    "refuse_choice",
    "resolved",
]
