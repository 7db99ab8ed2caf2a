"""The `qavatar` command line: each command is a thin wrapper around one library function."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import QavatarError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Live Avatar on the GPUs people have: quantize, shard, plan, infer.")


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@app.command("toy-checkpoint")
def toy_checkpoint(out: Path = typer.Argument(..., help="Output directory (created atomically)."),
                   config: str = typer.Option("tiny", help="Model preset or path to a config.json."),
                   seed: int = typer.Option(0, help="Seed of the random weights."),
                   lora_rank: int = typer.Option(8, help="Rank of the toy LoRA."),
                   overwrite: bool = typer.Option(False, help="Replace OUT if it exists.")) -> None:
    """Write a complete, deterministic checkpoint in the real layout, with random weights and a LoRA."""
    from .checkpoint.toy import make_toy_checkpoint

    try:
        path = make_toy_checkpoint(out, config=config, seed=seed, lora_rank=lora_rank, overwrite=overwrite)
    except QavatarError as e:
        _fail(e)
    typer.echo(f"wrote {path} (config {config}, seed {seed}); weights are random")


@app.command()
def inspect(path: Path = typer.Argument(..., help="Checkpoint directory (or the ckpt/ root above it)."),
            config: Optional[str] = typer.Option(None, help="Check keys against this preset instead of config.json."),
            verify: bool = typer.Option(False, help="Hash every file against the manifest."),
            as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """Parameters, bytes per dtype, shards, key check against the config, quantization and LoRA status."""
    from .checkpoint.inspect import format_report, inspect_checkpoint

    try:
        report = inspect_checkpoint(path, config=config, verify=verify)
    except QavatarError as e:
        _fail(e)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if not report["ok"]:
        raise typer.Exit(1)


@app.command("check-parity")
def check_parity(fixture: Path = typer.Argument(..., help="Fixture directory (config.json, model.safetensors, "
                                                           "cases.safetensors, cases.json).")) -> None:
    """Run every case of a reference fixture; exit 1 if any output exceeds its tolerance."""
    from .parity import run_fixture

    try:
        checks = run_fixture(fixture, print_fn=typer.echo)
    except QavatarError as e:
        _fail(e)
    bad = [c for c in checks if not c.ok]
    typer.echo(f"{len(checks) - len(bad)}/{len(checks)} tensors within tolerance")
    if bad:
        raise typer.Exit(1)


@app.command()
def demo(out: Path = typer.Option(Path("qavatar-demo"), help="Where the demo writes its files."),
         seed: int = typer.Option(0, help="Seed for weights, noise and sink offsets.")) -> None:
    """Run the embedded demo end to end on a toy checkpoint (no downloads)."""
    from .demo import run_demo

    try:
        run_demo(out, seed=seed, print_fn=typer.echo)
    except QavatarError as e:
        _fail(e)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
