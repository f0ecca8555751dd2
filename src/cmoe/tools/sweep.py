"""`cmoe sweep`: carve one model several ways (layouts, and budgets x presets), evaluate each with the FFN compute
counted as it runs, and write a report folder.

The work happens in `<REPORT_DIR>.partial/`: each finished model's scores land in its `runs/` at once, so a run that
is stopped can be started again with the same command and goes on from the next unfinished model. The
finished report replaces REPORT_DIR in one rename.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from cmoe.core.presets import CarveConfig, make_config
from cmoe.data import calibration_source_label
from cmoe.errors import CMoEError
from cmoe.hf.checks import check_seqlen
from cmoe.run_folder import drop_if_nothing_to_resume, partial_folder, publish, write_atomically
from cmoe.tools.provenance import machine
from cmoe.version import __version__


@dataclass
class SweepPlan:
    model: str
    configs: list[str] = field(default_factory=lambda: list(SweepPlan.DEFAULT_CONFIGS))  # layouts, e.g. S3A3E8
    preset: str = "paper"  # the preset that carves `configs`
    budgets: list[float] = field(default_factory=list)  # each carved with every one of `presets`
    presets: list[str] = field(default_factory=lambda: ["sparse"])
    ppl: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 2048
    max_windows: int | None = None
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    task_limits: dict[str, int] = field(default_factory=dict)
    batch_size: int = 8
    calib: str = "wikitext2"
    calib_samples: int = 8
    calib_seqlen: int = 2048
    seed: int = 0
    data_dir: str | None = None
    device: str | None = None  # where models are carved and evaluated (default cpu)

    DEFAULT_CONFIGS = ("S3A3E8", "S2A2E8", "S1A1E8", "S2A2E16")

    def runs(self) -> dict[str, CarveConfig]:
        """Each carved model's name (a layout, or preset@budget) and config; a bad name fails here."""
        runs = {name: CarveConfig.from_name(name, preset=self.preset, seed=self.seed) for name in self.configs}
        for budget in self.budgets:
            for preset in self.presets:
                runs[f"{preset}@{budget:g}"] = make_config(budget=budget, preset=preset, seed=self.seed)
        if not runs:
            raise CMoEError("Nothing to carve; give layouts with --configs or budgets with --budgets.")
        return runs

    def key(self) -> dict:
        """What must match for a stopped run to be resumed."""
        return {k: v for k, v in self.__dict__.items() if k not in ("data_dir", "device", "batch_size")}  # how, not what, is measured


def run_sweep(plan: SweepPlan, output: str | os.PathLike, overwrite: bool = False, progress: bool = True) -> dict:
    """Dense first, then each configuration: carve, evaluate, record. Returns the results (also results.json)."""
    from cmoe.hf.loading import load_model

    output = Path(output)
    from cmoe.run_folder import check_writable_destination

    configs = plan.runs()  # bad names and budgets fail before any work
    check_writable_destination(output, overwrite)
    dense, tokenizer = load_model(plan.model, device=plan.device)
    if tokenizer is None:
        raise CMoEError(f"{plan.model} has no tokenizer that cmoe can load, so it cannot be evaluated.")
    check_seqlen(dense, plan.seqlen, "--seqlen")
    check_seqlen(dense, plan.calib_seqlen, "--calib-seqlen")
    work = _work_folder(output, plan)
    names = ["dense"] + list(configs)
    runs = work / "runs"
    pending = [name for name in names if not (runs / f"{name}.json").exists()]
    if len(pending) < len(names):
        print(f"resuming: {len(names) - len(pending)} of {len(names)} models already done in {work}")
    calibration = None
    for name in pending:
        started = time.perf_counter()
        resumed = any(runs.glob(f"{name}.lmeval*"))  # answers cached by a stopped run make this one look faster
        if name == "dense":
            row = dict(config="dense", preset="-", active_fraction=1.0, ffn_compute=1.0)
            row.update(_evaluate(dense, tokenizer, plan, progress, cache=runs / "dense.lmeval"))
        else:
            calibration = calibration if calibration is not None else _calibration(tokenizer, plan)
            row, record = _carve_and_evaluate(dense, tokenizer, name, configs[name], calibration, plan, progress,
                                              runs / f"{name}.lmeval")
            (runs / f"{name}.record.json").write_text(json.dumps(record))
        row["seconds"] = round(time.perf_counter() - started, 1)
        row.update(device=machine(plan.device), resumed=resumed)
        write_atomically(runs / f"{name}.json", json.dumps(row, indent=2))
        for cache in runs.glob(f"{name}.lmeval*"):  # the harness's request cache, kept only until the row is written
            cache.unlink()
        print(f"{name}: done in {row['seconds']:.0f} s")

    rows = [json.loads((runs / f"{name}.json").read_text()) for name in names]
    results = dict(cmoe_version=__version__, plan=plan.key(), date=time.strftime("%Y-%m-%d"), rows=rows)
    from cmoe.tools.report import write_report

    write_report(work, results, records={n: runs / f"{n}.record.json" for n in configs})
    (work / "results.json").write_text(json.dumps(results, indent=2))
    publish(work, output)
    return results


def _work_folder(output: Path, plan: SweepPlan) -> Path:
    work = partial_folder(output)
    plan_file = work / "plan.json"
    drop_if_nothing_to_resume(work, any(work.glob("runs/*.json")))
    if work.exists():
        saved = json.loads(plan_file.read_text()) if plan_file.exists() else None
        if saved != json.loads(json.dumps(plan.key())):
            raise CMoEError(f"{work} holds a stopped sweep with different settings; delete it or rerun that sweep's command.")
        return work
    (work / "runs").mkdir(parents=True)
    plan_file.write_text(json.dumps(plan.key(), indent=2))
    return work


def _calibration(tokenizer, plan: SweepPlan):
    from cmoe.data import calibration_tokens

    return calibration_tokens(tokenizer, plan.calib, plan.calib_samples, plan.calib_seqlen, plan.seed, plan.data_dir)


def _carve_and_evaluate(dense, tokenizer, name: str, config: CarveConfig, calibration, plan: SweepPlan, progress: bool,
                        cache: Path):
    from cmoe.core.carve import carve_
    from cmoe.tools.report import ffn_parameters

    started = time.perf_counter()
    carved = carve_(copy.deepcopy(dense), config, calibration, progress=progress, device=plan.device,
                    calibration_source=calibration_source_label(plan.calib, plan.calib_samples, plan.calib_seqlen,
                                                                plan.seed))
    row = dict(config=name, preset=config.preset, budget=config.budget, layout=carved.carve_record["name"],
               carve_seconds=round(time.perf_counter() - started, 1))
    counts, dense_counts = ffn_parameters(carved), ffn_parameters(dense)
    row["active_fraction"] = round(counts["active"] / dense_counts["total"], 4)
    row.update(_evaluate(carved, tokenizer, plan, progress, cache))
    return row, carved.carve_record


def _evaluate(model, tokenizer, plan: SweepPlan, progress: bool, cache: Path) -> dict:
    from cmoe.tools.perplexity import perplexity_and_compute

    scores = {}
    if plan.ppl:
        ppl, compute = perplexity_and_compute(model, tokenizer, plan.ppl, plan.seqlen, plan.max_windows, plan.data_dir,
                                              progress)
        scores["perplexity"] = {name: values["ppl"] for name, values in ppl.items()}
        if compute is not None:
            scores["ffn_compute"] = compute["overall"]
    if plan.tasks:
        from cmoe.tools.zeroshot import evaluate_tasks

        # The request cache lets a stopped run pick up mid-task: the harness stores each answer as it is scored.
        scores["tasks"] = evaluate_tasks(model, tokenizer, plan.tasks, plan.limit, plan.batch_size, plan.data_dir,
                                         cache=cache, limits=plan.task_limits)
    return scores
