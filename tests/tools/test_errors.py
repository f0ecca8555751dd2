"""Bad input gets one clear sentence, and nothing half-written is left behind."""

import pytest
import torch
import transformers as T

import cmoe
from cmoe.tools.cli import main
from cmoe.data import sample_windows
from cmoe.errors import CMoEError
from cmoe.hf.loading import load_model
from conftest import tiny_model, tokens


def one_sentence(message: str) -> bool:
    return message.endswith(".") and "\n" not in message


def test_unsupported_architecture():
    config = T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = T.BertForMaskedLM(config)
    with pytest.raises(CMoEError, match="'bert' is not supported") as error:
        cmoe.carve_(model, cmoe.CarveConfig(), tokens())
    assert one_sentence(str(error.value)) and "llama" in str(error.value)


def test_gated_ffn_with_biases_is_refused_rather_than_carved_wrong():
    # the carved FFN has no gate bias: carving Llama's mlp_bias=True would silently drop it
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, mlp_bias=True)
    model = T.LlamaForCausalLM(config)
    with pytest.raises(CMoEError, match="FFN has biases") as error:
        cmoe.carve_(model, cmoe.CarveConfig(), tokens())
    assert one_sentence(str(error.value))


@pytest.mark.parametrize("kwargs,match", [
    (dict(shared=3, active=6, experts=8), "at most experts"),
    (dict(shared=1, active=1, experts=0), "positive"),
    (dict(shared=1, active=0, experts=4), "routes to no expert"),
    (dict(preset="fast"), "Unknown preset"),
])
def test_impossible_expert_configuration(kwargs, match):
    with pytest.raises(CMoEError, match=match) as error:
        cmoe.CarveConfig(**kwargs)
    assert one_sentence(str(error.value))


def test_width_the_experts_cannot_split():
    with pytest.raises(CMoEError, match="64 neurons.*cannot split equally") as error:
        cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(shared=1, active=1, experts=6), tokens(), progress=False)
    assert one_sentence(str(error.value))


def test_bad_config_name():
    with pytest.raises(CMoEError, match="S3A3E8"):
        cmoe.CarveConfig.from_name("3-3-8")


def test_missing_and_malformed_calibration():
    with pytest.raises(CMoEError, match="No calibration data"):
        cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(), None)
    with pytest.raises(CMoEError, match="integer token ids"):
        cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(), torch.randn(2, 8))


def test_too_short_calibration_text():
    with pytest.raises(CMoEError, match="has 100 tokens, too few for windows of 2048") as error:
        sample_windows(torch.arange(100), samples=8, seqlen=2048)
    assert one_sentence(str(error.value))


def test_missing_data_dir(tmp_path, monkeypatch):
    from cmoe.data import eval_text

    with pytest.raises(CMoEError, match="missing"):
        eval_text("ptb", tmp_path)
    monkeypatch.setenv("CMOE_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(CMoEError, match="No data directory found.*nowhere"):
        eval_text("wikitext2")


def test_corrupt_saved_model(tmp_path):
    carved = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(shared=1, active=1, experts=4), tokens(), progress=False)
    carved.save_pretrained(tmp_path / "out")
    weights = tmp_path / "out" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CMoEError, match="truncated or not a safetensors file") as error:
        load_model(str(tmp_path / "out"))
    assert one_sentence(str(error.value))
    with pytest.raises(CMoEError, match="no config.json"):
        load_model(str(tmp_path))


def test_failed_save_leaves_no_folder(tmp_path, monkeypatch):
    carved = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(shared=1, active=1, experts=4), tokens(), progress=False)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(T.PreTrainedModel, "save_pretrained", broken)
    with pytest.raises(OSError):
        carved.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_folder(tmp_path, monkeypatch):
    carved = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(shared=1, active=1, experts=4), tokens(), progress=False)
    carved.save_pretrained(tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    monkeypatch.setattr(T.PreTrainedModel, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(OSError):
        carved.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_reports_errors_in_one_line(capsys, tmp_path):
    code = main(["carve", "stories260k", "-o", str(tmp_path / "x"), "--config", "S3A6E8"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmoe: error:") and "at most experts" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["carve", "stories260k", "-o", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
