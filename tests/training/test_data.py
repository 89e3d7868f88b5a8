import gzip

import pytest

from edge_runtime.errors import DataError
from edge_runtime.training.data import encode_batch, load_builtin, load_dataset
from edge_runtime.training.models import build_word_tokenizer
from tests.conftest import write_jsonl


def test_jsonl_classification_labels_sorted_and_encoded(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b", "label": "zeta"}, "", {"text": "c", "label": "alpha"}])
    ds = load_dataset(p)
    assert ds.kind == "classification"
    assert ds.label_names == ("alpha", "zeta")
    assert ds.targets == (1, 0)
    assert ds.inputs == ("a b", "c")


def test_fixed_label_space_and_unknown_label(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": "b"}])
    assert load_dataset(p, label_names=["a", "b", "c"]).targets == (1,)
    with pytest.raises(DataError, match="1 row\\(s\\) have labels outside the run's 1 labels: 'q'"):
        load_dataset(write_jsonl(tmp_path / "e.jsonl", [{"text": "x", "label": "q"}]), label_names=["a"])
    with pytest.raises(DataError, match="outside the run's 2 labels: 5"):    # an integer id past the label space
        load_dataset(write_jsonl(tmp_path / "f.jsonl", [{"text": "x", "label": 5}]), label_names=["a", "b"])


def test_generation_rows(tmp_path):
    p = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "hi", "response": "there"}])
    ds = load_dataset(p)
    assert ds.kind == "generation" and ds.targets == ("there",) and ds.label_names == ()


def test_csv_with_integer_labels(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"hello, world",2\nbye,0\n', encoding="utf-8")
    ds = load_dataset(p)
    assert ds.inputs == ("hello, world", "bye") and ds.targets == (2, 0)
    assert ds.label_names == ("0", "1", "2")


def test_gzip_jsonl(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"text": "a", "label": "x"}\n'))
    assert len(load_dataset(p)) == 1


def test_bad_rows_are_all_reported_with_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [
        {"text": "fine", "label": "a"},
        "{not json",
        {"text": "", "label": "a"},
        {"txt": "typo", "label": "a"},
        {"text": "x", "label": 1.5},
        {"text": "x", "label": True},
        [1, 2],
        {"prompt": "p", "response": "r"},
    ])
    with pytest.raises(DataError) as err:
        load_dataset(p)
    msg = str(err.value)
    assert msg.startswith(f"7 bad row(s) in {p}")
    for line, what in [(2, "not valid JSON"), (3, "'text' must be a non-empty string"), (4, "has keys ['label', 'txt']"),
                       (5, "'label' must be a string or an integer"), (6, "'label' must be a string or an integer"), (7, "expected an object"),
                       (8, "a generation row in a classification file")]:
        row_msg = next(m for m in msg.splitlines() if m.startswith(f"{p}:{line}: "))
        assert what in row_msg


def test_csv_wrong_column_count_names_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\nok,a\ntoo,many,cols\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{p}:3: wrong number of columns"):
        load_dataset(p)


@pytest.mark.parametrize("content, message", [(b"", "no data rows"), (b"\xff\xfe\x00", "UTF-8")])
def test_empty_or_binary_file(tmp_path, content, message):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_dataset(p)


def test_missing_file():
    with pytest.raises(DataError, match="no such data file"):
        load_dataset("/nonexistent/file.jsonl")


def test_builtin_wordnet_is_the_full_noun_task():
    ds = load_builtin("wordnet")
    assert len(ds) == 82115
    assert len(ds.label_names) == 26
    assert "noun.animal" in ds.label_names and "noun.Tops" in ds.label_names
    dog = next(i for i, t in enumerate(ds.inputs) if t.startswith("a member of the genus Canis"))
    assert ds.label_names[ds.targets[dog]] == "noun.animal"


def test_encode_batch_masks_prompt_for_generation(tmp_path):
    p = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "what is it", "response": "a dog"}])
    ds = load_dataset(p)
    tok = build_word_tokenizer(["what is it a dog"])
    batch = encode_batch(tok, ds, [0], max_length=32)
    labels = batch["labels"][0].tolist()
    assert labels[:3] == [-100, -100, -100]                        # prompt tokens carry no loss
    assert labels[3:] == tok("a dog")["input_ids"] + [tok.eos_token_id]
    assert batch["attention_mask"].sum().item() == 6
