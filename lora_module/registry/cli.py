"""The adapter registry's commands: which adapter serves each task, how good it is, and manual
promotion. Tracking URI: `--tracking-uri`, else `$MLFLOW_TRACKING_URI`, else the embedded SQLite
store under `$LORA_PIPELINE_HOME` (see lora_module.registry).

    lora-pipeline list                       # tasks, versions, aliases, ROUGE
    lora-pipeline list summary               # versions of one task
    lora-pipeline show summary @champion     # or a version number: show summary 3
    lora-pipeline register summary runs/x/adapter --report runs/x/eval --train-dir runs/x
    lora-pipeline register summary old/adapter --prepared data/summary-3fa2c1d0e9b7   # no prompt recorded
    lora-pipeline promote summary 3 --reason "human review passed"
    lora-pipeline demote summary --reason "regression reported"   # drops @champion

A task `T` means the registered model `T-lora`; `--model-name` names another one (of another
task only with `--allow-task-mismatch`). `register` first loads the adapter on its base and
generates one row: an adapter that cannot be served is not registered. URIs printed here have
their credentials masked.
Exit status: 0 on success, 2 with a one-line `error: ...` for bad input or an unreachable registry.
"""

from __future__ import annotations

import argparse
import getpass
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lora_module import contracts as c
from lora_module.contracts import CHALLENGER, CHAMPION
from lora_module.errors import ArgumentParser, PipelineError
from lora_module.evaluation.report import format_table
from lora_module.redact import redact_text, redact_uri
from lora_module.registry.aliases import name_filter
from lora_module.registry.gate import VersionScore
from lora_module.registry.register import register_adapter
from lora_module.registry.retry import RegistryUnavailableError, RetryPolicy
from lora_module.registry.tracking import configure_tracking, model_name_for


class RegistryCommandError(PipelineError, RuntimeError):
    """The registry refused a command (no such model, version or alias)."""


class AliasChangeError(PipelineError, ValueError):
    """A manual promotion or demotion that would contradict the registry's aliases (nothing changed)."""


def _name(args: argparse.Namespace) -> str:
    return args.model_name or model_name_for(args.task)


def _client(args: argparse.Namespace) -> tuple[MlflowClient, str, RetryPolicy]:
    uri = configure_tracking(args.tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri, RetryPolicy(args.retries, args.backoff)


def _version_ref(client: MlflowClient, name: str, ref: str) -> Any:
    """`3` or `@champion` -> ModelVersion."""
    if ref.startswith("@"):
        return client.get_model_version_by_alias(name, ref[1:])
    return client.get_model_version(name, ref)


def _figure(value: str | None) -> str:
    """A metric tag rounded to 4 decimals ('-' when absent; the raw text when not a number)."""
    if value is None:
        return "-"
    try:
        return f"{float(value):.4f}"
    except ValueError:
        return value


def _row(mv: Any, metric: str, aliases: list[str]) -> list[str]:
    tags = mv.tags or {}
    created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M")
    base = tags.get(c.metric_key(metric, tags.get(c.TAG_EVAL_BASELINE, "base")))
    return [str(mv.version), ",".join(sorted(aliases)) or "-", _figure(tags.get(c.metric_key(metric))),
            _figure(base), tags.get(c.TAG_GATE_DECISION, "-"), tags.get(c.TAG_MODE, "-"),
            tags.get(c.TAG_EVAL_DATA_FINGERPRINT, "-")[:12], created]


def cmd_list(args: argparse.Namespace) -> int:
    client, uri, policy = _client(args)
    if args.task:
        names = [_name(args)]
    else:
        models = policy.call(lambda: client.search_registered_models(max_results=1000), "list models", uri)
        names = sorted(m.name for m in models)
        if not names:
            print(f"no registered models at {redact_uri(uri)}")
            return 0
    header = ["version", "aliases", args.metric, "base", "gate", "mode", "test data", "created (UTC)"]
    for name in names:
        # name_filter: a model left from before names were checked (`o'brien`) must not break `list`.
        versions = policy.call(lambda n=name: client.search_model_versions(name_filter(n)),
                               f"list {name}", uri)
        versions = sorted(versions, key=lambda mv: int(mv.version))
        # Search results do not carry aliases: read them from the registered model.
        model = policy.call(lambda n=name: client.get_registered_model(n), f"read {name}", uri)
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        task = (model.tags or {}).get(c.TAG_TASK, "?")
        print(f"{name} (task {task}): {len(versions)} version(s)")
        if versions:
            rows = [_row(mv, args.metric, aliases.get(str(mv.version), [])) for mv in versions]
            print(format_table(header, rows, "text", align="><>><<<<"))
        print()
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    client, uri, policy = _client(args)
    name = _name(args)
    mv = policy.call(lambda: _version_ref(client, name, args.version), f"look up {name} {args.version}", uri)
    if args.json:
        print(json.dumps({"name": name, "version": str(mv.version), "aliases": list(mv.aliases or []),
                          "run_id": mv.run_id, "source": mv.source, "tags": dict(mv.tags or {}),
                          "description": mv.description}, indent=2))
        return 0
    print(f"{name} v{mv.version}  aliases: {', '.join(mv.aliases or []) or '-'}")
    print(f"run {mv.run_id}  source {mv.source}  status {mv.status}")
    for k, v in sorted((mv.tags or {}).items()):
        if k != c.TAG_GATE_JSON:
            print(f"  {k}: {v}")
    if mv.description:
        print("\n" + mv.description)
    return 0


def _record_manual(client: MlflowClient, name: str, version: str, action: str, reason: str) -> None:
    """Append the action to the version's `manual.history` tag (JSON list) and set `manual.last`."""
    mv = client.get_model_version(name, version)
    history = json.loads((mv.tags or {}).get(c.TAG_MANUAL_HISTORY, "[]"))
    entry = {"action": action, "reason": reason, "by": getpass.getuser(),
             "at": datetime.now(UTC).isoformat(timespec="seconds")}
    client.set_model_version_tag(name, version, c.TAG_MANUAL_HISTORY, json.dumps([*history, entry]))
    client.set_model_version_tag(name, version, c.TAG_MANUAL_LAST, f"{action}: {reason}")


def _move_challenger(client: MlflowClient, name: str, champion: str) -> str | None:
    """After a manual promotion to champion: @challenger to the newest other version (as the gate
    would: not one demoted from it by hand), or removed when there is none; returns its version."""
    versions = client.search_model_versions(name_filter(name))
    others = [VersionScore.from_tags(mv.version, mv.tags or {}, "rougeL") for mv in versions]
    others = [v for v in others if v.version != champion and CHALLENGER not in v.demoted_from]
    aliases = client.get_registered_model(name).aliases or {}
    if not others:
        if CHALLENGER in aliases:
            client.delete_registered_model_alias(name, CHALLENGER)
        return None
    newest = max(others, key=lambda v: int(v.version)).version
    if str(aliases.get(CHALLENGER)) != newest:
        client.set_registered_model_alias(name, CHALLENGER, newest)
    return newest


def cmd_promote(args: argparse.Namespace) -> int:
    client, uri, policy = _client(args)
    name = _name(args)
    mv = policy.call(lambda: client.get_model_version(name, args.version),
                     f"look up {name} v{args.version}", uri)
    if args.alias == CHALLENGER and CHAMPION in (mv.aliases or []):
        raise AliasChangeError(
            f"{name} v{mv.version} is @{CHAMPION}; demote it first to make it @{CHALLENGER}")
    policy.call(lambda: client.set_registered_model_alias(name, args.alias, mv.version), "set alias", uri)
    action = c.manual_action(c.PROMOTED_TO, args.alias)
    policy.call(lambda: _record_manual(client, name, mv.version, action, args.reason), "tag version", uri)
    note = ""
    if args.alias == CHAMPION:  # one version holds one of the two: the champion leaves @challenger
        challenger = policy.call(lambda: _move_challenger(client, name, str(mv.version)), "move challenger",
                                 uri)
        note = f"; @{CHALLENGER} is v{challenger}" if challenger else f"; no @{CHALLENGER}"
    print(f"{name} v{mv.version} is now @{args.alias} (manual: {args.reason}){note}. It holds until the next "
          "registration of this task recomputes the aliases (see `lora-pipeline promote --help`)")
    return 0


def cmd_demote(args: argparse.Namespace) -> int:
    client, uri, policy = _client(args)
    name = _name(args)
    mv = policy.call(lambda: client.get_model_version_by_alias(name, args.alias),
                     f"look up {name}@{args.alias}", uri)
    if args.version is not None and str(args.version) != str(mv.version):
        raise AliasChangeError(
            f"@{args.alias} of {name} is v{mv.version}, not v{args.version}; nothing changed")
    policy.call(lambda: client.delete_registered_model_alias(name, args.alias), "delete alias", uri)
    action = c.manual_action(c.DEMOTED_FROM, args.alias)
    policy.call(lambda: _record_manual(client, name, mv.version, action, args.reason), "tag version", uri)
    print(f"{name} v{mv.version} is no longer @{args.alias} (manual: {args.reason})")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    res = register_adapter(
        args.task, args.adapter_dir, report_path=args.report, train_dir=args.train_dir,
        data_fingerprint=args.data_fingerprint, model_name=args.model_name, metric=args.metric,
        tracking_uri=args.tracking_uri, retries=args.retries, backoff=args.backoff,
        tokenizer_dir=args.tokenizer_dir, candidate=args.candidate, prepared_dir=args.prepared,
        allow_task_mismatch=args.allow_task_mismatch,
    )
    print(json.dumps({"model_uri": res.model_uri, "alias": res.alias, "run_id": res.run_id,
                      "decision": res.decision}, indent=2))
    return 0


_PROMOTE_HELP = (
    "Give a version an alias by hand (default @champion). Promoted to @champion, the version\n"
    "loses @challenger, which moves to the newest other version.\n\n"
    "The promotion holds until the next registration of this task: every registration\n"
    "recomputes @champion and @challenger from all versions' scores (the promotion gate), so\n"
    "then @champion goes to the gate's choice again. To keep a version from regaining an alias,\n"
    "demote it: a version demoted by hand from an alias never gets it back automatically.")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's line breaks and appends each option's default to its help."""


def _common(parser: argparse.ArgumentParser) -> None:
    """Where the registry is and how hard to retry: options of every command."""
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (if not given: "
                        "$MLFLOW_TRACKING_URI, else the SQLite store under the pipeline home)")
    parser.add_argument("--retries", type=int, default=RetryPolicy.retries,
                        help="retries of each registry call (the default outlasts a server restart)")
    parser.add_argument("--backoff", type=float, default=RetryPolicy.backoff,
                        help=f"first retry wait in seconds, doubled up to {RetryPolicy.max_backoff:g} s")


def build_parser() -> argparse.ArgumentParser:
    """One parser whose subcommands are the `lora-pipeline` registry commands."""
    p = ArgumentParser(prog="lora-pipeline", description=__doc__, formatter_class=_Formatter)
    sub = p.add_subparsers(dest="command", required=True)

    def task_cmd(name: str, help_: str, task_required: bool = True) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_, description=help_, formatter_class=_Formatter)
        s.add_argument("task", nargs=None if task_required else "?",
                       help="task name (registered model <task>-lora)")
        s.add_argument("--model-name", help="registered model name, instead of <task>-lora")
        _common(s)
        return s

    s = task_cmd("list", "tasks (registered models) with versions, aliases and metrics", task_required=False)
    s.add_argument("--metric", default="rougeL", help="ROUGE type shown in the table")
    s.set_defaults(func=cmd_list)
    s = task_cmd("show", "one version: tags, lineage, gate decision, report table")
    s.add_argument("version", help="version number or @alias (e.g. @champion)")
    s.add_argument("--json", action="store_true", help="print the version's record as JSON")
    s.set_defaults(func=cmd_show)
    s = task_cmd("register", "register an adapter folder (+ report, training output) as a new version")
    s.add_argument("adapter_dir", help="adapter folder in PEFT format")
    s.add_argument("--report", help="report.json of the evaluation (or its folder)")
    s.add_argument("--train-dir", help="training output folder (config.yaml, metrics.json)")
    s.add_argument("--data-fingerprint",
                   help="fingerprint of the prepared data (if not given: from the report)")
    s.add_argument("--prepared", help="prepared data folder the adapter was trained on: its manifest's "
                   "prompt settings are written into the registered adapter (for an adapter that records "
                   "none), its tokenizer/ ships with the model")
    s.add_argument("--tokenizer-dir", help="tokenizer to ship with the model (if not given: --prepared's "
                   "tokenizer/, else the base model's is used)")
    s.add_argument("--candidate",
                   help="the report's model name for this adapter (if not given: found by checksum)")
    s.add_argument("--metric", default="rougeL", help="metric of the promotion gate")
    s.add_argument("--allow-task-mismatch", action="store_true",
                   help="register under a model of another task anyway (the version's task_mismatch tag "
                        "records it)")
    s.set_defaults(func=cmd_register)
    s = task_cmd("promote", "give a version an alias by hand (default @champion)")
    s.description = _PROMOTE_HELP
    s.add_argument("version", help="version number to promote")
    s.add_argument("--alias", default=CHAMPION, help="alias to set")
    s.add_argument("--reason", required=True, help="why (stored in the version's manual.history tag)")
    s.set_defaults(func=cmd_promote)
    s = task_cmd("demote", "remove an alias (default @champion) by hand")
    s.add_argument("version", nargs="?", help="only if the alias still points to this version")
    s.add_argument("--alias", default=CHAMPION, help="alias to remove")
    s.add_argument("--reason", required=True, help="why (stored in the version's manual.history tag)")
    s.set_defaults(func=cmd_demote)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`lora-pipeline list|show|register|promote|demote ...` (argv starts with the command)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MlflowException as e:  # e.g. no such version: the registry's own words, one line via run_cli
        raise RegistryCommandError(redact_text(e.message)) from e
    except RegistryUnavailableError as e:  # names the store's URI: never with its password
        raise RegistryUnavailableError(redact_text(str(e))) from e
