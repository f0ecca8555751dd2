"""Zero-shot evaluation through lm-evaluation-harness on the local task files."""

import json
import shutil

import pytest
from conftest import byte_tokenizer, tiny_text_model

from cmoe.data import data_dir
from cmoe.errors import CMoEError
from cmoe.tools.zeroshot import TASKS, evaluate_tasks, read_task


@pytest.fixture(scope="module")
def lm():
    return tiny_text_model(), byte_tokenizer()


def test_every_local_task_gives_scores_in_range(lm):
    scores = evaluate_tasks(*lm, list(TASKS), limit=3, batch_size=4)
    assert set(scores) == set(TASKS)
    for name, score in scores.items():
        assert score["items"] == 3, name
        for metric in TASKS[name].metrics:
            if metric == "perplexity":
                assert score[metric] > 1
            else:
                assert 0 <= score[metric] <= 1, (name, metric)
            assert f"{metric}_stderr" in score


def _copy_task(tmp_path, name, rows):
    (tmp_path / "tasks").mkdir(parents=True, exist_ok=True)
    (tmp_path / "tasks" / TASKS[name].file).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("name", ["piqa", "winogrande"])
def test_a_wrong_answer_key_changes_the_score(lm, tmp_path, name):
    """Two-way tasks: with every key flipped, each right answer becomes wrong, so the two accuracies sum to 1.
    With an odd number of items a scorer that ignored the key could not do that (it would need 7.5 of 15)."""
    rows = [json.loads(line) for line in (data_dir() / "tasks" / TASKS[name].file).read_text().splitlines()[:15]]
    _copy_task(tmp_path / "right", name, rows)
    _copy_task(tmp_path / "flipped", name, [dict(r, gold=1 - r["gold"]) for r in rows])
    right = evaluate_tasks(*lm, [name], batch_size=8, data=tmp_path / "right")[name]["acc"]
    flipped = evaluate_tasks(*lm, [name], batch_size=8, data=tmp_path / "flipped")[name]["acc"]
    assert right != flipped
    assert right + flipped == pytest.approx(1.0)


def test_local_files_become_the_harness_prompts():
    root = data_dir()
    piqa = read_task("piqa", root)[0]
    assert piqa["query"].startswith("Question: ") and piqa["query"].endswith("\nAnswer:") and len(piqa["choices"]) == 2
    assert read_task("arc_easy", root)[0]["query"].endswith("?\nAnswer:")
    boolq = read_task("boolq", root)[0]
    assert not boolq["query"].startswith("Passage:") and boolq["query"].endswith("?\nAnswer:")
    hellaswag = read_task("hellaswag", root)
    assert len(hellaswag) == 10042 and all(len(d["choices"]) == 4 and 0 <= d["gold"] < 4 for d in hellaswag)
    assert len(read_task("lambada", root)) == 5153


def test_a_missing_task_file_offline_is_a_clear_error(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "tasks").mkdir()
    with pytest.raises(CMoEError, match="piqa.jsonl.*offline"):
        evaluate_tasks(*lm, ["piqa"], data=tmp_path)


def test_a_malformed_task_file_is_a_clear_error(lm, tmp_path):
    _copy_task(tmp_path, "arc_easy", [{"question": "?", "answer": 1}])
    with pytest.raises(CMoEError, match="expected fields"):
        evaluate_tasks(*lm, ["arc_easy"], data=tmp_path)


def test_a_partial_data_copy_falls_back_only_for_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "tasks").mkdir()
    shutil.copy(data_dir() / "tasks" / "piqa.jsonl", tmp_path / "tasks")
    from cmoe.tools.zeroshot import build_tasks

    assert len(build_tasks(["piqa"], tmp_path)) == 1
    with pytest.raises(CMoEError, match="boolq"):
        build_tasks(["piqa", "boolq"], tmp_path)


def test_cli_eval_runs_tasks_without_perplexity(lm, tmp_path, capsys):
    from cmoe.tools.cli import main

    model, tokenizer = lm
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert main(["eval", str(tmp_path / "model"), "--tasks", "piqa,lambada", "--limit", "2",
                 "--json", str(tmp_path / "out.json")]) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert "perplexity" not in report and report["tasks"]["piqa"]["items"] == 2
    assert "acc_norm %" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "model"), "--tasks", "piqa,mmlu"]) == 2
    assert "Unknown task 'mmlu'" in capsys.readouterr().err
