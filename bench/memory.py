"""Resident memory of loaded models, dense and carved: each folder loaded in a fresh process with
`AutoModelForCausalLM.from_pretrained` in float32, one forward of 64 tokens and a 4-token `generate`, then the growth
of the resident set (anonymous and file-backed pages, /proc/self/status; Linux).

    python -m bench.memory FOLDER [FOLDER ...] [--output bench/results/memory_resident_smollm2.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from cmoe.tools.provenance import git_commit, machine

MEASURE = """
import json, sys, torch, cmoe
from transformers import AutoModelForCausalLM
def resident():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("RssAnon", "RssFile")))
    return {key: int(value.split()[0]) / 1024 for key, value in fields.items()}
before = resident()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    model(torch.randint(0, 1000, (1, 64)))
    model.generate(torch.randint(0, 1000, (1, 8)), max_new_tokens=4, do_sample=False)
after = resident()
print(json.dumps({key: round(after[key] - before[key], 1) for key in after}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "memory_resident_smollm2.json")
    args = parser.parse_args()
    rows = []
    for folder in args.folders:
        measured = json.loads(subprocess.run([sys.executable, "-c", MEASURE, folder], capture_output=True, text=True,
                                             check=True).stdout.strip().splitlines()[-1])
        disk = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20
        rows.append(dict(folder=folder, disk_mib=round(disk, 1), anonymous_mib=measured["RssAnon"],
                         file_mib=measured["RssFile"], resident_mib=round(measured["RssAnon"] + measured["RssFile"], 1)))
        print(json.dumps(rows[-1]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(dict(
        benchmark="resident memory", command=" ".join([Path(sys.executable).name, "-m", "bench.memory"] + sys.argv[1:]),
        date=time.strftime("%Y-%m-%d"), machine=machine(), torch=torch.__version__, git=git_commit(), rows=rows),
        indent=2))


if __name__ == "__main__":
    main()
