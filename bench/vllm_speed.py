"""vLLM generation speed, dense against carved (issue 26), on whatever vLLM build this venv has (CPU or GPU).

    .venv-serve/bin/python -m bench.vllm_speed [--layouts S2A2E8,S1A1E8] [--batches 1,8] [--dtype bfloat16]
        [--tokens 128] [--eager] [--output bench/results/vllm_speed_cpu.json]

SmolLM2-135M-Instruct dense (vLLM's own Llama implementation) and carved with the `paper` preset (vLLM's
Transformers backend, its fused experts, our router), each loaded in turn; for each batch size, `batch`
prompts of 32 random token ids generate `--tokens` tokens each (greedy, no early stop); tokens/s is the
generated tokens over the wall time of the whole `generate` call (prefill included), the median of 3 runs
after one warm-up. Carving uses 8 x 512 calibration tokens (speed does not depend on quality).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import cmoe
from cmoe.data import calibration_tokens
from cmoe.hf.loading import fetch_smollm2, load_model
from cmoe.tools.bench import interleaved_medians
from cmoe.tools.provenance import device_name, git_commit

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's CPU default takes most of the memory


def tokens_per_second(folder, batches, new_tokens, dtype, eager) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), dtype=dtype, enforce_eager=eager, max_model_len=512, seed=0, skip_tokenizer_init=True)
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0, ignore_eos=True,
                            detokenize=False)
    speeds = {}
    try:
        for batch in batches:
            prompts = [{"prompt_token_ids": torch.randint(3, 5000, (32,), generator=torch.Generator().manual_seed(i)).tolist()}
                       for i in range(batch)]
            llm.generate(prompts, params, use_tqdm=False)
            seconds = interleaved_medians({"generate": lambda llm=llm, prompts=prompts: llm.generate(prompts, params, use_tqdm=False)},
                                          repeats=3, warmup=0, device=torch.device("cpu"))["generate"]
            speeds[batch] = round(batch * new_tokens / seconds, 1)
    finally:
        del llm
        gc.collect()
    return speeds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="S2A2E8,S1A1E8")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "vllm_speed_cpu.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = [dict(model="dense", tokens_per_s=tokens_per_second(fetch_smollm2(), batches, args.tokens, args.dtype,
                                                              args.eager))]
    print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts.split(","):
            model, tokenizer = load_model("smollm2")
            cmoe.carve_(model, cmoe.CarveConfig.from_name(layout), calibration_tokens(tokenizer, "wikitext2", 8, 512),
                        progress=False)
            model.save_pretrained(Path(tmp) / layout, tokenizer=tokenizer)
            del model
            speeds = tokens_per_second(Path(tmp) / layout, batches, args.tokens, args.dtype, args.eager)
            rows.append(dict(model=layout, tokens_per_s=speeds,
                             over_dense={b: round(speeds[b] / rows[0]["tokens_per_s"][b], 3) for b in batches}))
            print(json.dumps(rows[-1]), flush=True)
    import vllm

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(dict(
        benchmark="vllm speed", model="SmolLM2-135M-Instruct", vllm=vllm.__version__, dtype=args.dtype,
        eager=args.eager, new_tokens=args.tokens, command=" ".join([Path(sys.executable).name] + sys.argv),
        date=time.strftime("%Y-%m-%d"), machine=f"{device_name('cuda' if torch.cuda.is_available() else None)}",
        torch=torch.__version__, cmoe=cmoe.__version__, git=git_commit(), rows=rows), indent=2))


if __name__ == "__main__":
    main()
