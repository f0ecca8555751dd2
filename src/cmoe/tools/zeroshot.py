"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, on local task files or the usual hub sets.

The local files (formats in the data README) are read and turned, at load time, into documents that the
harness scores with its standard prompts: "Question: ...\\nAnswer:" for PIQA and ARC, "passage\\nQuestion:
...?\\nAnswer:" for BoolQ, the activity label and context for HellaSwag, partial scoring for WinoGrande and
the last word of LAMBADA (OpenAI). `acc` sums the choice's log-likelihood, `acc_norm` divides it by the
choice's length in bytes, as the harness does.
"""

from __future__ import annotations

import bz2
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cmoe.data import data_dir, online
from cmoe.errors import CMoEError


@dataclass(frozen=True)
class TaskSpec:
    file: str  # under <data dir>/tasks
    kind: str  # "choice", "partial" (one continuation after several contexts) or "continuation"
    metrics: tuple[str, ...]
    hub_task: str  # the harness's own task, used when the local file is missing and the machine is online


TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa.jsonl", "choice", ("acc", "acc_norm"), "piqa"),
    "arc_easy": TaskSpec("arc_easy.jsonl", "choice", ("acc", "acc_norm"), "arc_easy"),
    "arc_challenge": TaskSpec("arc_challenge.jsonl", "choice", ("acc", "acc_norm"), "arc_challenge"),
    "winogrande": TaskSpec("winogrande.jsonl", "partial", ("acc",), "winogrande"),
    "hellaswag": TaskSpec("hellaswag_val.txt.bz2", "choice", ("acc", "acc_norm"), "hellaswag"),
    "boolq": TaskSpec("boolq.jsonl", "choice", ("acc",), "boolq"),
    "lambada": TaskSpec("lambada_openai.jsonl", "continuation", ("acc", "perplexity"), "lambada_openai"),
}


def parse_tasks(text: str | list[str]) -> list[str]:
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise CMoEError(f"Unknown task {unknown[0]!r}; use any of {', '.join(TASKS)}.")
    return names


# -- reading the local files into the documents the harness scores ------------------------------------------

def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _answer_prompt(query: str) -> str:
    """The harness's "...\\nAnswer:" prompt; the local PIQA/ARC/BoolQ queries stop before it."""
    query = query.rstrip()
    return query if query.endswith("Answer:") else query + "\nAnswer:"


def _hellaswag(path: Path) -> list[dict]:
    lines = bz2.decompress(path.read_bytes()).decode("utf-8").splitlines()
    if len(lines) % 6:
        raise CMoEError(f"{path} should hold 6 lines an item but has {len(lines)} lines; replace it with a complete copy.")
    return [dict(query=lines[i], gold=int(lines[i + 1]), choices=lines[i + 2 : i + 6]) for i in range(0, len(lines), 6)]


def read_task(name: str, root: Path) -> list[dict]:
    """The task's items as {"query", "choices", "gold"} (choice), {"contexts", "continuation", "gold"} (partial)
    or {"context", "continuation"} (continuation)."""
    path = root / "tasks" / TASKS[name].file
    if name == "hellaswag":
        return _hellaswag(path)
    rows = _jsonl(path)
    try:
        if name == "winogrande":
            return [dict(contexts=r["context_options"], continuation=r["continuation"], gold=int(r["gold"])) for r in rows]
        if name == "lambada":
            return [dict(context=r["context"], continuation=r["continuation"]) for r in rows]
        if name == "boolq":
            return [dict(query=_answer_prompt(r["query"].removeprefix("Passage: ")), choices=r["choices"], gold=int(r["gold"]))
                    for r in rows]
        return [dict(query=_answer_prompt(r["query"]), choices=r["choices"], gold=int(r["gold"])) for r in rows]
    except (KeyError, TypeError, ValueError) as error:
        raise CMoEError(f"{path} does not have the expected fields ({error}); see the data README for its format.") from None


def _task_config(name: str, docs: list[dict]) -> dict:
    import datasets

    spec = TASKS[name]
    config = dict(task=name, test_split="test", output_type="multiple_choice", target_delimiter=" ",
                  custom_dataset=lambda **_: datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)}),
                  metadata=dict(version=1.0, source="cmoe local files"))
    if spec.kind == "choice":
        config.update(doc_to_text=lambda d: d["query"], doc_to_choice=lambda d: d["choices"], doc_to_target=lambda d: d["gold"])
    elif spec.kind == "partial":  # an int from doc_to_text tells the harness the choices are contexts
        config.update(doc_to_text=lambda d: d["gold"], doc_to_choice=lambda d: d["contexts"],
                      doc_to_target=lambda d: d["continuation"])
    else:
        config.update(output_type="loglikelihood", doc_to_text=lambda d: d["context"],
                      doc_to_target=lambda d: " " + d["continuation"].strip(), target_delimiter="")
    config["metric_list"] = [dict(metric=m, aggregation="perplexity" if m == "perplexity" else "mean",
                                  higher_is_better=m != "perplexity") for m in spec.metrics]
    return config


def build_tasks(names: list[str], data: str | os.PathLike | None = None) -> list:
    """Harness tasks: from the local files when the data directory has them, else the harness's hub task."""
    from lm_eval.api.task import ConfigurableTask

    root = _task_root(data)
    tasks = []
    for name in names:
        if root is not None and (root / "tasks" / TASKS[name].file).is_file():
            tasks.append(ConfigurableTask(config=_task_config(name, read_task(name, root))))
        elif online():
            tasks.append(TASKS[name].hub_task)
        else:
            where = root / "tasks" if root is not None else "no data directory"
            raise CMoEError(f"Task {name!r} has no local file {TASKS[name].file} ({where}) and this machine is offline; "
                            "pass --data-dir with a tasks/ folder.")
    return tasks


def _task_root(data) -> Path | None:
    try:
        return data_dir(data)
    except CMoEError:
        if data is not None:
            raise
        return None


# -- running the harness -----------------------------------------------------------------------------------

def evaluate_tasks(model, tokenizer, tasks: list[str], limit: int | float | None = None, batch_size: int = 8,
                   data: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
                   limits: dict[str, int] | None = None) -> dict:
    """Zero-shot scores through lm-evaluation-harness: {task: {"acc", "acc_stderr", ["acc_norm", ...], "items",
    "seconds"}}. `limit`: items per task (all by default); `limits` overrides it per task. `cache`: a
    file for the harness's request cache, so that an interrupted run resumes where it stopped."""
    if tokenizer is None:
        raise CMoEError("Zero-shot evaluation needs a Hugging Face tokenizer; load the model from a folder that has one.")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    built = build_tasks(tasks, data)
    # Indexing the harness's thousands of task files takes seconds; only hub tasks need it.
    manager = TaskManager(include_defaults=any(isinstance(task, str) for task in built))
    results = {}
    for name, task in zip(tasks, built):
        task_limit = (limits or {}).get(name, limit)
        started = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=[task], limit=task_limit, use_cache=None if cache is None else f"{cache}",
                              bootstrap_iters=1000, log_samples=False, task_manager=manager)
        results[name] = _scores(out["results"][name], out["n-samples"][name]["effective"])
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
    return results


def _scores(raw: dict, items: int) -> dict:
    scores = dict(items=items)
    for key, value in raw.items():
        metric, _, filter_name = key.partition(",")
        if filter_name == "none" and isinstance(value, (int, float)):
            scores[metric] = float(value)
    return scores
