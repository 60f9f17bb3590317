"""The ``fedpersona`` command line: ``simulate``, ``report``, ``bench``, ``privacy`` and the
device's own commands (``fedpersona device …``, :mod:`client.cli`).

It lives in the top layer because it starts simulations; it imports only downward
(simulations → server/client → common), and the device commands load lazily, so a user's
``fedpersona device status`` imports neither torch nor Flower.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from simulations.presets import PRESETS

app = typer.Typer(
    help="fedpersona: federated, privacy-preserving LLM personalization.", no_args_is_help=True
)
console = Console()


@app.callback()
def _root() -> None:
    """fedpersona: federated, privacy-preserving LLM personalization."""


@app.command()
def simulate(
    preset: Annotated[str, typer.Option(help=" | ".join(PRESETS))] = "quick",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Run-config override key=value (repeatable)")
    ] = None,
    out: Annotated[Path, typer.Option(help="Parent directory of the run directory")] = Path("runs"),
    name: Annotated[
        str, typer.Option(help="Run directory name (default: preset-strategy-time)")
    ] = "",
    verbose: Annotated[bool, typer.Option(help="Echo Flower's full log")] = False,
    with_report: Annotated[
        bool, typer.Option("--report", help="Then evaluate the run and write its report")
    ] = False,
    corpus: Annotated[
        Path | None,
        typer.Option(
            help="Per-user data instead of Shakespeare: a folder with one file or sub-folder "
            "per user (text/Markdown, chat JSONL, mbox), or one JSONL of records with a user id"
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Run the ClientApps on this existing Ray cluster (host:port of its head; "
            "default: $RAY_ADDRESS, else a Ray of the run's own on this machine)"
        ),
    ] = None,
) -> None:
    """Run a local multi-client federation (Flower Simulation Engine on Ray)."""
    from common.config import parse_set
    from simulations.simulate import is_fedpersona_line
    from simulations.simulate import simulate as run

    try:
        overrides = parse_set(set_ or [])
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    if corpus is not None:
        overrides["data.corpus"] = str(corpus.expanduser().resolve())
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"{preset}: starting", total=None)

        def on_round(current: int, total: int) -> None:
            progress.update(
                task,
                description=f"{preset}: round {current}/{total}",
                completed=current - 1,
                total=total,
            )

        def on_line(line: str) -> None:
            if verbose or is_fedpersona_line(line) or "ERROR" in line or "Traceback" in line:
                progress.console.print(Text.from_ansi(line), highlight=False, soft_wrap=True)

        try:
            run_dir = run(
                preset,
                overrides,
                out,
                run_name=name or None,
                on_line=on_line,
                on_round=on_round,
                ray_address=ray_address,
            )
        except (ValueError, RuntimeError, TimeoutError) as err:
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(1) from None
        progress.update(task, completed=progress.tasks[0].total or 1, description=f"{preset}: done")
    print_summary(json.loads((run_dir / "summary.json").read_text()), run_dir)
    if with_report:
        report(run_dir, sweep=None, compare=None)


# Runs with more users than this print the groups by data, not one row per user.
MAX_USER_ROWS = 40


def _loss(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def print_summary(summary: dict, run_dir: Path) -> None:
    """What a finished run shows: its users (or their groups by data), then one sentence."""
    rows = summary["clients"]
    if len(rows) <= MAX_USER_ROWS:
        table = Table(title=f"{summary['strategy']} — {run_dir}")
        for col in ("user", "examples", "base", "global", "served", "local-only", "w"):
            table.add_column(col)
        for row in rows:
            trained = row.get("rounds_trained", 1) > 0
            table.add_row(
                row["user"],
                str(row["n_train"]),
                _loss(row["base_loss"]),
                _loss(row["global_loss"]),
                _loss(row["personal_loss"]),
                _loss(row.get("local_only_loss")) if trained else "never trained",
                f"{row['mix_weight']:g}" if "mix_weight" in row else "",
            )
        console.print(table)
    groups = summary.get("by_data") or []
    if groups:
        table = Table(title="by training examples (quartiles of the users who trained)")
        for col in (
            "users",
            "examples",
            "base",
            "global",
            "served",
            "local-only",
            "better than local",
            "no worse",
        ):
            table.add_column(col)
        for g in groups:
            table.add_row(
                f"{g['group']}: {g['users']}",
                f"{g['n_train_min']}–{g['n_train_max']}",
                _loss(g["base_loss"]),
                _loss(g["global_loss"]),
                _loss(g["personal_loss"]),
                _loss(g["local_only_loss"]),
                _share(g["better_than_local"]),
                _share(g["no_worse_than_local"]),
            )
        console.print(table)
    console.print(
        f"win_rate={summary['win_rate']:.3f}  ppl_gain={summary['ppl_gain']:.4f}  "
        f"total={summary['timings']['total_s']:.0f} s"
    )
    if summary.get("headline"):
        console.print(summary["headline"], soft_wrap=True)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (has summary.json)")],
    sweep: Annotated[
        Path | None, typer.Option(help="sweep.json from `python -m benchmarks.sweep`")
    ] = None,
    compare: Annotated[
        list[Path] | None,
        typer.Option(help="Runs of the same setup at other noise levels (repeatable)"),
    ] = None,
) -> None:
    """Evaluate a run (if not done yet) and write report/report.html + report.md + PNGs."""
    from simulations.report import build_report

    for d in [run_dir, *(compare or [])]:
        if not (d / "summary.json").exists():
            raise typer.BadParameter(f"{d} has no summary.json")
    with console.status("evaluating and plotting (minutes on CPU for SmolLM2)…"):
        path = build_report(run_dir, sweep=sweep, compare=compare)
    console.print(f"report: {path}")
    console.print((path.parent / "report.md").read_text().split("\n\n")[1])


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="Where bench.json / bench.md go")] = Path("runs/bench"),
    model: Annotated[str, typer.Option(help="smollm2 | tiny")] = "smollm2",
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    quick_scaling: Annotated[
        bool, typer.Option(help="Scale to 1,000 users at 10 per round only")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Write into --out even if it holds other files")
    ] = False,
) -> None:
    """Run the benchmark suite (privacy cost, throughput, device, scaling); print the table."""
    from benchmarks.suite import SUITE_FILES
    from common.atomic import check_replaceable

    try:
        check_replaceable(
            out,
            lambda p: force or (p.is_dir() and {c.name for c in p.iterdir()} <= SUITE_FILES),
            what="an earlier benchmark folder",
        )
    except FileExistsError as err:
        raise typer.BadParameter(str(err)) from None

    import torch

    from benchmarks.suite import run_suite

    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda: no CUDA device here")
    with console.status("benchmarking (about 25 min on 2 CPU cores)…"):
        results = run_suite(out.resolve(), model=model, device=device, quick_scaling=quick_scaling)
    console.print((out / "bench.md").read_text())
    console.print(f"JSON: {out / 'bench.json'} ({results['total_s'] / 60:.1f} min)")


def _device_app() -> typer.Typer:
    from client.cli import app as device_app

    return device_app


app.add_typer(_device_app(), name="device")


def _server_app() -> typer.Typer:
    from server.cli import app as server_app

    return server_app


app.add_typer(_server_app(), name="server")

privacy_app = typer.Typer(help="Privacy helpers.", no_args_is_help=True)
app.add_typer(privacy_app, name="privacy")


@privacy_app.command("noise")
def privacy_noise(
    population: Annotated[int, typer.Option(help="Number of users in the federation")],
    per_round: Annotated[int, typer.Option(help="Users sampled per round")],
    rounds: Annotated[int, typer.Option(help="Number of rounds")],
    target_epsilon: Annotated[float, typer.Option(help="User-level ε to stay under")] = 1.0,
    delta: Annotated[float, typer.Option(help="δ")] = 1e-5,
    accountant: Annotated[str, typer.Option(help="rdp | prv")] = "rdp",
    noise_mode: Annotated[
        str, typer.Option(help="distributed (Gaussian) | skellam (integers in SecAgg+)")
    ] = "distributed",
    numbers: Annotated[
        int, typer.Option(help="skellam: numbers in the shared update (population: 3072)")
    ] = 3072,
    min_clients: Annotated[
        int, typer.Option(help="skellam: m_min, the noise shares a sum holds (0: per-round)")
    ] = 0,
    clip_norm: Annotated[float, typer.Option(help="skellam: dp.clip-norm C")] = 0.05,
) -> None:
    """Print the noise multiplier σ that DP-FedAvg needs for a target user-level ε.

    This is the physical limit: below this σ no training schedule meets the target. The
    noise on the averaged update is σC/m, so a small federation pays in utility. In
    ``skellam`` mode the σ also pays for the rounding and for the general subsampling bound
    (the encoding is derived from C, σ, m_min, the population and the update's length).
    """
    from common.dp.accounting import epsilon, noise_for_target

    if not 0 < per_round <= population:
        raise typer.BadParameter("need 0 < per-round <= population")
    if noise_mode not in ("distributed", "skellam"):
        raise typer.BadParameter("--noise-mode must be distributed or skellam")
    q = per_round / population
    rounding = None
    if noise_mode == "skellam":
        rounding = _skellam_rounding(
            population, min_clients or per_round, numbers=numbers, clip_norm=clip_norm
        )
    sigma = noise_for_target(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=q,
        steps=rounds,
        accountant=accountant,
        rounding=rounding,
    )
    entry = (sigma, q, rounds) if rounding is None else (sigma, q, rounds, rounding(sigma))
    eps = epsilon([entry], delta=delta, accountant=accountant)
    _print_noise(population, per_round, rounds, target_epsilon, delta, sigma, eps)
    console.print(
        f"assumes uniform sampling of {per_round}/{population} users per round ({accountant} "
        "accountant); a device that cannot verify the sampling charges q = 1 per round it joins."
        + (
            " skellam: RDP of the distributed Skellam mechanism with its rounding, Zhu & Wang's "
            "general Poisson-subsampling bound"
            if rounding is not None
            else ""
        )
    )


def _print_noise(  # noqa: PLR0913
    population: int,
    per_round: int,
    rounds: int,
    target_epsilon: float,
    delta: float,
    sigma: float,
    eps: float,
) -> None:
    """The noise table of ``fedpersona privacy noise``."""
    q = per_round / population
    table = Table(title="DP-FedAvg noise for a user-level budget")
    for col in (
        "population",
        "per round",
        "q",
        "rounds",
        "target ε",
        "δ",
        "σ",
        "ε at σ",
        "noise std on the mean / C",
    ):
        table.add_column(col)
    table.add_row(
        str(population),
        str(per_round),
        f"{q:.4g}",
        str(rounds),
        f"{target_epsilon:g}",
        f"{delta:g}",
        f"{sigma:.3f}",
        f"{eps:.3f}",
        f"{sigma / per_round:.4f}",
    )
    console.print(table)


def _skellam_rounding(population: int, m_min: int, *, numbers: int, clip_norm: float):  # type: ignore[no-untyped-def]
    """σ -> the rounding a skellam round's charge carries, as a federation of ``population``
    users with noise shares sized for ``m_min`` derives it."""
    import math

    from common.dp.privatize import Privatize

    def rounding(sigma: float) -> tuple[float, float, float]:
        share = sigma * clip_norm / math.sqrt(m_min)
        privatize = Privatize(clip_norm, share, max_contributions=population)
        return privatize.discrete_params(numbers).charge

    return rounding


def main() -> None:
    """Console-script entry point."""
    from client.cli import options

    options.AS_PROCESS = True  # a long-lived device command may start over (passphrase)
    app()


if __name__ == "__main__":
    main()
