"""Zero-shot benchmark (issue 3): SmolLM2-135M dense and carved, seven tasks through lm-evaluation-harness.

    .venv/bin/python -m bench.zeroshot [--configs S3A3E8,S2A2E8,S1A1E8] [--output bench/zeroshot_smollm2]

Protocol: paper preset, calibration 8 x 2048 WikiText-2 validation tokens, seed 0; PIQA, ARC-Easy,
ARC-Challenge, WinoGrande, BoolQ and LAMBADA (OpenAI) whole, HellaSwag's first 1,000 items; zero-shot,
batch 16. This is `cmoe sweep` with those settings: the report folder (report.md, results.json, plots)
is the output, and a stopped run goes on where it stopped when started again.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from cmoe.tools.sweep import SweepPlan, run_sweep
from cmoe.tools.zeroshot import TASKS

OUTPUT = Path(__file__).parent / "zeroshot_smollm2"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="S3A3E8,S2A2E8,S1A1E8")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit", type=int, help="items per task (quick runs)")
    parser.add_argument("--output", default=str(OUTPUT))
    parser.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    plan = SweepPlan(model="smollm2", configs=args.configs.split(","), ppl=[], tasks=args.tasks.split(","),
                     limit=args.limit, task_limits={"hellaswag": min(1000, args.limit or 1000)}, batch_size=args.batch_size,
                     device=args.device)
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    run_sweep(plan, args.output, overwrite=True)
    print((Path(args.output) / "report.md").read_text())


if __name__ == "__main__":
    main()
