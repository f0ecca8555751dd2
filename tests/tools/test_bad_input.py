"""Bad input through the command line, as an adversarial new user gives it: each case exits 2 with one sentence on
stderr that names the problem, no traceback, and nothing created or changed on disk."""

import hashlib
import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T

from cmoe.tools.cli import _what_was_kept, build_parser, main
from cmoe.run_folder import atomic_directory
from conftest import byte_tokenizer, tiny_model, tiny_text_model

TEXT = " ".join(f"The {w} sat on the mat and looked at the {v} for a while." for w in ("cat", "dog", "bird")
                for v in ("sun", "moon", "rain", "wind")) * 20


def _llama2c_bytes(vocab: int = 32) -> bytes:
    dim, hidden, layers, heads, kv, seq = 8, 16, 1, 2, 2, 16
    head_dim = dim // heads
    floats = (vocab * dim + layers * (dim + 2 * dim * dim + 2 * kv * head_dim * dim + dim + 3 * hidden * dim) + dim
              + seq * head_dim)
    weights = np.random.default_rng(0).standard_normal(floats).astype(np.float32) * 0.1
    return struct.pack("7i", dim, hidden, layers, heads, kv, vocab, seq) + weights.tobytes()


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A work folder with a dense model, a model carved from it by the CLI, data and bad files."""
    root = tmp_path_factory.mktemp("bad_input")
    dense = tiny_text_model()
    dense.save_pretrained(root / "dense")
    byte_tokenizer().save_pretrained(root / "dense")
    (root / "calib.txt").write_text(TEXT)
    data = root / "data" / "wikitext2"
    data.mkdir(parents=True)
    (data / "test.txt").write_text(TEXT)
    (data / "valid.tokens.txt").write_text(TEXT)
    cwd = os.getcwd()
    os.chdir(root)
    try:  # a relative source path, as a user types it
        assert main(["carve", "dense", "-o", "carved", "--config", "S1A1E4", "--calib", "calib.txt",
                     "--calib-samples", "2", "--calib-seqlen", "32"]) == 0
    finally:
        os.chdir(cwd)
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "bad.gguf").write_bytes(b"GGUF" + os.urandom(200))
    (root / "garbage.bin").write_bytes(os.urandom(1000))
    good = _llama2c_bytes()
    (root / "good.bin").write_bytes(good)
    (root / "cut.bin").write_bytes(good[: len(good) // 2])
    (root / "a_file").write_text("not a folder")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "keep.txt").write_text("mine")
    shutil.copytree(root / "carved", root / "carved_cut")
    weights = root / "carved_cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    shutil.copytree(root / "carved", root / "carved_badjson")
    (root / "carved_badjson" / "config.json").write_text('{"cmoe": ')
    T.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).save_pretrained(root / "t5")
    T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                            d_kv=8)).save_pretrained(root / "t5")
    other = tiny_model("gpt2")  # another family, and another vocabulary
    other.save_pretrained(root / "other")
    return root


def _snapshot(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        digest.update(f"{path.relative_to(root)} {stat.st_mode} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()


CUDA = torch.cuda.is_available()
CASES = [
    # carve
    ("carve dense -o out --calib binary.txt --calib-samples 2 --calib-seqlen 32", "not UTF-8 text"),
    ("carve bad.gguf -o out", "cannot be read as a GGUF model"),
    ("carve garbage.bin -o out", "does not start with a llama2.c header"),
    ("carve cut.bin -o out", "ends early"),
    ("carve dense -o a_file", "is a file, not a folder"),
    ("carve dense -o a_file/out", "is not a folder"),
    ("carve dense -o nonempty", "--overwrite"),
    ("carve dense -o out --config S3A3E8 --shared 1", "give one or the other"),
    ("carve dense -o out --budget 0.5 --config S3A3E8", "give the budget"),
    ("carve dense -o out --budget 1.5", "budget must lie in"),
    ("carve dense -o out --budget 0.01 --preset fitted --calib calib.txt --calib-samples 2 --calib-seqlen 32", "raise --budget"),
    ("carve dense -o out --preset static --config S1A1E4", "routes nothing"),
    ("carve dense -o out --preset sparse --config S3A3E8", "needs a budget, not expert counts"),
    ("carve dense -o out --calib-seqlen 100000", "positions this model was built for"),
    ("carve dense -o out --calib-samples 0", "--calib-samples must be at least 1"),
    ("carve dense -o out --device nosuch", "no device PyTorch knows"),
    pytest.param("carve dense -o out --device cuda", "PyTorch sees none", marks=pytest.mark.skipif(CUDA, reason="a GPU")),
    ("carve ./missing -o out", "There is no file or folder ./missing"),
    ("carve missing/a/b -o out", "There is no file or folder"),
    ("carve t5 -o out", "holds a t5 model"),
    # convert-llama2c
    ("convert-llama2c garbage.bin -o out", "does not start with a llama2.c header"),
    ("convert-llama2c cut.bin -o out", "ends early"),
    ("convert-llama2c good.bin -o nonempty", "--overwrite"),
    ("convert-llama2c nothere.bin -o out", "There is no file nothere.bin"),
    # eval
    ("eval carved --seqlen 0", "--seqlen must be at least 2"),
    ("eval carved --seqlen 1", "--seqlen must be at least 2"),
    ("eval carved --max-windows 0", "--max-windows must be at least 1"),
    ("eval carved --max-windows -1", "--max-windows must be at least 1"),
    ("eval carved --ppl '' --tasks piqa --limit 0", "--limit must be at least 1"),
    ("eval carved --ppl '' --tasks piqa --limit -1", "--limit must be at least 1"),
    ("eval carved --ppl '' --tasks piqa --batch-size 0", "--batch-size must be at least 1"),
    ("eval carved --json nonempty", "is a folder"),
    ("eval carved --json a_file/x.json", "cannot be written"),
    ("eval carved --seqlen 100000", "positions this model was built for"),
    ("eval carved --device nosuch", "no device PyTorch knows"),
    pytest.param("eval carved --device cuda", "PyTorch sees none", marks=pytest.mark.skipif(CUDA, reason="a GPU")),
    ("eval nowhere/model/x", "There is no file or folder"),
    # inspect
    ("inspect carved_cut", "truncated or not a safetensors file"),
    ("inspect carved_badjson", "cannot be read as JSON"),
    # bench
    ("bench carved --batch 0", "--batch must be at least 1"),
    ("bench carved --seqlen 0", "--seqlen must be at least 1"),
    ("bench carved --repeats 0", "--repeats must be at least 1"),
    ("bench carved --mode nosuch", "the modes are prefill and decode"),
    ("bench carved --against other", "is not the dense model this was carved from"),
    ("bench carved --against carved", "is not the dense model this was carved from"),
    # finetune
    ("finetune carved -o out --max-minutes 0", "--max-minutes must be above 0"),
    ("finetune carved -o out --max-minutes -1", "--max-minutes must be above 0"),
    ("finetune carved -o out --lr=-1e-4", "learning rate must be above 0"),
    ("finetune carved -o out --lora-alpha 0", "LoRA alpha"),
    ("finetune carved -o out --loss distill --teacher other", "vocabulary"),
    ("finetune carved -o out --seqlen 100000", "positions this model was built for"),
    ("finetune carved -o a_file", "is a file, not a folder"),
]


@pytest.mark.parametrize("command,message", CASES)
def test_bad_input_gets_one_sentence_and_changes_nothing(place, command, message, capsys, monkeypatch):
    import shlex

    monkeypatch.chdir(place)
    monkeypatch.setenv("CMOE_DATA_DIR", str(place / "data"))
    before = _snapshot(place)
    code = main(shlex.split(command))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("cmoe: error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err
    assert err.endswith("."), err
    assert _snapshot(place) == before, "the command created or changed files"


def test_json_into_a_missing_folder_is_written(place, tmp_path, monkeypatch):
    monkeypatch.setenv("CMOE_DATA_DIR", str(place / "data"))
    target = tmp_path / "new" / "folder" / "result.json"
    assert main(["eval", str(place / "carved"), "--seqlen", "32", "--max-windows", "1", "--json", str(target)]) == 0
    assert json.loads(target.read_text())["perplexity"]["wikitext2"]["windows"] == 1


def test_the_source_is_recorded_absolute_and_its_absence_is_said(place, tmp_path, monkeypatch, capsys):
    record = json.loads((place / "carved" / "carve_record.json").read_text())
    config_record = json.loads((place / "carved" / "config.json").read_text())["cmoe"]["record"]
    assert record["source"] == str((place / "dense").resolve()) == config_record["source"]
    assert len(record["source_fingerprint"]) == 16
    monkeypatch.chdir(tmp_path)  # another folder: the relative path typed at carve time would not resolve here
    args = ["bench", str(place / "carved"), "--mode", "prefill", "--seqlen", "16", "--repeats", "1"]
    assert main(args) == 0
    moved = shutil.copytree(place / "carved", tmp_path / "carved")
    config = json.loads((moved / "config.json").read_text())
    config["cmoe"]["record"]["source"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["bench", str(moved)]) == 2
    assert "is no longer there; pass it with --against DENSE" in capsys.readouterr().err


def test_the_stories260k_alias_carves_and_evaluates_with_its_own_tokenizer(tmp_path, monkeypatch):
    from cmoe.data import data_dir

    try:
        bin_file = data_dir().parent / "models" / "stories260K" / "stories260K.bin"
    except Exception:  # noqa: BLE001
        pytest.skip("no ../shared data folder here")
    if not bin_file.is_file():
        pytest.skip("stories260K is not in the shared models folder")
    assert main(["eval", "stories260k", "--seqlen", "128", "--max-windows", "2"]) == 0
    assert main(["carve", "stories260k", "-o", str(tmp_path / "out"), "--config", "S1A1E4", "--calib-samples", "2",
                 "--calib-seqlen", "64"]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_an_interrupt_says_what_a_later_run_can_pick_up(tmp_path):
    parser = build_parser()
    finetune = parser.parse_args(["finetune", "carved", "-o", str(tmp_path / "ft")])
    assert _what_was_kept(finetune) == "nothing was written."
    (tmp_path / "ft.partial").mkdir()
    (tmp_path / "ft.partial" / "checkpoint.pt").write_bytes(b"x")
    assert "--resume" in _what_was_kept(finetune)
    sweep = parser.parse_args(["sweep", "m", "-o", str(tmp_path / "report")])
    assert _what_was_kept(sweep) == "nothing was written."
    (tmp_path / "report.partial").mkdir()
    assert "run the same command again" in _what_was_kept(sweep)


def test_leftovers_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / ".out.tmp-999999999-abc"
    live = tmp_path / f".out.tmp-{os.getppid()}-abc"
    legacy = tmp_path / ".out.tmp-q1w2e3"
    fresh_legacy = tmp_path / ".out.tmp-r4t5y6"
    other = tmp_path / ".other.tmp-999999999-abc"
    for folder in (dead, live, legacy, fresh_legacy, other):
        folder.mkdir()
    old = time.time() - 7200
    os.utime(legacy, (old, old))
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "file").write_text("x")
    assert not dead.exists() and not legacy.exists()
    assert live.exists() and fresh_legacy.exists() and other.exists() and (tmp_path / "out" / "file").is_file()


def test_written_folders_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "weights").write_bytes(b"x")
            os.chmod(tmp / "weights", 0o600)  # as safetensors' writer leaves its file
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "weights").stat().st_mode & 0o777 == 0o640


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders, so there is nothing to refuse")
def test_a_read_only_destination_is_refused_before_the_carve(place, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["carve", str(place / "dense"), "-o", str(locked / "out"), "--calib", str(place / "calib.txt")]) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
