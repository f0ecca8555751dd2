"""`cmoe sweep` report folders and `cmoe inspect`."""

import json

import pytest
import torch
from conftest import byte_tokenizer, tiny_model, tiny_text_model, tokens

import cmoe
from cmoe.tools import sweep as sweep_module
from cmoe.tools.cli import main
from cmoe.tools.describe import describe
from cmoe.tools.sweep import SweepPlan, run_sweep

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG, f"{path.name} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_text_model().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def _plan(model_dir, **changes):
    fields = dict(model=str(model_dir), configs=["S2A2E8", "S1A1E4"], ppl=["wikitext2"], seqlen=64, max_windows=2,
                  tasks=["piqa", "hellaswag"], limit=4, batch_size=4, calib_samples=2, calib_seqlen=64)
    return SweepPlan(**{**fields, **changes})


def test_sweep_writes_every_report_file(text_model_dir, tmp_path):
    out = tmp_path / "report"
    results = run_sweep(_plan(text_model_dir), out, progress=False)
    assert [r["config"] for r in results["rows"]] == ["dense", "S2A2E8", "S1A1E4"]
    fractions = [r["active_fraction"] for r in results["rows"]]
    assert fractions[0] == 1.0 and all(0.5 <= f < 0.6 for f in fractions[1:])  # 4 of 8 slices, plus the router
    for row in results["rows"]:
        assert row["perplexity"]["wikitext2"] > 1
        assert 0 <= row["tasks"]["piqa"]["acc"] <= 1 and row["tasks"]["hellaswag"]["items"] == 4
    assert json.loads((out / "results.json").read_text()) == results
    report = (out / "report.md").read_text()
    assert "## Perplexity" in report and "## Zero-shot acc_norm" in report
    assert report.index("| dense") < report.index("| S2A2E8")
    assert all(r["device"].endswith(" threads") and r["resumed"] is False for r in results["rows"])  # the processor named
    assert "| device" in report and "resumed from a stopped run" not in report
    for name in ("ppl_vs_active", "accuracy_vs_active"):
        assert _png_size(out / f"{name}.png") == (1200, 750)
        assert f"({name}.png)" in report
    for name in ("activation_rates", "expert_load"):
        width, height = _png_size(out / f"{name}.png")
        assert width >= 800 and height >= 300
    assert not (tmp_path / "report.partial").exists()


def test_a_stopped_sweep_leaves_no_report_and_resumes(text_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "report"
    plan = _plan(text_model_dir, tasks=[], configs=["S2A2E8", "S1A1E4"])
    real = sweep_module._carve_and_evaluate
    carved, stop = [], {"at": "S1A1E4"}

    def carve_or_stop(dense, tokenizer, name, *args):
        if name == stop["at"]:
            raise KeyboardInterrupt
        carved.append(name)
        return real(dense, tokenizer, name, *args)

    monkeypatch.setattr(sweep_module, "_carve_and_evaluate", carve_or_stop)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, out, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "report.partial" / "runs").glob("*.json")) == [
        "S2A2E8.json", "S2A2E8.record.json", "dense.json"]

    stop["at"], carved[:] = None, []
    results = run_sweep(plan, out, progress=False)
    assert carved == ["S1A1E4"]  # S2A2E8 and dense were not redone
    assert [r["config"] for r in results["rows"]] == ["dense", "S2A2E8", "S1A1E4"]

    (tmp_path / "other.partial" / "runs").mkdir(parents=True)
    (tmp_path / "other.partial" / "plan.json").write_text(json.dumps(_plan(text_model_dir, seed=5).key()))
    (tmp_path / "other.partial" / "runs" / "dense.json").write_text("{}")  # a finished run of that other sweep
    with pytest.raises(cmoe.CMoEError, match="different settings"):
        run_sweep(plan, tmp_path / "other", progress=False)
    (tmp_path / "other.partial" / "runs" / "dense.json").unlink()  # nothing finished: nothing to keep
    assert run_sweep(plan, tmp_path / "other", progress=False)["rows"][0]["config"] == "dense"


def test_inspect_reads_a_carved_folder(tmp_path, capsys):
    model = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(shared=1, active=2, experts=4), tokens(), progress=False)
    model.save_pretrained(tmp_path / "moe")
    info = describe(tmp_path / "moe")
    assert info["name"] == "S1A2E4" and len(info["layers"]) == 2
    first = info["layers"][0]
    assert first["shared_width"] == 16 and first["routed"] == 3 and first["expert_width"] == 16 and first["top_k"] == 2
    bias = model.model.layers[0].mlp.router.selection_bias
    assert first["bias_min"] == pytest.approx(bias.min().item()) and first["bias_max"] == pytest.approx(bias.max().item())
    assert sum(first["load_after"]) == pytest.approx(1.0, abs=1e-3)

    assert main(["inspect", str(tmp_path / "moe"), "--json", str(tmp_path / "info.json")]) == 0
    printed = capsys.readouterr().out
    assert "S1A2E4" in printed and "3 x 16" in printed
    assert json.loads((tmp_path / "info.json").read_text())["layers"][1]["layer"] == 1


def test_inspect_refuses_a_dense_folder(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    assert main(["inspect", str(tmp_path / "dense")]) == 2
    assert "not a carved one" in capsys.readouterr().err


def test_inspect_shows_the_saved_bias_not_the_record(tmp_path):
    model = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(shared=1, active=2, experts=4), tokens(), progress=False)
    with torch.no_grad():
        model.model.layers[1].mlp.router.selection_bias.fill_(0.25)
    model.save_pretrained(tmp_path / "moe")
    assert describe(tmp_path / "moe")["layers"][1]["bias_max"] == pytest.approx(0.25)


def test_sweep_carves_every_budget_with_every_preset_and_counts_its_compute(text_model_dir, tmp_path, capsys):
    out = tmp_path / "budgets"
    assert main(["sweep", str(text_model_dir), "-o", str(out), "--budgets", "0.75,0.5", "--presets", "sparse,static",
                 "--seqlen", "64", "--max-windows", "2", "--calib-samples", "2", "--calib-seqlen", "64"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["config"] for r in rows] == ["dense", "sparse@0.75", "static@0.75", "sparse@0.5", "static@0.5"]
    assert rows[0]["ffn_compute"] == 1.0
    for row in rows[1:]:  # counted over the perplexity windows, near what each budget pays for
        assert row["ffn_compute"] == pytest.approx(row["budget"], abs=0.1), row
    assert rows[1]["layout"] == "sparse0.75" and rows[2]["layout"].startswith("S")
    assert "FFN compute counted %" in (out / "report.md").read_text()


def test_a_sweep_with_nothing_to_carve_is_refused(text_model_dir, tmp_path):
    with pytest.raises(cmoe.CMoEError, match="Nothing to carve"):
        run_sweep(_plan(text_model_dir, configs=[], tasks=[]), tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists() and not (tmp_path / "none.partial").exists()
