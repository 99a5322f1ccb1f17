"""``paretoq sweep``: QAT at several bit widths from one FP model, then the Pareto table and plot.

For each point (bits × group size) the same ``paretoq train`` flags — the same model, data, seed
and token budget — train a model into ``<output_dir>/w<bits>[-g<group>]``; its packed copy
(``packed/``, :func:`paretoq.save_packed`) is measured (bytes from the safetensors headers, as
``paretoq info`` counts them) and evaluated. Two baselines are evaluated the same way: the FP
model (``fp/``) and round-to-nearest (``quantize_model`` with the reference scale init, no
training, packed the same way: ``w<bits>/rtn_result.json``).

``--budgets 2.25,2.5,3`` adds allocated mixed-precision points (``<output_dir>/mix<budget>``): the
per-layer sensitivities are measured once on the training text (``alloc/sensitivity.json``,
:mod:`paretoq.allocate`), each budget's allocation is written to ``alloc/mix<budget>.yaml`` and
trained with ``--quant_config`` like any other point, then packed (1.58-bit layers as base-3, as
the allocator counts them) and evaluated; RTN rows of the same mixes come with them. They are
marked ``allocated`` in the table and drawn as their own series in ``pareto.png``.

Evaluation is identical for every row: perplexity on ``--eval_data_local_path`` in windows of
``--model_max_length`` tokens (:mod:`paretoq.eval.perplexity`, the blocks training evaluates),
computed in fp32 on the weights as stored — packed codes with fp16 scales and bf16 for the
unquantized tensors; bf16 weights for the FP model, whose size is counted as bf16 — and the
lm-eval tasks when ``--tasks`` is given.

Resumable: each finished row is a JSON file in its folder (written atomically, with the training
settings); a rerun reuses the rows whose settings match, retrains nothing that finished, and
continues an interrupted training from its last checkpoint. Outputs, each written atomically:
``sweep.json`` (everything), ``sweep.csv``, ``sweep.md`` and ``pareto.png``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import shlex
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Any
from pathlib import Path

import torch

from paretoq.allocate import DEFAULT_CANDIDATES
from paretoq.errors import ArgumentParser, UserError
from paretoq.files import atomic_folder
from paretoq.eval.pareto import pareto_front, plot_pareto, to_csv, to_markdown
from paretoq.eval.report import write_atomic, write_json

logger = logging.getLogger(__name__)

DEFAULT_BITS = "4,3,2,1.58,1"
RESULT_NAME = "sweep_result.json"
RTN_RESULT_NAME = "rtn_result.json"
# Settings that do not change a trained model; every other training setting must match for a
# finished row to be reused.
_NOT_SETTINGS = {"output_dir", "logging_dir", "run_name", "cache_dir", "resume", "resume_from_checkpoint",
                 "overwrite_output_dir", "disable_tqdm", "config", "report_to", "use_cpu", "local_rank", "project",
                 "skip_memory_metrics", "debug", "per_device_eval_batch_size", "eval_strategy", "eval_steps",
                 "eval_delay", "eval_on_start", "include_for_metrics", "prediction_loss_only"}
_NOT_SETTINGS_PREFIXES = ("push_to_hub", "hub_", "logging_", "log_", "trackio", "ddp_", "dataloader_", "do_",
                          "save_")


@dataclass
class SweepSettings:
    bits: list[float]
    group_sizes: list[int | None]
    budgets: list[float] = field(default_factory=list)  # bits/weight of the allocated mixed points
    candidates: str = DEFAULT_CANDIDATES  # what each layer may take in them (paretoq allocate --candidates)
    tasks: list[str] | None = None
    limit: float | None = None
    include_path: list[str] | None = None
    baselines: tuple[str, ...] = ("fp", "rtn")
    progress: bool = True
    base: Any = None  # the TrainConfig of the user's train flags; each point derives its own from it


@dataclass(frozen=True)
class Point:
    bits: float  # for an allocated point: its budget in bits per weight
    group: int | None
    budget: bool = False  # an allocated mixed-precision point (paretoq allocate at ``bits`` bits/weight)

    @property
    def name(self) -> str:
        if self.budget:
            return f"mix{self.bits:g}"
        return f"w{self.bits:g}" + ("" if self.group is None else f"-g{self.group}")


# --- arguments ---------------------------------------------------------------------------------


def sweep_parser() -> ArgumentParser:
    p = ArgumentParser(prog="paretoq sweep", allow_abbrev=False, add_help=False,
                       description="QAT at several bit widths from the same FP model with the same data and budget; "
                       "writes sweep.md / sweep.csv / sweep.json and pareto.png to --output_dir. Every "
                       "`paretoq train` flag is accepted (the budget: --max_steps, batch size, LR, ...) and "
                       "applied to each bit width.")
    p.add_argument("--bits", default=DEFAULT_BITS, help=f"bit widths, comma-separated (default {DEFAULT_BITS})")
    p.add_argument("--group_sizes", default="none",
                   help="scale group sizes, comma-separated; none = one scale per row (default none)")
    p.add_argument("--budgets", help="also allocated mixed-precision points at these bits/weight, comma-separated "
                   "(e.g. 2.25,2.5,3): paretoq allocate on the training text, then QAT with --quant_config")
    p.add_argument("--candidates", default=DEFAULT_CANDIDATES, help="per-layer choices of the allocated points "
                   f"(paretoq allocate --candidates; default {DEFAULT_CANDIDATES})")
    p.add_argument("--tasks", help="lm-eval tasks to run on every model, comma-separated (e.g. kjv_cloze)")
    p.add_argument("--limit", type=float, help="lm-eval: examples per task")
    p.add_argument("--include_path", action="append", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--baselines", default="fp,rtn", help="fp, rtn, both (default) or none")
    p.add_argument("--no_progress", action="store_true", help="no evaluation progress bars")
    return p


def _parse_list(value: str, flag: str, convert) -> list:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UserError(f"{flag} is empty")
    out = []
    for v in items:
        x = convert(v)
        if x in out:
            raise UserError(f"{flag}: {v} is given twice")
        out.append(x)
    return out


def _bits(v: str) -> float:
    from paretoq.quant.config import parse_bits

    bits = parse_bits(v)
    if bits == 16:
        raise UserError("--bits: 16 is the FP model, which the sweep evaluates as a baseline; give 1, 1.58, 2, 3, 4")
    return bits


def _budget(v: str) -> float:
    try:
        b = float(v)
    except ValueError:
        raise UserError(f"--budgets: {v!r} is not a number of bits per weight") from None
    if not 1 <= b <= 16:
        raise UserError(f"--budgets: {v} bits per weight is outside 1..16")
    return b


def _group(v: str) -> int | None:
    if v.lower() in ("none", "row", "per_row", "0"):
        return None
    try:
        g = int(v)
    except ValueError:
        raise UserError(f"--group_sizes: {v!r} is not a number or 'none'") from None
    if g < 1:
        raise UserError(f"--group_sizes: {g} must be a positive number of input columns (or none)")
    return g


def parse_sweep_args(argv: list[str]) -> SweepSettings:
    """Split the sweep's own flags from the ``train`` flags (validated once here)."""
    from paretoq.training.args import parse_train_args

    own, rest = sweep_parser().parse_known_args(argv)
    for flag in ("--w_bits", "--group_size", "--output_model_filename", "--quant_config"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            hint = {"--w_bits": "use --bits 4,3,2", "--group_size": "use --group_sizes none,64",
                    "--output_model_filename": "each model goes to <output_dir>/w<bits>",
                    "--quant_config": "use --budgets 2.5,3 for allocated mixed-precision points"}[flag]
            raise UserError(f"{flag} is not a sweep flag: {hint}")
    baselines = tuple(b for b in _parse_list(own.baselines, "--baselines", str.lower) if b != "none")
    bad = [b for b in baselines if b not in ("fp", "rtn")]
    if bad:
        raise UserError(f"--baselines: unknown baseline {bad[0]!r} (choose from fp, rtn, none)")
    settings = SweepSettings(bits=_parse_list(own.bits, "--bits", _bits),
                             group_sizes=_parse_list(own.group_sizes, "--group_sizes", _group),
                             limit=own.limit, include_path=own.include_path, baselines=baselines,
                             progress=not own.no_progress)
    if own.budgets:
        settings.budgets = _parse_list(own.budgets, "--budgets", _budget)
        from paretoq.allocate import parse_candidates

        parse_candidates(own.candidates)
        settings.candidates = own.candidates
    if own.tasks is not None:
        from paretoq.eval.harness import check_tasks, parse_task_list

        settings.tasks = parse_task_list(own.tasks)
        check_tasks(settings.tasks, settings.include_path)
    # every train flag checked once, before any work; each point sets its own bit width
    settings.base = base = parse_train_args(rest, defaults={"w_bits": "16"})
    if not base.data.eval_data_local_path:
        raise UserError("paretoq sweep needs --eval_data_local_path: every model is evaluated on that file")
    if not Path(base.data.eval_data_local_path).exists():
        raise UserError(f"--eval_data_local_path {base.data.eval_data_local_path}: no such file or folder")
    if base.model.output_model_filename:
        raise UserError("--output_model_filename is not a sweep flag: each model goes to <output_dir>/w<bits>")
    return settings


def point_config(settings: SweepSettings, point: Point, out_dir: Path):
    """The ``train`` config of one point: the user's flags (``settings.base``), this point's bits,
    group and folder; building it validates the group size against the bit width."""
    base = settings.base
    logging_dir = base.run.logging_dir and os.path.join(base.run.logging_dir, point.name)
    if point.budget:
        model = replace(base.model, w_bits=None, group_size=None, quant_config=str(alloc_path(out_dir, point)))
    else:
        model = replace(base.model, w_bits=str(point.bits), group_size=point.group)
    return replace(base, model=model,
                   data=replace(base.data, cache_dir=base.data.cache_dir or str(out_dir / ".cache")),
                   run=replace(base.run, logging_dir=logging_dir),
                   training=replace(base.training, output_dir=str(out_dir / point.name)))


def training_settings(cfg) -> dict:
    """The settings that decide a trained model (what a finished row must match to be reused)."""
    out_dir = str(cfg.training.output_dir)
    out = {}
    for k, v in cfg.to_dict().items():
        if k in _NOT_SETTINGS or k.startswith(_NOT_SETTINGS_PREFIXES) or (isinstance(v, str) and out_dir in v):
            continue
        out[k] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
    return out


# --- measuring one model -----------------------------------------------------------------------


def _bytes_row(packed_dir: Path) -> dict:
    from paretoq.loading import folder_info

    info = folder_info(packed_dir)
    disk = info["disk_bytes"]
    return {"bytes_total": disk["tensors_total"], "bytes_quantized_weights": disk["quantized_weights"],
            "bytes_scales": disk["scales"], "bytes_other": disk["other"], "bytes_file": disk["files_total"],
            "parameters": info["parameters"], "quantized_parameters": info["quantized_parameters"],
            "bits_per_weight": info["bits_per_quantized_weight"],
            "bits_per_param": 8 * disk["tensors_total"] / info["parameters"]}


def _evaluate(model, tokenizer, settings: SweepSettings, cfg) -> dict:
    from paretoq.eval.perplexity import perplexity_of_file

    context = cfg.data.model_max_length
    res = perplexity_of_file(model, tokenizer, cfg.data.eval_data_local_path, context, context,
                             batch_size=cfg.training.per_device_eval_batch_size, progress=settings.progress)
    out = {"perplexity": res.perplexity, "eval_loss": res.loss, "eval_tokens": res.scored_tokens,
           "eval_seconds": res.seconds, "tasks": {}}
    if settings.tasks:
        from paretoq.eval.harness import run_tasks

        lm = run_tasks(model, tokenizer, settings.tasks, include_path=settings.include_path,
                       batch_size=cfg.training.per_device_eval_batch_size, limit=settings.limit,
                       seed=cfg.training.seed)
        out["tasks"] = lm.get("tasks", {})
        out["lm_eval_samples"] = lm.get("n_samples", {})
    return out


def _evaluate_packed(packed_dir: Path, settings: SweepSettings, cfg) -> dict:
    from paretoq.loading import load_model, load_tokenizer

    model = load_model(packed_dir, dtype=torch.float32)
    try:
        return _evaluate(model, load_tokenizer(packed_dir), settings, cfg)
    finally:
        del model
        gc.collect()


def _read_row(path: Path, settings_now: dict) -> dict | None:
    """A finished row, if its file exists and was made with the same training settings."""
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        logger.warning("%s is unreadable: recomputing it", path)
        return None
    saved = row.get("settings", {})
    diff = sorted(k for k in set(saved) | set(settings_now) if saved.get(k) != settings_now.get(k))
    if diff:
        k = diff[0]
        raise UserError(f"{path} was made with other settings ({k}: {saved.get(k)!r}, now {settings_now.get(k)!r}); "
                        f"use another --output_dir, the same flags, or delete {path.parent}")
    return row


def fp_row(settings: SweepSettings, cfg, out_dir: Path) -> dict:
    """The FP model: bf16 weights (its size counted as bf16), evaluated like every other row."""
    from paretoq.loading import load_model, load_tokenizer
    from paretoq.quant.config import QuantConfig
    from paretoq.quant.swap import selected_linears

    path = out_dir / "fp" / RESULT_NAME
    now = {k: v for k, v in training_settings(cfg).items()
           if k in ("input_model_filename", "eval_data_local_path", "model_max_length")}
    row = _read_row(path, now)
    if row is not None:
        logger.info("sweep: FP baseline already evaluated (%s)", path)
        return row
    logger.info("sweep: evaluating the FP model %s", cfg.model.input_model_filename)
    src = cfg.model.input_model_filename
    model = load_model(src, dtype=torch.bfloat16, trust_remote_code=cfg.model.trust_remote_code).float()
    unique = {id(p): p for p in model.parameters()}.values()
    params = sum(p.numel() for p in unique)
    quantizable = sum(lin.weight.numel() for _, lin in selected_linears(model, QuantConfig(w_bits=4)))
    row = {"method": "fp", "name": "fp", "bits": 16, "group": None,
           "bytes_total": 2 * params, "bytes_quantized_weights": 2 * quantizable, "bytes_scales": 0,
           "bytes_other": 2 * (params - quantizable), "bytes_file": None, "parameters": params,
           "quantized_parameters": 0, "bits_per_weight": 16.0, "bits_per_param": 16.0,
           **_evaluate(model, load_tokenizer(src, cfg.model.trust_remote_code), settings, cfg),
           "train_seconds": None, "model_dir": str(src), "settings": now}
    del model
    gc.collect()
    write_json(path, row)
    return row


def rtn_row(settings: SweepSettings, point: Point, cfg, out_dir: Path) -> dict:
    """Round-to-nearest: the reference scale init, no training, packed and evaluated like QAT."""
    from paretoq.export.packed import save_packed
    from paretoq.loading import load_model
    from paretoq.quant.config import QuantConfig
    from paretoq.quant.swap import quantize_model

    path = out_dir / point.name / RTN_RESULT_NAME
    now = {k: v for k, v in training_settings(cfg).items()
           if k in ("input_model_filename", "eval_data_local_path", "model_max_length", "w_bits", "group_size")}
    if point.budget:
        now["quant_config_sha256"] = _sha256(alloc_path(out_dir, point))
    row = _read_row(path, now)
    if row is not None:
        logger.info("sweep: %s round-to-nearest already evaluated", point.name)
        return row
    logger.info("sweep: %s round-to-nearest baseline", point.name)
    model = load_model(cfg.model.input_model_filename, dtype=torch.float32,
                       trust_remote_code=cfg.model.trust_remote_code)
    if point.budget:  # the allocated mix, round-to-nearest like the uniform rows (reference scale init)
        quantize_model(model, replace(cfg.quant, scale_init="reference"))
    else:
        quantize_model(model, QuantConfig(w_bits=point.bits, group_size=point.group))
    packed_dir = out_dir / point.name / "rtn-packed"
    if packed_dir.exists():
        shutil.rmtree(packed_dir)
    save_packed(model, packed_dir, tokenizer=_tokenizer(cfg), ternary_format=_ternary(point))
    del model
    gc.collect()
    row = {"method": "rtn", "name": f"{point.name}-rtn", "bits": point.bits, "group": point.group,
           "allocated": point.budget,
           **_bytes_row(packed_dir), **_evaluate_packed(packed_dir, settings, cfg),
           "train_seconds": None, "model_dir": None, "settings": now}
    shutil.rmtree(packed_dir)  # the baseline's numbers are what matters; its model is one command away
    write_json(path, row)
    return row


def _tokenizer(cfg):
    from paretoq.loading import load_tokenizer

    return load_tokenizer(cfg.model.input_model_filename, cfg.model.trust_remote_code)


def _finished_training(cfg) -> dict | None:
    """Metrics of a training that finished (final model and all_results.json written), else None."""
    out = Path(cfg.training.output_dir)
    results = out / "all_results.json"
    if not (results.is_file() and (out / "model.safetensors").is_file() and (out / "paretoq_config.yaml").is_file()):
        return None
    try:
        metrics = json.loads(results.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return metrics if "train_wall_seconds" in metrics else None


def _global_step(folder: Path) -> int | None:
    try:
        return json.loads((folder / "trainer_state.json").read_text()).get("global_step")
    except (OSError, json.JSONDecodeError):
        return None


def qat_row(settings: SweepSettings, point: Point, cfg, out_dir: Path) -> dict:
    """Train (or reuse a finished training), pack, measure and evaluate one point."""
    from paretoq.export.packed import save_packed
    from paretoq.loading import load_model
    from paretoq.training.run import run_training

    point_dir = out_dir / point.name
    path = point_dir / RESULT_NAME
    now = training_settings(cfg)
    if point.budget:
        now["quant_config_sha256"] = _sha256(alloc_path(out_dir, point))
    row = _read_row(path, now)
    if row is not None:
        logger.info("sweep: %s already finished (%s)", point.name, path)
        return row
    metrics = _finished_training(cfg)
    if metrics is None:
        logger.info("sweep: %s: training", point.name)
        metrics = run_training(cfg)
        gc.collect()
    else:
        logger.info("sweep: %s: training already finished, packing and evaluating", point.name)
    packed_dir = point_dir / "packed"
    model = load_model(cfg.final_model_dir, dtype=torch.float32)
    with atomic_folder(packed_dir) as tmp_dir:
        save_packed(model, tmp_dir, tokenizer=_tokenizer(cfg), ternary_format=_ternary(point))
        del model
        gc.collect()
    row = {"method": "qat", "name": point.name, "bits": point.bits, "group": point.group, "allocated": point.budget,
           **_bytes_row(packed_dir), **_evaluate_packed(packed_dir, settings, cfg),
           "train_seconds": metrics.get("train_wall_seconds"), "train_steps": _global_step(point_dir),
           "train_loss": metrics.get("train_loss"), "train_eval_perplexity": metrics.get("perplexity"),
           "model_dir": str(packed_dir), "settings": now}
    write_json(path, row)
    return row


# --- allocated (mixed-precision) points ----------------------------------------------------------

ALLOC_DIR = "alloc"


def alloc_path(out_dir: Path, point: Point) -> Path:
    return out_dir / ALLOC_DIR / f"{point.name}.yaml"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ternary(point: Point) -> str:
    """Allocated points count 1.58-bit layers as base-3 codes (paretoq allocate's cost): pack them so."""
    return "base3" if point.budget else "2bit"


def write_allocations(settings: SweepSettings, out_dir: Path) -> list[Point]:
    """Measure the sensitivities once (``alloc/sensitivity.json``, reused while the model, text,
    candidates and scale init are the same) and write ``alloc/mix<budget>.yaml`` for every budget."""
    from paretoq.allocate import (Sensitivity, allocate, allocation_config, budget_bytes, calibration_ids,
                                  header_text, parse_candidates, sensitivity_of_folder)
    from paretoq.files import atomic_write
    from paretoq.quant.config import quant_config_yaml

    base = settings.base
    candidates = parse_candidates(settings.candidates)
    init = base.model.scale_init
    samples = base.model.calibration_samples or 16
    key = {"model": str(base.model.input_model_filename), "data": str(base.data.train_data_local_path),
           "candidates": settings.candidates, "scale_init": init, "samples": samples,
           "block": base.data.model_max_length, "seed": base.training.seed}
    folder = out_dir / ALLOC_DIR
    cached = folder / "sensitivity.json"
    sens = None
    if cached.is_file():
        try:
            d = json.loads(cached.read_text())
            if d.get("meta", {}).get("key") == key:
                sens = Sensitivity.from_dict(d)
        except (OSError, ValueError, KeyError, TypeError):
            sens = None
    if sens is None:
        logger.info("sweep: measuring per-layer sensitivities for the allocated points (%s)", settings.candidates)
        calib = calibration_ids(base.model.input_model_filename, base.data.train_data_local_path, samples,
                                base.data.model_max_length, base.training.seed,
                                base.data.cache_dir or str(out_dir / ".cache"))
        sens = sensitivity_of_folder(base.model.input_model_filename, calib, candidates, init)
        sens.meta["key"] = key
        atomic_write(cached, json.dumps(sens.to_dict()))
    points = []
    for b in settings.budgets:
        point = Point(b, None, budget=True)
        alloc = allocate(sens, budget_bytes(sens, b))
        config = allocation_config(sens, alloc, init)
        text = quant_config_yaml(config, header_text(sens, alloc, f"paretoq sweep --budgets: {b:g} bits/weight"))
        path = alloc_path(out_dir, point)
        if not path.is_file() or path.read_text() != text:
            atomic_write(path, text)
        points.append(point)
    return points


# --- the sweep ---------------------------------------------------------------------------------


def _machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}"


def write_outputs(rows: list[dict], out_dir: Path, meta: dict) -> dict[str, Path]:
    front = set(pareto_front(rows))
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    table_rows = [{k: v for k, v in r.items() if k != "settings"} for r in rows]
    s = meta["settings"]
    title = (f"{Path(s['input_model_filename']).name}: {s.get('max_steps')} QAT steps per bit width, "
             f"perplexity on {Path(s['eval_data_local_path']).name}")
    return {
        "json": write_json(out_dir / "sweep.json", {**meta, "rows": table_rows}),
        "csv": write_atomic(out_dir / "sweep.csv", to_csv(table_rows)),
        "md": write_atomic(out_dir / "sweep.md", to_markdown(table_rows, meta)),
        "png": write_atomic(out_dir / "pareto.png", plot_pareto(table_rows, title)),
    }


def run_sweep(settings: SweepSettings, command: str = "paretoq sweep") -> tuple[list[dict], dict[str, Path]]:
    """Every point, the baselines, then the four output files; returns (rows, files)."""
    from paretoq.training.run import prepare_output_dir

    points = [Point(b, g) for g in settings.group_sizes for b in settings.bits]
    out_dir = Path(settings.base.training.output_dir)
    prepare_output_dir(str(out_dir))
    if settings.budgets:
        points += write_allocations(settings, out_dir)
    cfgs = {p: point_config(settings, p, out_dir) for p in points}  # every group size checked before work
    rows = []
    if "fp" in settings.baselines:
        rows.append(fp_row(settings, cfgs[points[0]], out_dir))
    for i, p in enumerate(points, start=1):
        logger.info("sweep: [%d/%d] %s", i, len(points), p.name)
        if "rtn" in settings.baselines:
            rows.append(rtn_row(settings, p, cfgs[p], out_dir))
        rows.append(qat_row(settings, p, cfgs[p], out_dir))
    cfg0 = cfgs[points[0]].training
    tokens_per_step = (cfg0.per_device_train_batch_size * cfg0.gradient_accumulation_steps
                       * max(1, cfg0.world_size) * cfgs[points[0]].data.model_max_length)
    s = training_settings(cfgs[points[0]])
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": _machine(),
            "torch": torch.__version__, "bits": settings.bits, "group_sizes": settings.group_sizes,
            "budgets": settings.budgets, "candidates": settings.candidates if settings.budgets else None,
            "tasks": settings.tasks, "lm_eval_limit": settings.limit, "tokens_per_step": tokens_per_step,
            "settings": {k: v for k, v in s.items() if k not in ("w_bits", "group_size", "quant_config")}}
    files = write_outputs(rows, out_dir, meta)
    return rows, files


def sweep_command(argv: list[str]) -> str:
    return "paretoq sweep " + shlex.join(argv)
