"""stories260K: real trained weights in a second."""

from pathlib import Path

import pytest
import torch
import transformers as T

import cmoe
from cmoe.tools.cli import main
from cmoe.hf.llama2c import Llama2cTokenizer, load_llama2c

ROOT = Path(__file__).resolve().parents[3] / "shared" / "models" / "stories260K"
pytestmark = pytest.mark.skipif(not ROOT.is_dir(), reason="../shared/models/stories260K is not here")
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def stories():
    return load_llama2c(ROOT / "stories260K.bin"), Llama2cTokenizer(ROOT / "tok512.bin")


def test_converter_reproduces_the_known_story(stories):
    model, tokenizer = stories
    ids = torch.tensor([tokenizer.encode("Once upon a time")])
    out = model.generate(ids, max_new_tokens=30, do_sample=False)
    assert tokenizer.decode(out[0].tolist()).startswith(STORY)


def test_tokenizer_round_trip(stories):
    _, tokenizer = stories
    text = "Lily and Tom found a shiny red ball."
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_carving_stories_works(stories, tmp_path):
    model, tokenizer = stories
    text = " ".join([STORY, "Lily saw a big dog. The dog was happy and ran to her."] * 8)
    ids = torch.tensor(tokenizer.encode(text))
    calibration = ids[: (ids.numel() // 64) * 64].view(-1, 64)
    with torch.no_grad():
        dense_loss = model(calibration, labels=calibration).loss
    carved = cmoe.carve_(load_llama2c(ROOT / "stories260K.bin"), cmoe.CarveConfig(shared=1, active=1, experts=4),
                     calibration, progress=False)
    wider = cmoe.carve_(load_llama2c(ROOT / "stories260K.bin"), cmoe.CarveConfig(shared=1, active=2, experts=4),
                       calibration, progress=False)
    with torch.no_grad():
        loss = carved(calibration, labels=calibration).loss
        wider_loss = wider(calibration, labels=calibration).loss
    chance = torch.log(torch.tensor(512.0))
    assert torch.isfinite(loss) and loss < chance - 1.5  # half the FFN: still far better than chance
    assert dense_loss < wider_loss < loss  # more neurons active, closer to dense
    full = cmoe.carve_(load_llama2c(ROOT / "stories260K.bin"), cmoe.CarveConfig(shared=1, active=3, experts=4),
                      calibration, progress=False)
    with torch.no_grad():
        assert torch.allclose(full(calibration).logits, model(calibration).logits, atol=1e-4, rtol=1e-4)
    prompt = torch.tensor([tokenizer.encode("Once upon a time")])
    full.save_pretrained(tmp_path / "story")
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "story")
    assert tokenizer.decode(loaded.generate(prompt, max_new_tokens=30, do_sample=False)[0].tolist()).startswith(STORY)


def test_cli_converts(tmp_path):
    assert main(["convert-llama2c", str(ROOT / "stories260K.bin"), "-o", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.num_hidden_layers == 5
