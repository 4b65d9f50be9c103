"""Ctrl-C in the first second of any ptq2tvm command (session 35)."""

from __future__ import annotations


def test_ctrl_c_while_the_cli_starts_is_one_line(monkeypatch, capsys):
    """`timeout -s INT 1 ptq2tvm compile RUN` printed a 30-line KeyboardInterrupt traceback from torch's import
    inside build_parser (outside main's handler); now one line and exit 130, like an interrupt later on."""
    from ptq2tvm import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["compile", "runs/x"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "ptq2tvm: interrupted before the command started; nothing was written"
