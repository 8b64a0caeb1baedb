import json

import pytest
import torch

from tiertune.config import DataConfig
from tiertune.errors import DataError
from tiertune.launch.corpus import Example, read_examples
from tiertune.launch.data import (
    IGNORE_INDEX,
    BatchStream,
    build_splits,
    count_targets,
    pack,
    split_examples,
    tokenize,
)
from tiertune.launch.datasets import arithmetic
from tiertune.launch.tokenizer import byte_tokenizer

TOK = byte_tokenizer()
BOS, EOS, PAD = TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id


def jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_byte_tokenizer_round_trips_any_text():
    text = "héllo wörld ✓ 12+3=15\n\ttabs"
    ids = TOK(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert TOK.decode(ids) == text


def test_jsonl_text_and_prompt_completion_rows(tmp_path):
    path = jsonl(
        tmp_path, [{"text": "plain"}, {"prompt": "Q:", "completion": " A"}, "", {"text": "x", "id": 3}]
    )
    assert read_examples(path) == [Example("plain"), Example(" A", prompt="Q:"), Example("x")]


def test_loss_is_on_the_completion_only():
    ((ids, labels),) = tokenize([Example(" 42", prompt="Q: 40+2?")], TOK)
    assert ids == [BOS, *b"Q: 40+2?", *b" 42", EOS]
    assert labels == [IGNORE_INDEX] * (1 + len("Q: 40+2?")) + [*b" 42", EOS]


def test_text_rows_train_on_every_token_but_bos():
    ((ids, labels),) = tokenize([Example("abc")], TOK)
    assert labels == [IGNORE_INDEX, *b"abc", EOS] and ids == [BOS, *b"abc", EOS]


def test_packing_lays_examples_end_to_end_and_masks_the_padding():
    seqs = tokenize([Example("abcd"), Example("xy", prompt="p")], TOK)
    rows = pack(seqs, seq_len=4, pad_id=PAD)
    flat_ids = [BOS, *b"abcd", EOS, BOS, *b"p", *b"xy", EOS]
    assert rows.input_ids.shape == (3, 4)
    assert rows.input_ids.flatten().tolist() == flat_ids + [PAD]
    assert rows.labels.flatten().tolist()[-1] == IGNORE_INDEX
    assert rows.labels.flatten().tolist()[6:8] == [IGNORE_INDEX, IGNORE_INDEX]  # <bos> p
    assert count_targets(rows.labels) == sum(1 for x in rows.labels[:, 1:].flatten() if x != IGNORE_INDEX)


def test_plain_text_splits_on_blank_lines_or_lines(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nstill first\n\nsecond\n")
    (tmp_path / "b.txt").write_text("line one\nline two\n")
    assert [e.completion for e in read_examples(tmp_path / "a.txt")] == ["first para\nstill first", "second"]
    assert [e.completion for e in read_examples(tmp_path / "b.txt")] == ["line one", "line two"]


def test_bad_jsonl_rows_are_reported_with_line_numbers(tmp_path):
    path = jsonl(tmp_path, [{"text": "ok"}, "{not json", {"prompt": "only prompt"}, {"other": 1}, [1, 2]])
    with pytest.raises(DataError) as info:
        read_examples(path)
    message = str(info.value)
    for fragment in [
        "4 bad row(s)",
        "line 2: not valid JSON",
        "line 3: 'prompt' and 'completion'",
        "line 4: no 'text'",
        "line 5: expected a JSON object",
    ]:
        assert fragment in message


@pytest.mark.parametrize(
    "content, fragment",
    [(None, "does not exist"), ("", "no usable examples"), (b"\xff\xfe\x00", "not UTF-8")],
)
def test_unusable_files(tmp_path, content, fragment):
    path = tmp_path / "d.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=fragment):
        read_examples(path)


def test_split_is_seeded_disjoint_and_complete():
    examples = [Example(str(i)) for i in range(100)]
    train, held = split_examples(examples, 0.1, seed=5)
    assert len(held) == 10 and len(train) == 90
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(examples)
    assert split_examples(examples, 0.1, seed=5) == (train, held)
    assert split_examples(examples, 0.1, seed=6)[1] != held


def test_batch_order_is_seeded_covers_each_epoch_and_resumes_from_a_position():
    rows = pack(tokenize([Example(f"row {i:03d}") for i in range(10)], TOK), seq_len=8, pad_id=PAD)
    n = len(rows)
    stream = BatchStream(rows, batch_size=3, seed=1)
    seen = torch.cat([stream.next_indices() for _ in range(2 * n)])  # 6 epochs of rows
    for epoch in range(6):
        assert sorted(seen[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(seen[:n], seen[n : 2 * n])  # a fresh order every epoch
    resumed = BatchStream(rows, batch_size=3, seed=1, position=9)
    assert torch.equal(torch.cat([resumed.next_indices() for _ in range(4)]), seen[9:21])
    other = BatchStream(rows, batch_size=3, seed=2)
    assert not torch.equal(torch.cat([other.next_indices() for _ in range(3)]), seen[:9])


def test_builtin_dataset_is_fixed_and_answers_are_correct():
    a, b = arithmetic(200), arithmetic(200)
    assert a == b
    for ex in a:
        if "+" in ex.prompt:
            x, y = map(int, ex.prompt.split("What is ")[1].split("?")[0].split(" + "))
            assert int(ex.completion) == x + y


def test_build_splits_on_a_file(tmp_path):
    path = jsonl(tmp_path, [{"prompt": f"Q{i}:", "completion": f" {i}"} for i in range(40)])
    splits = build_splits(DataConfig(path=str(path), seq_len=16, eval_fraction=0.25), TOK, seed=0)
    assert len(splits.eval_examples) == 10
    assert splits.train.input_ids.shape[1] == 16 and len(splits.eval) > 0
