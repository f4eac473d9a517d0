"""Helpers shared by the click commands: number formatting and one-line user errors."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click


def _human(n: float, unit: str = "") -> str:
    for suffix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _user_errors(func: Callable) -> Callable:
    """Print user mistakes as one line (no traceback) and exit non-zero; Ctrl-C leaves nothing behind."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import UpcycleError

        try:
            return func(*args, **kwargs)
        except UpcycleError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)

    return wrapper


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class RegistryOption(click.Option):
    """An option whose help lists a registry (methods, router inits, ...), read only when help is shown so
    that ``upcycle --help`` does not import torch."""

    def __init__(self, *args: Any, choices: Callable[[], str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._choices = choices
        self._template = kwargs.get("help") or ""

    def get_help_record(self, ctx: click.Context):
        self.help = self._template.format(choices=self._choices())
        return super().get_help_record(ctx)


def _names(package: str, attribute: str, describe: bool = True) -> Callable[[], str]:
    def names() -> str:
        from .registry import describe as read

        return ", ".join(f"{name} ({text})" if describe and text else name for name, text in sorted(read(package, attribute).items()))

    return names


METHOD_CHOICES = _names("upcycle.experts", "METHOD")
ROUTER_CHOICES = _names("upcycle.routers", "ROUTER")
PARTITION_CHOICES = _names("upcycle.partitions", "PARTITION")
TARGET_CHOICES = _names("upcycle.targets", "TARGET", describe=False)


def parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs as recipe keys; values read as YAML scalars (``4``, ``0.5``, ``true``)."""
    from .errors import RecipeError
    from .io.yaml_load import load_option_value

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--option {pair!r}: write KEY=VALUE, e.g. --option drop_ratio=0.3")
        # read without YAML aliases: a short alias bomb here was a MemoryError traceback after 85 s and 1.8 GB
        options[key.strip().replace("-", "_")] = load_option_value(value, f"--option {key.strip()}") \
            if value.strip() else None
    return options
