"""The ``streammerge`` typer app: every command group's commands, registered in the order ``--help`` lists them."""

from __future__ import annotations

import typer

from . import demo, finalize, headers, merge, vectors, verify, version

app = typer.Typer(
    name="streammerge",
    help=(
        "Stream-merge safetensors checkpoints with bounded memory: OUT = TARGET + alpha * (GRPO - SFT).\n\n"
        "Example: streammerge merge Qwen2.5-7B-Instruct sft/ grpo/ -o merged/ --alpha 1"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command()(merge.merge)
app.command()(headers.plan)
app.command()(vectors.extract)
app.command()(vectors.apply)
app.command()(vectors.combine)
app.command()(headers.inspect)
app.command()(demo.demo)
app.command()(verify.verify)
app.command()(finalize.finalize)
app.command()(version.version)


def main() -> None:
    app()
