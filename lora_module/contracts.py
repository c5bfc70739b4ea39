"""The contracts between the stages: file and artifact names, tag keys, and the lineage builders.

Every writer and every reader of a file, an MLflow artifact or a tag imports its name from here,
so a name is spelled once:

    from lora_module import contracts as c
    (prepared / c.MANIFEST_FILE).read_text()
    client.set_model_version_tag(name, version, c.TAG_TASK, task)
    c.rouge_key("rougeL", "base"), c.run_name("summary", "lora", 8)   # 'rouge.base.rougeL', '...'

Standard library only, and no logic beyond building names, links and tag dicts: the data stage,
the stages of `lora_module` and the flows all import it, and the served model ships it. Functions
that call MLflow or git stay with their callers (`lora_module.lineage`, `registry.version_lineage`,
`training.run_lineage`); they take their keys from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

# ---- files of a prepared data set (data.prepare) -------------------------------------------
MANIFEST_FILE = "manifest.json"
"""The prepared folder's manifest: config, fingerprint, prompt settings, row counts."""
PREPARED_TOKENIZER_DIR = "tokenizer"
"""The prepared folder's tokenizer (the one training and evaluation used)."""

# ---- files of a tokenizer folder -----------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "tokenizer.model")
"""Files that make a folder a tokenizer folder (any one of them is enough to load from it)."""

# ---- files of a PEFT-format adapter folder -------------------------------------------------
ADAPTER_CONFIG_FILE = "adapter_config.json"
"""PEFT's adapter config, unchanged."""
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
"""PEFT's adapter tensors."""
ADAPTER_SIDECAR_FILE = "lora_pipeline.json"
"""Our keys beside PEFT's config: base fingerprint, training metadata, prompt settings."""

# ---- files of a training output (training.export) ------------------------------------------
ADAPTER_DIR = "adapter"
"""The exported adapter folder of a LoRA run (and the logged model's artifact name)."""
MODEL_DIR = "model"
"""The exported model folder of a full fine-tuning run."""
METRICS_FILE = "metrics.json"
"""Training metrics and identities written beside the exported adapter or model."""
CONFIG_FILE = "config.yaml"
"""The resolved training config written beside the export."""
TRAIN_FILES = (CONFIG_FILE, METRICS_FILE)
RUN_STATE_FILE = "run.json"
"""A run folder's claim: the key of its inputs and whether it is running or done (lora_module.run_dirs)."""
RUN_LOCK_FILE = "run.lock"
"""Held with flock while the run that owns the folder is alive."""
"""The files a registration copies from a training output."""

# ---- files of an evaluation (evaluation.report) --------------------------------------------
REPORT_FILE = "report.json"
"""Every number of an evaluation report (build_report)."""
REPORT_MD_FILE = "report.md"
"""The report's tables in Markdown (also a registered version's description)."""
ROUGE_CHART_FILE = "rouge.png"
"""The report's bar chart of ROUGE means with 95% intervals."""
PREDICTIONS_FILE = "predictions.csv"
"""Input, references and each model's output, one row per example."""
REPORT_FILES = (REPORT_FILE, REPORT_MD_FILE, ROUGE_CHART_FILE, PREDICTIONS_FILE)
"""What an evaluation writes into its output folder."""
EVAL_FILE_SUFFIX = ".eval.json"
"""One model's evaluation: `<name>.eval.json` (see `eval_file`), what a report combines."""
EVALUATION_ARTIFACT = "evaluation"
"""A registration run's copy of its evaluation's REPORT_FILES."""
TRAINING_ARTIFACT = "training"
"""A registration run's copy of its training output's TRAIN_FILES."""

# ---- artifacts of a logged model (registry, serving) ---------------------------------------
TOKENIZER_ARTIFACT = "tokenizer"
"""The logged model's tokenizer folder (when one was given at registration)."""
BASE_ARTIFACT = "base"
"""The logged model's record of its base model (registry.bases)."""
MULTITASK_ARTIFACT = "multitask"
"""The multi-task model's artifact holding TASKS_FILE."""
TASKS_FILE = "tasks.json"
"""The tasks a multi-task model serves, in its `multitask` artifact."""
LINEAGE_FILE = "lineage.json"
"""Everything about a registration that does not fit in tags, logged with its run."""

# ---- aliases of a registered model -----------------------------------------------------------
CHAMPION = "champion"
"""The version that serves: the promotion gate's choice (or a manual promotion)."""
CHALLENGER = "challenger"
"""The newest other version, for comparison."""

# ---- tags of a training run, a registration run, a version, a registered model -------------
TAG_TASK = "task"
"""The task (training run, registration run, version, registered model)."""
TAG_FINETUNE = "finetune"
"""Training run: 'lora', 'qlora' or 'full'."""
TAG_MODE = "mode"
"""Registration run and version: how the adapter was trained ('lora' or 'qlora')."""
TAG_LORA_R = "lora.r"
"""LoRA rank (training run, registration lineage)."""
TAG_LORA_ALPHA = "lora.alpha"
"""LoRA alpha (registration lineage)."""
TAG_LORA_TARGETS = "lora.targets"
"""Comma-separated target modules (registration lineage)."""
TAG_LORA_RSLORA = "lora.rslora"
"""Whether rsLoRA scaling was used (registration lineage)."""
TAG_LORA_DORA = "lora.dora"
"""Whether the adapter is DoRA (weight-decomposed, `use_dora`) (registration lineage)."""
TAG_SWEEP = "lora.sweep"
"""A rank sweep's parent run: what was swept ('rank')."""
TAG_DATA_FINGERPRINT = "data_fingerprint"
"""Fingerprint of the prepared data the adapter was trained on (a version shows 12 characters)."""
TAG_BASE_FINGERPRINT = "base_fingerprint"
"""Fingerprint of the base weights (training run, lineage, a logged base's run)."""
TAG_BASE_SOURCE = "source"
"""A logged base's run: the folder or Hub name it was logged from."""
TAG_BASE_MODEL = "base_model"
"""The base model's folder or Hub name (registration lineage)."""
TAG_GIT_COMMIT = "git_commit"
"""The code's commit (`-dirty` with local changes); left out outside a git checkout."""
TAG_TRACKING_URI = "tracking_uri"
"""Training run: the store it was logged to (the registry compares it with its own)."""
EARLY_STOPPING_PREFIX = "early_stopping."
"""Training run with early stopping: prefix of the tags saying where the export came from
(early_stopping.best_step, .best_epoch, .best_value, .monitor, .stopped_early, ...)."""
TAG_ADAPTER_SHA256 = "adapter_sha256"
"""Checksum of the adapter weights: part of a registration's identity."""
TAG_ADAPTER_BYTES = "adapter_bytes"
"""Size of the adapter weights (registration lineage)."""
TAG_ADAPTER_DIR = "adapter_dir"
"""Registration run: the adapter folder it registered."""
TAG_TRAINING_RUN_ID = "training_run_id"
"""The training run of a registration ('none' without one): part of its identity."""
TAG_TRAINING_RUN_STORE = "training_run_store"
"""A version whose training run lives in another tracking store: that store."""
TAG_REGISTERED_MODEL = "registered_model"
"""Registration run and version: the registered model (part of the identity)."""
TAG_REGISTERED_VERSION = "registered_version"
"""Training run and registration run: `<model>/<version>` they became."""
TAG_TASKS = "tasks"
"""A multi-task model's version: the tasks it serves."""
TAG_EVAL_CANDIDATE = "eval.candidate"
"""The report's model name of the registered adapter."""
TAG_EVAL_BASELINE = "eval.baseline"
"""The report's baseline model name ('none' without one): the gate compares with it."""
TAG_EVAL_SPLIT = "eval.split"
"""The evaluated split."""
TAG_EVAL_N = "eval.n"
"""How many examples were evaluated."""
TAG_EVAL_DATA_FINGERPRINT = "eval_data_fingerprint"
"""Fingerprint of the test data ('unknown' without a report): the gate compares only like with like."""
TAG_EVAL_PROTOCOL = "eval.protocol"
"""The evaluation protocol's name (`best-reference`, `one-reference-per-row`, ...): registration run and
version."""
TAG_EVAL_PROTOCOL_ID = "eval.protocol_id"
"""Hash of the protocol's settings (references rule, stemmer, tokens, decoding): the gate compares only
scores with the same one."""
EVAL_PROTOCOL_PARAM = "eval.protocol."
"""Start of the registration run's params holding each protocol setting (`eval.protocol.references`)."""
TAG_MANUAL_HISTORY = "manual.history"
"""Manual promotions and demotions of a version: a JSON list of {action, reason, by, at}."""
TAG_MANUAL_LAST = "manual.last"
"""The last manual action: `<action>: <reason>`, e.g. 'demoted from champion: regression'."""
PROMOTED_TO = "promoted to"
"""A manual action's start: `promoted to <alias>`."""
DEMOTED_FROM = "demoted from"
"""A manual action's start: `demoted from <alias>` (the gate never gives that alias back)."""

TAG_GATE_DECISION = "gate.decision"
"""'promoted', 'not_promoted', or 'pending' while a registration is unfinished."""
TAG_GATE_ALIAS = "gate.alias"
"""The alias the gate gave the version."""
TAG_GATE_REASON = "gate.reason"
"""One sentence with the numbers that decided."""
TAG_GATE_METRIC = "gate.metric"
"""The compared ROUGE type."""
TAG_GATE_CANDIDATE = "gate.candidate"
"""The version's figure of the compared metric."""
TAG_GATE_BASE = "gate.base"
"""The base model's figure."""
TAG_GATE_CHAMPION = "gate.champion"
"""The champion's figure it was compared with."""
TAG_GATE_CHAMPION_VERSION = "gate.champion_version"
"""The champion it was compared with."""
TAG_GATE_CHAMPION_COMPARABLE = "gate.champion_comparable"
"""Whether that champion was scored on the same test data."""
TAG_GATE_JSON = "gate.json"
"""The whole decision as JSON."""
GATE_TAGS = (TAG_GATE_DECISION, TAG_GATE_REASON)
TAG_TASK_MISMATCH = "task_mismatch"
"""A version registered under another task's model by explicit permission: what differed."""
"""The gate's tags a version shows (the full decision is in its run's lineage.json)."""

ROUGE_PREFIX = "rouge."
"""Start of every ROUGE tag and registration metric (see `rouge_key`)."""
METRIC_PREFIX = "metric."
"""Start of the tags and registration metrics of every other metric (see `metric_key`)."""
VERSION_TAGS = (TAG_TASK, TAG_MODE, TAG_EVAL_BASELINE, TAG_EVAL_DATA_FINGERPRINT, TAG_EVAL_PROTOCOL,
                TAG_EVAL_PROTOCOL_ID, TAG_TRAINING_RUN_ID, TAG_ADAPTER_SHA256)
"""Tags a version shows unchanged (beside metric figures, data fingerprint, training store, gate)."""
UNKNOWN = "unknown"
"""A tag value that was not recorded."""
NONE = "none"
"""A tag value for 'there is none' (no training run, no baseline)."""


# ---- builders ------------------------------------------------------------------------------
def rouge_key(rouge_type: str, model: str | None = None) -> str:
    """`rouge.<type>` (the registered adapter's mean) or `rouge.<model>.<type>` (a model of its report):
    a version tag and the registration run's metric of the same name."""
    return f"{ROUGE_PREFIX}{model}.{rouge_type}" if model else f"{ROUGE_PREFIX}{rouge_type}"


def metric_key(metric: str, model: str | None = None) -> str:
    """The tag / registration metric of any metric: `rouge_key` for ROUGE types (the names versions always
    had), `metric.[<model>.]<name>` for the others (`metric.chrf`, `metric.base.loss`)."""
    if metric.startswith("rouge"):
        return rouge_key(metric, model)
    return f"{METRIC_PREFIX}{model}.{metric}" if model else f"{METRIC_PREFIX}{metric}"


def rouge_ci_key(rouge_type: str) -> str:
    """`rouge.<type>.ci95` (`metric.<name>.ci95` for other metrics): the registered adapter's 95% interval,
    `[low, high]`."""
    return f"{metric_key(rouge_type)}.ci95"


def rouge_change_key(rouge_type: str, baseline: str, model: str | None = None) -> str:
    """`rouge[.<model>].<type>.vs_<baseline>_points`: the change against the baseline in ROUGE points
    (`metric.` keys for other metrics, in their display units)."""
    return f"{metric_key(rouge_type, model)}.vs_{baseline}_points"


def eval_file(model_name: str) -> str:
    """`<model_name>.eval.json`: the file one model's evaluation is written to."""
    return f"{model_name}{EVAL_FILE_SUFFIX}"


def _rounded(value: str) -> str:
    try:
        return f"{float(value):.4f}"
    except ValueError:
        return value


def training_run_tags(task: str | None, finetune: str, r: int | None, data_fingerprint: str | None,
                      base_fingerprint: str | None, git_commit: str | None,
                      tracking_uri: str | None) -> dict[str, str]:
    """The tags of a training run; unknown values are left out, never written as 'None'."""
    tags = {TAG_TASK: task, TAG_FINETUNE: finetune, TAG_LORA_R: None if finetune == "full" else r,
            TAG_DATA_FINGERPRINT: data_fingerprint, TAG_BASE_FINGERPRINT: base_fingerprint,
            TAG_GIT_COMMIT: git_commit, TAG_TRACKING_URI: tracking_uri}
    return {k: str(v) for k, v in tags.items() if v is not None}


def early_stopping_tags(record: Mapping[str, object]) -> dict[str, str]:
    """The early-stopping tags of a training run from its record (metrics.json `early_stopping`)."""
    return {f"{EARLY_STOPPING_PREFIX}{k}": str(v) for k, v in record.items() if v is not None}


def registration_identity(adapter_sha256: str, training_run_id: str | None,
                          model_name: str) -> dict[str, str]:
    """What makes two registration attempts the same registration, as tags of its run and version."""
    return {TAG_ADAPTER_SHA256: adapter_sha256, TAG_TRAINING_RUN_ID: training_run_id or NONE,
            TAG_REGISTERED_MODEL: model_name}


def version_tags(full: Mapping[str, str], rouge_types: Iterable[str], metric: str,
                 training_store: str | None = None) -> dict[str, str]:
    """The dozen tags a version shows, picked from a registration's full tag set `full`: VERSION_TAGS,
    the adapter's figures of `rouge_types` (any metric names) and the baseline's `metric` (4 decimals),
    the training data's fingerprint (12 characters), the training run, and `training_store` when it
    is another store."""
    tags = {k: full[k] for k in VERSION_TAGS if k in full}
    for rouge_type in rouge_types:
        tags[metric_key(rouge_type)] = _rounded(full[metric_key(rouge_type)])
    baseline = full.get(TAG_EVAL_BASELINE)
    if baseline and metric_key(metric, baseline) in full:  # what the gate compares with
        tags[metric_key(metric, baseline)] = _rounded(full[metric_key(metric, baseline)])
    tags[TAG_DATA_FINGERPRINT] = full.get(TAG_DATA_FINGERPRINT, UNKNOWN)[:12]
    tags[TAG_TRAINING_RUN_ID] = full.get(TAG_TRAINING_RUN_ID, NONE)
    if training_store:
        tags[TAG_TRAINING_RUN_STORE] = training_store
    return tags


def manual_action(verb: str, alias: str) -> str:
    """`promoted to <alias>` or `demoted from <alias>` (verb: PROMOTED_TO or DEMOTED_FROM)."""
    return f"{verb} {alias}"


def _stamp(when: datetime | None) -> str:
    return (when or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def run_name(task: str | None, method: str, r: int | None = None, when: datetime | None = None,
             run_id: str | None = None) -> str:
    """`<task>-<method>[-r<r>]-<UTC time>[-<run_id[:6]>]`, e.g. `summary-lora-r8-20261130T231502Z-3fa2c1`.

    MLflow's own generated names come from `random`, which `seed_everything` seeds: every seeded
    run would get the same name, hence a name of our own. Full fine-tuning has no rank; the run id's
    start keeps two runs started in the same second (a sweep) apart.
    """
    parts = [task or "untitled", method] + ([f"r{r}"] if r is not None and method != "full" else [])
    return "-".join([*parts, _stamp(when)] + ([run_id[:6]] if run_id else []))


def registration_run_name(task: str, when: datetime | None = None) -> str:
    """`register-<task>-<UTC time>`: a registration run's name until its version exists."""
    return f"register-{task}-{_stamp(when)}"


def registered_run_name(model_name: str, version: str) -> str:
    """`register-<model>-v<version>`: a registration run's name once its version exists."""
    return f"register-{model_name}-v{version}"


def registered_version(model_name: str, version: str) -> str:
    """`<model>/<version>`: the value of TAG_REGISTERED_VERSION."""
    return f"{model_name}/{version}"


def run_link(experiment_id: str, run_id: str) -> str:
    """The MLflow UI route of a run, relative to the UI page."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def version_link(model_name: str, version: str) -> str:
    """The MLflow UI route of a registered model version, relative to the UI page."""
    return f"#/models/{model_name}/versions/{version}"
