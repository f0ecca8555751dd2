"""Recovery fine-tuning on a tiny carved model."""

import copy

import pytest
import torch
from conftest import byte_tokenizer, tiny_text_model

import cmoe
from cmoe.tools import finetune as finetune_module
from cmoe.tools import losses
from cmoe.tools.finetune import FinetuneConfig, add_lora, finetune, routers
from cmoe.hf.loading import load_model

# A short repeated pattern: a model that learns anything at all lowers its loss on it quickly.
PATTERN = torch.arange(40).repeat(100)[None] * 5 % 256


@pytest.fixture(scope="module")
def carved():
    model = tiny_text_model()
    return cmoe.carve_(model, cmoe.CarveConfig(shared=1, active=1, experts=4), PATTERN[:, :256].view(4, 64), progress=False)


def _config(**changes):
    fields = dict(samples=24, seqlen=32, batch_size=2, lr=1e-2, router_lr=1e-2, bias_speed=1e-2, checkpoint_every=4)
    return FinetuneConfig(**{**fields, **changes})


def test_a_few_steps_lower_the_loss_and_train_gates_router_and_bias(carved, tmp_path):
    model = copy.deepcopy(carved)
    router_before = routers(model)[0].weight.detach().clone()
    summary = finetune(model, byte_tokenizer(), _config(), tmp_path / "ft", calibration_ids=PATTERN, progress=False)
    assert summary["steps"] == 12 and summary["tokens"] == 24 * 32
    assert summary["last_loss"] < summary["first_loss"] - 0.5
    assert summary["gate_scale_change"] > 0
    tuned, _ = load_model(str(tmp_path / "ft"))
    assert not torch.allclose(routers(tuned)[0].weight, router_before)
    assert routers(tuned)[0].selection_bias.abs().sum() > 0  # balancing moved the bias, and it was saved
    assert tuned.carve_record["finetune"]["steps"] == 12
    assert "lora" not in " ".join(n for n, _ in tuned.named_parameters())  # merged: loads without peft
    assert not (tmp_path / "ft.partial").exists()


def test_merged_lora_gives_the_logits_of_the_unmerged_model(carved):
    model = add_lora(copy.deepcopy(carved), _config())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(std=0.05)  # lora_B starts at 0; make the adapter do something
        ids = PATTERN[:, :48]
        unmerged, unmerged_one = model(ids).logits, model(ids[:, :1]).logits  # one token: the decode path's size
        merged_model = model.merge_and_unload()
        merged, merged_one = merged_model(ids).logits, merged_model(ids[:, :1]).logits
    assert not torch.allclose(unmerged, carved(ids).logits, atol=1e-3)
    assert torch.allclose(merged, unmerged, atol=1e-4)
    assert torch.allclose(merged_one, unmerged_one, atol=1e-4)


def test_resume_continues_from_the_saved_step(carved, tmp_path, monkeypatch):
    real_loss = finetune_module.training_loss
    calls = []

    def stop_after_six(*args):
        if len(calls) == 6:
            raise KeyboardInterrupt
        calls.append(1)
        return real_loss(*args)

    monkeypatch.setattr(finetune_module, "training_loss", stop_after_six)
    with pytest.raises(KeyboardInterrupt):
        finetune(copy.deepcopy(carved), byte_tokenizer(), _config(), tmp_path / "ft", calibration_ids=PATTERN,
                 progress=False)
    assert not (tmp_path / "ft").exists() and (tmp_path / "ft.partial" / "checkpoint.pt").exists()
    with pytest.raises(cmoe.CMoEError, match="--resume"):
        finetune(copy.deepcopy(carved), byte_tokenizer(), _config(), tmp_path / "ft", calibration_ids=PATTERN,
                 progress=False)

    calls.clear()
    monkeypatch.setattr(finetune_module, "training_loss", lambda *a: (calls.append(1), real_loss(*a))[1])
    summary = finetune(copy.deepcopy(carved), byte_tokenizer(), _config(), tmp_path / "ft", calibration_ids=PATTERN,
                       resume=True, progress=False)
    assert len(calls) == 8  # steps 5..12: the checkpoint was written after step 4
    assert summary["steps"] == 12


class _RunsCode:
    """Pickled, it asks the loader to call os.system: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_runs_no_code_and_gets_one_sentence(carved, tmp_path):
    work = tmp_path / "ft.partial"
    work.mkdir()
    marker = tmp_path / "code-ran"
    torch.save(dict(trainable={}, optimizer=_RunsCode(marker), state={}), work / "checkpoint.pt")
    with pytest.raises(cmoe.CMoEError, match="cannot be read as a fine-tuning checkpoint") as error:
        finetune(copy.deepcopy(carved), byte_tokenizer(), _config(), tmp_path / "ft", calibration_ids=PATTERN,
                 resume=True, progress=False)
    assert not marker.exists() and "\n" not in str(error.value)


def test_a_partial_folder_without_a_checkpoint_blocks_no_retry(carved, tmp_path):
    (tmp_path / "ft.partial").mkdir()  # what a run that failed before its first checkpoint leaves
    with pytest.raises(cmoe.CMoEError, match="no checkpoint to resume"):
        finetune(copy.deepcopy(carved), byte_tokenizer(), _config(), tmp_path / "ft", calibration_ids=PATTERN,
                 resume=True, progress=False)
    (tmp_path / "ft.partial").mkdir()
    summary = finetune(copy.deepcopy(carved), byte_tokenizer(), _config(samples=4), tmp_path / "ft",
                       calibration_ids=PATTERN, progress=False)
    assert summary["steps"] == 2 and (tmp_path / "ft").is_dir() and not (tmp_path / "ft.partial").exists()


@pytest.mark.parametrize("change", [dict(max_minutes=0), dict(max_minutes=-1), dict(lr=-1e-4), dict(lora_alpha=0),
                                    dict(router_lr=-1.0)])
def test_bad_training_values_are_refused(change):
    with pytest.raises(cmoe.CMoEError) as error:
        _config(**change)
    assert "\n" not in str(error.value)


def test_distillation_needs_a_teacher_and_lowers_the_kl(carved, tmp_path):
    with pytest.raises(cmoe.CMoEError, match="--teacher"):
        finetune(copy.deepcopy(carved), byte_tokenizer(), _config(loss="distill"), tmp_path / "a", calibration_ids=PATTERN)
    teacher = tiny_text_model(seed=1).eval()  # a different network: a KL worth closing
    summary = finetune(copy.deepcopy(carved), byte_tokenizer(), _config(loss="distill"), tmp_path / "b",
                       teacher=teacher, calibration_ids=PATTERN, progress=False)
    assert summary["last_loss"] < summary["first_loss"]


def test_layer_output_term_is_zero_for_the_teacher_itself_and_lowers_with_training(carved, tmp_path):
    teacher = tiny_text_model(seed=1).eval()
    batch = PATTERN[:, :32]
    with torch.no_grad():
        states = teacher(batch, output_hidden_states=True).hidden_states
        student_states = carved(batch, output_hidden_states=True).hidden_states
    assert float(losses.layer_output_error(states, states)) == 0.0
    before = float(losses.layer_output_error(student_states, states))
    assert before > 0.01
    finetune(copy.deepcopy(carved), byte_tokenizer(), _config(loss="distill", hidden_weight=1.0), tmp_path / "out",
             teacher=teacher, calibration_ids=PATTERN, progress=False)
    tuned, _ = load_model(str(tmp_path / "out"))
    with torch.no_grad():
        after = float(losses.layer_output_error(tuned(batch, output_hidden_states=True).hidden_states, states))
    assert after < before


def test_a_layer_output_term_without_a_teacher_loss_or_below_zero_is_refused():
    with pytest.raises(cmoe.CMoEError, match="needs loss='distill'"):
        FinetuneConfig(loss="lm", hidden_weight=1.0)
    with pytest.raises(cmoe.CMoEError, match="hidden_weight must be at least 0"):
        FinetuneConfig(loss="distill", hidden_weight=-1.0)


def test_cosine_schedule_falls_to_zero_by_the_last_step_or_the_time_limit(carved, tmp_path, monkeypatch):
    assert finetune_module.share_done(0.25, 600.0, max_minutes=20) == 0.5  # the time limit is nearer than the steps
    assert finetune_module.share_done(0.75, 600.0, max_minutes=20) == 0.75
    assert finetune_module.share_done(0.25, 10**6, max_minutes=None) == 0.25
    real_set = finetune_module._set_learning_rates
    rates = {}

    def record(optimizer, config, progress):
        real_set(optimizer, config, progress)
        rates.setdefault(config.schedule, []).append([group["lr"] for group in optimizer.param_groups])

    monkeypatch.setattr(finetune_module, "_set_learning_rates", record)
    for schedule in ("cosine", "constant"):
        finetune(copy.deepcopy(carved), byte_tokenizer(), _config(schedule=schedule, lr=1e-2, router_lr=2e-2),
                 tmp_path / schedule, calibration_ids=PATTERN, progress=False)
    cosine, constant = torch.tensor(rates["cosine"]), torch.tensor(rates["constant"])
    assert cosine.shape == (12, 2) and torch.allclose(cosine[0], torch.tensor([1e-2, 2e-2]))
    assert (cosine[1:] < cosine[:-1]).all() and cosine[-1, 0] < 1e-2 * 0.02
    assert torch.allclose(constant, torch.tensor([1e-2, 2e-2]).expand(12, 2))
    with pytest.raises(cmoe.CMoEError, match="schedule must be"):
        FinetuneConfig(schedule="linear")


def test_a_dense_model_is_refused(tmp_path):
    with pytest.raises(cmoe.CMoEError, match="carve the model first"):
        finetune(tiny_text_model(), byte_tokenizer(), _config(), tmp_path / "x", calibration_ids=PATTERN)


def test_cli_finetune_on_a_text_file(carved, tmp_path, capsys):
    from cmoe.tools.cli import main

    carved.save_pretrained(tmp_path / "moe", tokenizer=byte_tokenizer())
    (tmp_path / "train.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    args = ["finetune", str(tmp_path / "moe"), "-o", str(tmp_path / "ft"), "--data", str(tmp_path / "train.txt"),
            "--samples", "4", "--seqlen", "32", "--batch-size", "2"]
    assert main(args) == 0
    assert "fine-tuned 2 steps (128 tokens, " in capsys.readouterr().out
    assert main(args) == 2  # OUT_FT exists now
    assert "already exists" in capsys.readouterr().err


def test_checkpointing_is_used_only_when_the_activations_would_not_fit(carved, tmp_path, monkeypatch):
    def tuned(name, **changes):
        config = _config(samples=4, **changes)
        return finetune(copy.deepcopy(carved), byte_tokenizer(), config, tmp_path / name, calibration_ids=PATTERN,
                        progress=False)["gradient_checkpointing"]

    assert tuned("auto") is False  # a tiny model's activations fit many times over
    assert tuned("forced", gradient_checkpointing=True) is True
    monkeypatch.setattr(finetune_module, "free_memory", lambda device: 1000)
    assert tuned("scarce") is True
    assert tuned("refused", gradient_checkpointing=False) is False


def test_rebalance_evens_a_skewed_load(carved):
    model = copy.deepcopy(carved)
    batches = [PATTERN[:, i * 64 : (i + 1) * 64] for i in range(4)]
    for router in routers(model):
        router.selection_bias.copy_(torch.tensor([2.0, 0.0, 0.0]))  # everything to expert 0
    skewed = finetune_module.expert_load_imbalance(model, batches)
    finetune_module.rebalance(model, batches)
    even = finetune_module.expert_load_imbalance(model, batches)
    assert skewed > 2.5 and even < 1.3


def test_max_minutes_stops_early_and_still_saves(carved, tmp_path):
    summary = finetune(copy.deepcopy(carved), byte_tokenizer(), _config(max_minutes=1e-7), tmp_path / "ft",
                       calibration_ids=PATTERN, progress=False)
    assert summary["stopped_at_time_limit"] and summary["steps"] == 1
    assert load_model(str(tmp_path / "ft"))[0].carve_record["finetune"]["steps"] == 1


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_kl_has_the_value_and_gradient_of_kl_div(temperature):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(37, 101, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = 3 * torch.randn(37, 101, dtype=torch.float64, generator=generator)
    # 37 rows in chunks of 8: the last chunk is short
    fused = losses.distillation_kl(student, teacher, temperature, rows_per_chunk=8)
    (fused_gradient,) = torch.autograd.grad(2 * fused, student)
    log_student = torch.log_softmax(student / temperature, -1)
    log_teacher = torch.log_softmax(teacher / temperature, -1)
    reference = torch.nn.functional.kl_div(log_student, log_teacher, log_target=True, reduction="sum")
    reference = reference * temperature**2 / student.shape[0]
    (reference_gradient,) = torch.autograd.grad(2 * reference, student)
    assert fused.item() == pytest.approx(reference.item(), rel=1e-6)  # the value comes back in float32
    assert torch.allclose(fused_gradient.double(), reference_gradient, rtol=1e-5, atol=1e-9)


def test_distillation_kl_under_bfloat16_autocast_sums_in_float32():
    # fine-tuning runs under autocast; the loss's sums must not follow it down to bfloat16
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(64, 4099, generator=generator).bfloat16().requires_grad_(True)
    teacher = 3 * torch.randn(64, 4099, generator=generator).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = losses.distillation_kl(student, teacher, rows_per_chunk=64)
    (gradient,) = torch.autograd.grad(fused, student)
    log_student, log_teacher = torch.log_softmax(student.double(), -1), torch.log_softmax(teacher.double(), -1)
    reference = torch.nn.functional.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    assert fused.item() == pytest.approx(reference.item(), rel=1e-6)  # float64 sums: the same on every host
    assert gradient.dtype == torch.bfloat16
    expected = (log_student.exp() - log_teacher.exp()) / student.shape[0]
    assert torch.allclose(gradient.double(), expected, rtol=1e-2, atol=1e-6)


def test_precision_sets_autocast_for_the_training_steps(carved, tmp_path, monkeypatch):
    autocast_in_steps = []
    real_loss = finetune_module.training_loss

    def record(*args):
        autocast_in_steps.append(torch.is_autocast_enabled("cpu"))
        return real_loss(*args)

    monkeypatch.setattr(finetune_module, "training_loss", record)
    for precision in ("bfloat16", "float32"):
        summary = finetune(copy.deepcopy(carved), byte_tokenizer(), _config(samples=4, precision=precision),
                           tmp_path / precision, calibration_ids=PATTERN, progress=False)
        assert summary["precision"] == precision
    assert autocast_in_steps == [True, True, False, False]
    with pytest.raises(cmoe.CMoEError, match="precision must be"):
        FinetuneConfig(precision="float16")


def test_auto_precision_takes_bfloat16_only_where_the_hardware_multiplies_it(monkeypatch):
    cpu = torch.device("cpu")
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False)
    assert finetune_module.training_precision("auto", cpu) == "float32"
    assert finetune_module.training_precision("bfloat16", cpu) == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert finetune_module.training_precision("auto", cpu) == "bfloat16"
    assert finetune_module.training_precision("float32", cpu) == "float32"
    for bf16_gpu in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_gpu)
        assert finetune_module.training_precision("auto", torch.device("cuda")) == ("bfloat16" if bf16_gpu else "float32")


def test_wrapping_with_lora_prints_no_deprecation_warning_from_peft(carved):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_lora(copy.deepcopy(carved), FinetuneConfig())
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


@pytest.mark.parametrize("preset", ["fitted", "static", "sparse"])
def test_budget_models_fine_tune(preset, tmp_path):
    model = cmoe.carve_(tiny_text_model(), cmoe.CarveConfig(budget=0.5, preset=preset), PATTERN[:, :256].view(4, 64),
                        progress=False)
    summary = finetune(model, byte_tokenizer(), _config(), tmp_path / "ft", calibration_ids=PATTERN, progress=False)
    assert summary["last_loss"] < summary["first_loss"] - 0.5
    tuned, _ = load_model(str(tmp_path / "ft"))
    assert tuned.config.cmoe.get("router") == {"fitted": "linear", "static": "representative", "sparse": None}[preset]
    assert tuned.carve_record["finetune"]["steps"] == 12
