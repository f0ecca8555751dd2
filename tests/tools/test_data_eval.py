import math

import pytest
import torch

from cmoe.data import C4_EVAL_DOCS, calibration_text, data_dir, eval_text, sample_windows
from cmoe.tools.perplexity import perplexity
from conftest import tiny_model, tokens

HAS_DATA = True
try:
    data_dir()
except Exception:  # noqa: BLE001
    HAS_DATA = False
needs_data = pytest.mark.skipif(not HAS_DATA, reason="../shared/data is not here")


def test_windows_are_seeded_and_in_range():
    ids = torch.arange(1000)
    a, b, c = sample_windows(ids, 5, 64, seed=0), sample_windows(ids, 5, 64, seed=0), sample_windows(ids, 5, 64, seed=1)
    assert a.shape == (5, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 63, dtype=a.dtype))  # contiguous windows


def test_perplexity_matches_a_direct_computation():
    model = tiny_model("llama")
    ids = tokens(1, 50).reshape(-1)
    ppl = perplexity(model, ids, seqlen=16, progress=False)  # 3 windows of 16, the last 2 tokens unused
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            window = ids[w * 16 : (w + 1) * 16]
            logp = model(window[None]).logits[0].log_softmax(-1)
            nll -= logp[torch.arange(15), window[1:]].sum().item()
            count += 15
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert perplexity(model, ids, seqlen=16, max_windows=1, progress=False) != ppl


@needs_data
def test_eval_and_calibration_texts_do_not_overlap():
    c4_eval, c4_calib = eval_text("c4"), calibration_text("c4")
    assert c4_eval and c4_calib and c4_eval[:2000] not in c4_calib
    assert c4_eval.count("\n\n") >= C4_EVAL_DOCS - 1
    wiki_test, wiki_valid = eval_text("wikitext2"), calibration_text("wikitext2")
    assert len(wiki_test) == 1_294_336  # the standard raw test string
    assert wiki_test[:500] not in wiki_valid
    assert "<unk>" in eval_text("ptb")


@needs_data
def test_joined_sources_give_both_texts():
    mixed = calibration_text("wikitext2+c4")
    assert mixed == calibration_text("wikitext2") + "\n\n" + calibration_text("c4")
