"""The adapter registry's commands: which adapter serves each task, how good it is, and manual
promotion. Tracking URI: `--tracking-uri`, else `$MLFLOW_TRACKING_URI`, else the embedded SQLite
store under `$LORA_PIPELINE_HOME` (see lora_module.registry).

    lora-pipeline list                       # tasks, versions, aliases, ROUGE
    lora-pipeline list summary               # versions of one task
    lora-pipeline show summary @champion     # or a version number: show summary 3
    lora-pipeline register summary runs/x/adapter --report runs/x/eval --train-dir runs/x
    lora-pipeline promote summary 3 --reason "human review passed"
    lora-pipeline demote summary --reason "regression reported"   # drops @champion
    lora-pipeline predict summary --text "Summarize: ..." [--file prompts.txt]

A task `T` means the registered model `T-lora`; `--model-name` names another one.
Exit status: 0 on success, 2 with a one-line `error: ...` for bad input or an unreachable registry.
"""

from __future__ import annotations

import argparse
import getpass
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lora_module.errors import PipelineError, report_error
from lora_module.registry import (
    CHAMPION,
    configure_tracking,
    model_name_for,
    register_adapter,
)
from lora_module.registry.aliases import name_filter
from lora_module.registry.gate import CHALLENGER, RetryPolicy, VersionScore
from lora_module.registry.loading import load_predictor


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
    base = tags.get(f"rouge.{tags.get('eval.baseline', 'base')}.{metric}")
    return [str(mv.version), ",".join(sorted(aliases)) or "-", _figure(tags.get(f"rouge.{metric}")),
            _figure(base), tags.get("gate.decision", "-"), tags.get("mode", "-"),
            tags.get("eval_data_fingerprint", "-")[:12], created]


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    client, uri, policy = _client(args)
    if args.task:
        names = [_name(args)]
    else:
        models = policy.call(lambda: client.search_registered_models(max_results=1000), "list models", uri)
        names = sorted(m.name for m in models)
        if not names:
            print(f"no registered models at {uri}")
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
        task = (model.tags or {}).get("task", "?")
        print(f"{name} (task {task}): {len(versions)} version(s)")
        if versions:
            rows = [_row(mv, args.metric, aliases.get(str(mv.version), [])) for mv in versions]
            print(_table(rows, header))
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
        if k != "gate.json":
            print(f"  {k}: {v}")
    if mv.description:
        print("\n" + mv.description)
    return 0


def _record_manual(client: MlflowClient, name: str, version: str, action: str, reason: str) -> None:
    """Append the action to the version's `manual.history` tag (JSON list) and set `manual.last`."""
    mv = client.get_model_version(name, version)
    history = json.loads((mv.tags or {}).get("manual.history", "[]"))
    entry = {"action": action, "reason": reason, "by": getpass.getuser(),
             "at": datetime.now(UTC).isoformat(timespec="seconds")}
    client.set_model_version_tag(name, version, "manual.history", json.dumps([*history, entry]))
    client.set_model_version_tag(name, version, "manual.last", f"{action}: {reason}")


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
        raise ValueError(f"{name} v{mv.version} is @{CHAMPION}; demote it first to make it @{CHALLENGER}")
    policy.call(lambda: client.set_registered_model_alias(name, args.alias, mv.version), "set alias", uri)
    policy.call(lambda: _record_manual(client, name, mv.version, f"promoted to {args.alias}", args.reason),
                "tag version", uri)
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
        raise ValueError(f"@{args.alias} of {name} is v{mv.version}, not v{args.version}; nothing changed")
    policy.call(lambda: client.delete_registered_model_alias(name, args.alias), "delete alias", uri)
    policy.call(lambda: _record_manual(client, name, mv.version, f"demoted from {args.alias}", args.reason),
                "tag version", uri)
    print(f"{name} v{mv.version} is no longer @{args.alias} (manual: {args.reason})")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    res = register_adapter(
        args.task, args.adapter_dir, report_path=args.report, train_dir=args.train_dir,
        data_fingerprint=args.data_fingerprint, model_name=args.model_name, metric=args.metric,
        tracking_uri=args.tracking_uri, retries=args.retries, backoff=args.backoff,
        tokenizer_dir=args.tokenizer_dir, candidate=args.candidate,
    )
    print(json.dumps({"model_uri": res.model_uri, "alias": res.alias, "run_id": res.run_id,
                      "decision": res.decision}, indent=2))
    return 0


def _read_texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.text or [])
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise ValueError(f"--file {path} does not exist")
        if path.suffix == ".jsonl":  # rows with a "text" (or the prepared data's "prompt") field
            for i, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    row = json.loads(line)
                    if "text" not in row and "prompt" not in row:
                        raise ValueError(f"{path} line {i + 1} has neither a 'text' nor a 'prompt' field")
                    texts.append(row.get("text", row.get("prompt")))
        else:
            texts += [line for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError("nothing to predict: give --text (repeatable) or --file")
    return texts


def cmd_predict(args: argparse.Namespace) -> int:
    texts = _read_texts(args)
    ref = f"models:/{args.model_name}" if args.model_name else args.task
    predictor = load_predictor(
        ref, version=args.version, alias=args.alias, base=args.base, force=args.force,
        tracking_uri=args.tracking_uri, retries=args.retries, backoff=args.backoff,
    )
    # The same path as the served model: the task's prompt template, prompts cut as in training.
    outputs = predictor.predict(texts, {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams,
                                        "batch_size": args.batch_size})
    if args.json:
        print(json.dumps([{"input": t, "output": o} for t, o in zip(texts, outputs, strict=True)], indent=2))
    else:
        print("\n".join(o.replace("\n", " ") for o in outputs))
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
    p = argparse.ArgumentParser(prog="lora-pipeline", description=__doc__, formatter_class=_Formatter)
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
    s.add_argument("--tokenizer-dir",
                   help="tokenizer to ship with the model (if not given: the prepared data's)")
    s.add_argument("--candidate",
                   help="the report's model name for this adapter (if not given: found by checksum)")
    s.add_argument("--metric", default="rougeL", help="metric of the promotion gate")
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
    s = task_cmd("predict", "generate with a registered adapter")
    s.add_argument("--version", help="version number (if not given: the alias's version)")
    s.add_argument("--alias", default=CHAMPION, help="alias to load when no --version is given")
    s.add_argument("--text", action="append", help="input text (repeatable), e.g. a dialogue: the "
                   "task's prompt template is applied when the version records one")
    s.add_argument("--file", help="inputs: one per line, or .jsonl rows with 'text' / 'prompt'")
    s.add_argument("--base", help="base model folder / Hub id instead of the adapter's recorded base")
    s.add_argument("--force", action="store_true", help="load even if the base fingerprint differs")
    s.add_argument("--max-new-tokens", type=int, help="generated tokens per input at most (default 128)")
    s.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy)")
    s.add_argument("--batch-size", type=int, help="inputs per generation batch (default 16)")
    s.add_argument("--json", action="store_true", help="print [{input, output}] as JSON")
    s.set_defaults(func=cmd_predict)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`lora-pipeline list|show|register|promote|demote|predict ...` (argv starts with the command)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PipelineError, LookupError, ValueError) as e:
        return report_error(e)
    except MlflowException as e:
        return report_error(e.message)
