"""``fedpersona device privacy show|set``: the owner's privacy policy — what the device
accepts from any server (caps, noise floor, SecAgg+, cohort size)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from client.cli.options import (
    DataDir,
    KeyFile,
    app,
    fail,
    open_store,
)
from client.store import DEFAULT_RETENTION_DAYS

privacy_app = typer.Typer(
    help="The device's own privacy policy: what it accepts from a federation's server.",
    no_args_is_help=True,
)
app.add_typer(privacy_app, name="privacy", rich_help_panel="The federation")


def _policy_dict(policy) -> dict:  # type: ignore[no-untyped-def]
    return {k.replace("_", "-"): v for k, v in policy.to_dict().items() if k != "version"}


def _changed_policy(store, changes: dict):  # type: ignore[no-untyped-def]
    """The store's policy with ``changes``, kept there (δ is fixed once charged).

    Raises:
        ValueError: A value the policy refuses, or a new δ under existing charges.
    """
    from client.federation.ledger import LEDGER_BLOB
    from client.federation.policy import DevicePolicy

    policy = DevicePolicy.of(store)
    new = policy.with_changes(**changes)
    ledger = store.get_json(LEDGER_BLOB)
    if new.delta != policy.delta and isinstance(ledger, dict) and ledger.get("events"):
        raise ValueError(f"the ledger holds charges at δ = {policy.delta:g}; δ cannot change now")
    new.save(store)
    return new


@privacy_app.command("show")
def privacy_show(data_dir: DataDir, key_file: KeyFile = None) -> None:
    """Print the policy every round's instructions are checked against, and what the ledger
    has spent under it: user-level ε (at least ``honest-fraction`` of every cohort honest)
    and the worst case, this device's updates alone."""
    from client.federation.policy import DevicePolicy
    from client.store.status import budget

    with open_store(data_dir, key_file, DEFAULT_RETENTION_DAYS) as store:
        try:
            policy = DevicePolicy.of(store)
            spent = budget(store)
        except ValueError as err:
            raise fail(err) from None
    shown = {
        **_policy_dict(policy),
        "spent": {k: spent[k] for k in ("record_epsilon", "user_epsilon", "alone_epsilon")},
        "assumes": spent["assumes"],
    }
    print(json.dumps(shown, indent=1))


@privacy_app.command("set")
def privacy_set(
    data_dir: DataDir,
    key_file: KeyFile = None,
    epsilon_cap: Annotated[float | None, typer.Option(help="Lifetime ε cap (each kind)")] = None,
    delta: Annotated[float | None, typer.Option(help="δ of every ε (fixed once charged)")] = None,
    min_noise_multiplier: Annotated[
        float | None, typer.Option(help="Least noise multiplier σ accepted (0: allow none)")
    ] = None,
    min_cohort: Annotated[
        int | None, typer.Option(help="Least m_min a round may size the noise share by")
    ] = None,
    honest_fraction: Annotated[
        float | None,
        typer.Option(help="Largest share of a cohort assumed honest (rounds assuming more: no)"),
    ] = None,
    max_cohort: Annotated[
        int | None,
        typer.Option(help="Most honest devices a round may size the noise share for"),
    ] = None,
    worst_case_epsilon_cap: Annotated[
        float | None,
        typer.Option(help="Cap on the ε of this device's updates alone (0: report only)"),
    ] = None,
    require_secagg: Annotated[
        bool | None, typer.Option(help="Distributed noise only under SecAgg+ masking")
    ] = None,
    trust_server_noise: Annotated[
        bool | None, typer.Option(help="Accept central noise the server adds (unverifiable)")
    ] = None,
    trust_server_sampling: Annotated[
        bool | None, typer.Option(help="Credit the server's claimed sampling rate")
    ] = None,
    share_losses: Annotated[
        bool | None,
        typer.Option(help="Send per-device held-out losses (else only SecAgg+ sums)"),
    ] = None,
    max_evaluations: Annotated[
        int | None, typer.Option(help="Evaluations of a round's release answered")
    ] = None,
    share_ab_counts: Annotated[
        bool | None,
        typer.Option(help="Add your A/B rating counts to the SecAgg+ sum (else none leave)"),
    ] = None,
    period_days: Annotated[float | None, typer.Option(help="Budget period (0: none)")] = None,
    period_epsilon_cap: Annotated[float | None, typer.Option(help="ε cap per period")] = None,
) -> None:
    """Change the policy (the options given); print the result."""
    given = {k: v for k, v in locals().items() if k not in ("data_dir", "key_file")}
    changes = {k: v for k, v in given.items() if v is not None}
    with open_store(data_dir, key_file, DEFAULT_RETENTION_DAYS) as store:
        try:
            new = _changed_policy(store, changes)
        except ValueError as err:
            raise fail(err) from None
    print(json.dumps(_policy_dict(new), indent=1))
