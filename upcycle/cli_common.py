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
