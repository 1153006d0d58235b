"""`sinklm data prepare`: exact tokenization, EOS per document, reproducible shards, every source kind."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from data.corpora import read_book
from data.prepare import main, prepare
from data.tokenizing import piece_cuts_are_exact, split_document
from data.shards import DataError, TokenStream, read_manifest
from data.sources import FilesSource, HFDatasetSource
from data.tokenizer import load_tokenizer, tokenizer_state


@pytest.fixture(scope="module")
def neox():
    return load_tokenizer()


@pytest.fixture(scope="module")
def docs():
    """Real documents: a long excerpt (cut into pieces), a Latin-1 book excerpt, a short one, an empty one."""
    return [read_book("melville-moby_dick")[:150_000], read_book("chesterton-ball")[:30_000], "Short doc.", ""]


def _split_tokens(data_dir, split="train") -> np.ndarray:
    stream = TokenStream(data_dir, split)
    return stream[0 : len(stream)]


def _expected(neox, texts) -> np.ndarray:
    ids: list[int] = []
    for text in texts:
        if not text.strip():
            continue  # empty documents are skipped (and counted), never one lone EOS
        ids += neox.encode(text, add_special_tokens=False) + [neox.eos_token_id]
    return np.array(ids)


def test_piece_cuts_give_the_same_ids_as_whole_documents(neox):
    """Prevents parallel tokenization from changing the data: cutting long books at line starts and
    tokenizing the pieces gives exactly the ids of tokenizing each book whole (incl. Latin-1 and CRLF books)."""
    assert piece_cuts_are_exact(tokenizer_state(neox))
    for name in ("melville-moby_dick", "chesterton-ball", "bible-kjv", "whitman-leaves"):
        text = read_book(name)[:120_000]
        pieces = split_document(text, piece_chars=3_000)
        assert len(pieces) > 20 and "".join(pieces) == text
        whole = neox.encode(text, add_special_tokens=False)
        cut = [i for piece in pieces for i in neox.encode(piece, add_special_tokens=False)]
        assert cut == whole, name


def test_eos_after_every_document_and_identical_reruns(tmp_path, neox, docs):
    """Prevents merged documents and non-reproducible data: the stream is each document's ids followed by
    EOS (0), and in-process vs 2 worker processes, small shards vs one, give byte-identical shards and manifest."""
    one = prepare(tmp_path / "one", {"train": docs}, workers=1, progress=False, tokenizer=neox)
    two = prepare(tmp_path / "two", {"train": docs}, workers=2, progress=False, tokenizer=neox)
    expected = _expected(neox, docs)
    assert np.array_equal(_split_tokens(tmp_path / "one"), expected)
    assert one.manifest == two.manifest
    assert one.manifest["splits"]["train"]["documents"] == 3
    assert one.manifest["splits"]["train"]["empty_documents_skipped"] == 1
    assert one.manifest["splits"]["train"]["tokens"] == len(expected)
    assert one.manifest["tokenizer"]["vocab_size"] == 50277 and one.manifest["tokenizer"]["eos_id"] == 0
    assert one.manifest["dtype"] == "uint16"
    for entry in one.manifest["splits"]["train"]["shards"]:
        assert (tmp_path / "one" / entry["file"]).read_bytes() == (tmp_path / "two" / entry["file"]).read_bytes()
    assert (tmp_path / "one" / "manifest.json").read_bytes() == (tmp_path / "two" / "manifest.json").read_bytes()
    sharded = prepare(tmp_path / "sharded", {"train": docs}, workers=1, shard_tokens=10_000, progress=False)
    assert len(sharded.manifest["splits"]["train"]["shards"]) == -(-len(expected) // 10_000)
    assert np.array_equal(_split_tokens(tmp_path / "sharded"), expected)
    with pytest.raises(DataError, match="already exists and is not empty: pass --overwrite"):
        prepare(tmp_path / "one", {"train": docs}, workers=1, progress=False, tokenizer=neox)


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, neox, docs):
    """Prevents a crash mid-run from leaving a folder that a loader would accept: no manifest, no
    final-named shard of the failed split, no temporary files."""

    def failing():
        yield docs[0]
        raise KeyboardInterrupt

    from data.sources import Source

    class Failing(Source):
        def documents(self):
            return failing()

        def describe(self):
            return {"kind": "failing"}

    with pytest.raises(KeyboardInterrupt):
        splits = {"validation": [docs[1]], "train": Failing()}
        prepare(tmp_path, splits, workers=1, shard_tokens=5_000, progress=False, tokenizer=neox)
    assert list(tmp_path.iterdir()) == []


def test_file_sources_txt_jsonl_json_parquet(tmp_path, neox, docs):
    """Prevents a source kind from dropping, reordering or mangling documents: .txt folders (incl. Latin-1 +
    CRLF bytes), .jsonl, .json and .parquet all give the same tokens as the documents themselves."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = docs[:3]
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, text in enumerate(texts):
        raw = text.encode("latin-1", errors="replace") if i == 1 else text.replace("\n", "\r\n").encode("utf-8")
        (folder / f"{i:02d}.txt").write_bytes(raw)
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    (tmp_path / "docs.json").write_text(json.dumps([{"body": t} for t in texts]))
    pq.write_table(pa.table({"content": texts}), tmp_path / "docs.parquet", row_group_size=1)
    expected = _expected(neox, texts)
    for name, source in {
        "txt": FilesSource([folder]),
        "jsonl": FilesSource([tmp_path / "docs.jsonl"]),
        "json": FilesSource([tmp_path / "docs.json"], text_field="body"),
        "parquet": FilesSource([tmp_path / "docs.parquet"], text_field="content"),
    }.items():
        prepare(tmp_path / f"out-{name}", {"train": source}, workers=1, progress=False, tokenizer=neox)
        assert np.array_equal(_split_tokens(tmp_path / f"out-{name}"), expected), name
    with pytest.raises(DataError, match=r"docs.jsonl:1: no text field 'body' \(fields: id, text\)"):
        prepare(tmp_path / "bad", {"train": FilesSource([tmp_path / "docs.jsonl"], text_field="body")}, workers=1, progress=False, tokenizer=neox)
    with pytest.raises(DataError, match=r"docs.parquet: no text column 'text' \(columns: content\)"):
        prepare(tmp_path / "bad2", {"train": FilesSource([tmp_path / "docs.parquet"])}, workers=1, progress=False, tokenizer=neox)


def test_hf_datasets_save_to_disk_and_json_builder(tmp_path, neox, docs):
    """Prevents the Hugging Face path from breaking offline: a save_to_disk folder (Dataset and
    DatasetDict, streamed or not) and the `json` builder on a local file give the documents' tokens."""
    import datasets

    texts = docs[:3]
    expected = _expected(neox, texts)
    datasets.Dataset.from_dict({"text": texts, "n": [1, 2, 3]}).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": texts}), "validation": datasets.Dataset.from_dict({"text": texts[2:]})}
    ).save_to_disk(str(tmp_path / "dsd"))
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    sources = {
        "disk": {"train": HFDatasetSource(str(tmp_path / "ds"))},
        "disk-stream": {"train": HFDatasetSource(str(tmp_path / "ds"), streaming=True)},
        "dict": {"train": HFDatasetSource(str(tmp_path / "dsd")), "validation": HFDatasetSource(str(tmp_path / "dsd"), split="validation")},
        "json": {"train": HFDatasetSource("json", data_files=[str(tmp_path / "docs.jsonl")], cache_dir=str(tmp_path / "cache"))},
        "json-stream": {"train": HFDatasetSource("json", data_files=[str(tmp_path / "docs.jsonl")], streaming=True)},
    }
    for name, splits in sources.items():
        result = prepare(tmp_path / f"out-{name}", splits, workers=1, progress=False, tokenizer=neox)
        assert np.array_equal(_split_tokens(tmp_path / f"out-{name}"), expected), name
        assert result.manifest["splits"]["train"]["source"]["kind"] == "hf-dataset"
    assert np.array_equal(_split_tokens(tmp_path / "out-dict", "validation"), _expected(neox, texts[2:]))
    # The same through the command line, with a document limit per split.
    argv = ["--dataset", str(tmp_path / "dsd"), "--validation-split", "validation", "--max-docs", "2"]
    assert main([*argv, "--out", str(tmp_path / "out-cli"), "--workers", "1", "--no-progress"]) == 0
    assert np.array_equal(_split_tokens(tmp_path / "out-cli"), _expected(neox, texts[:2]))
    assert read_manifest(tmp_path / "out-cli")["splits"]["validation"]["documents"] == 1
    with pytest.raises(DataError, match="no split 'test'; it has train, validation"):
        prepare(tmp_path / "bad", {"train": HFDatasetSource(str(tmp_path / "dsd"), split="test")}, workers=1, progress=False, tokenizer=neox)


def test_large_vocabulary_uses_uint32(tmp_path):
    """Prevents silent id overflow: a tokenizer with more than 65,536 tokens gets uint32 shards."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 70_000)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    result = prepare(tmp_path / "out", {"train": ["w69999 w5", "w65537"]}, tokenizer=str(tmp_path / "big.json"), workers=1, progress=False)
    assert result.manifest["dtype"] == "uint32" and result.manifest["tokenizer"]["vocab_size"] == 70_000
    assert _split_tokens(tmp_path / "out").tolist() == [69999, 5, 0, 65537, 0]


def test_cli(tmp_path, neox, docs, capsys):
    """Prevents a broken command line: `sinklm data prepare` help works, a folder of .txt files is
    prepared with a validation split, and bad input is a clear error with exit code 2."""
    from sinklm.cli import main as sinklm_main

    with pytest.raises(SystemExit) as exit_info:
        sinklm_main(["data", "prepare", "--help"])
    assert exit_info.value.code == 0 and "--text-field" in capsys.readouterr().out
    (tmp_path / "a.txt").write_text(docs[1])
    (tmp_path / "b.txt").write_text(docs[2])
    out = tmp_path / "out"
    argv = ["data", "prepare", str(tmp_path / "a.txt"), "--validation", str(tmp_path / "b.txt"), "--out", str(out), "--workers", "1", "--no-progress"]
    assert sinklm_main(argv) == 0
    assert "tokens/s" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["splits"]["train"]["documents"] == 1 and manifest["splits"]["validation"]["documents"] == 1
    assert sinklm_main(argv) == 2
    assert "already exists and is not empty: pass --overwrite" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "x"), str(tmp_path / "missing.txt")]) == 2
    assert f"input not found: {tmp_path / 'missing.txt'}" in capsys.readouterr().err
    (tmp_path / "c.csv").write_text("a,b")
    assert main(["--out", str(tmp_path / "x"), str(tmp_path / "c.csv")]) == 2
    assert "c.csv: unsupported file type '.csv'" in capsys.readouterr().err
    help_text = subprocess.run([sys.executable, "-m", "data.prepare", "--help"], capture_output=True, text=True, check=True)
    assert "--dataset" in help_text.stdout and "--streaming" in help_text.stdout


def test_encoding_errors_replace_only_when_asked(tmp_path, neox):
    """Prevents both a traceback on bad UTF-8 and a silent repair: strict names file:line, and only
    --encoding-errors replace turns the bad byte into U+FFFD."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert main(["--out", str(tmp_path / "strict"), "--workers", "1", "--no-progress", str(bad)]) == 2
    assert not (tmp_path / "strict").exists()
    assert main(["--out", str(tmp_path / "replaced"), "--workers", "1", "--no-progress", "--encoding-errors", "replace", str(bad)]) == 0
    expected = _expected(neox, ["fine", "caf\ufffd"])
    assert np.array_equal(_split_tokens(tmp_path / "replaced"), expected)
