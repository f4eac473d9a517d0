"""docs/cli.md's option tables are generated from the click commands (python -m upcycle.docs_gen)."""

from __future__ import annotations

import click
import pytest

from upcycle import docs_gen
from upcycle.cli import cli


def test_cli_page_is_current():
    text = docs_gen.CLI_PAGE.read_text()
    assert text == docs_gen.render_cli(text), "stale docs/cli.md: run python -m upcycle.docs_gen"


def test_every_command_has_its_option_table():
    blocks = {m.group("cmd") for m in docs_gen.CLI_BLOCK.finditer(docs_gen.CLI_PAGE.read_text())}
    assert blocks == set(cli.commands), "add a generated options block to docs/cli.md for each command"


def test_every_option_is_in_its_commands_table():
    bodies = {m.group("cmd"): m.group("body") for m in docs_gen.CLI_BLOCK.finditer(docs_gen.CLI_PAGE.read_text())}
    for name, cmd in cli.commands.items():
        rows = bodies[name].splitlines()
        for param in cmd.params:
            if isinstance(param, click.Option) and "--help" not in param.opts:
                long = max(param.opts, key=len)
                assert any(row.startswith("| `") and long in row.split("|")[1] for row in rows), (name, long)


def test_a_new_option_makes_the_page_stale(monkeypatch):
    text = docs_gen.CLI_PAGE.read_text()
    extra = click.Option(["--frobnicate"], is_flag=True, help="Frobnicate the experts.")
    monkeypatch.setattr(cli.commands["verify"], "params", cli.commands["verify"].params + [extra])
    rendered = docs_gen.render_cli(text)
    assert rendered != text and "| `--frobnicate` |  | Frobnicate the experts. |" in rendered


def test_a_note_on_a_missing_option_is_refused(monkeypatch):
    monkeypatch.setitem(docs_gen.CLI_NOTES, ("verify", "no_such_option"), "text")
    with pytest.raises(SystemExit, match="no_such_option"):
        docs_gen.render_cli(docs_gen.CLI_PAGE.read_text())


def test_check_flag_covers_the_cli_page(tmp_path, monkeypatch):
    page = tmp_path / "cli.md"
    page.write_text(docs_gen.CLI_PAGE.read_text().replace("Experts per MoE layer.", "Stale text.", 1))
    monkeypatch.setattr(docs_gen, "CLI_PAGE", page)
    monkeypatch.setattr(docs_gen, "PAGE", tmp_path / "architectures.md")
    assert docs_gen.main([]) == 0
    assert "Experts per MoE layer." in page.read_text() and docs_gen.main(["--check"]) == 0
    page.write_text(page.read_text().replace("Experts per MoE layer.", "Stale text.", 1))
    assert docs_gen.main(["--check"]) == 1
