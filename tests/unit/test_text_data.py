"""Text data: file kinds read with `datasets`, packing, exact resume, peer starts, the held-out
slice, errors that name the file and the line, tokenizers, bounded memory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from peer.tasks.base import TaskError
from peer.tasks.text import (
    HELDOUT_WINDOWS,
    ByteTokenizer,
    DataError,
    HFTokenizer,
    TextData,
    load_tokenizer,
    text_streams,
    tokenizer_hash,
)
from tests.fixtures import corpus_texts, train_tokenizer, write_jsonl_corpus

pytestmark = pytest.mark.timeout(120)

BYTES = ByteTokenizer()
KINDS = (".txt", ".jsonl", ".json", ".parquet")


def write_rows(path: Path, texts: list, field: str = "text") -> Path:
    """texts as one file of path's kind: .txt one text per line, JSON lines, or Parquet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".txt":
        path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({field: texts, "n": list(range(len(texts)))}), path, row_group_size=7)
    else:
        path.write_text("".join(json.dumps({field: t, "n": i}) + "\n" for i, t in enumerate(texts)))
    return path


def make_folder(root: Path, kind: str, files: int = 3, rows: int = 8) -> dict[str, list[str]]:
    """files of `rows` recognisable texts <f:r> of varied lengths; returns {relative path: texts}."""
    written = {}
    for f in range(files):
        texts = [f"<{f}:{r:03d}>" + " word" * ((f * 7 + r * 3) % 6) for r in range(rows)]
        write_rows(root / f"part-{f}{kind}", texts)
        written[f"part-{f}{kind}"] = texts
    return written


def example_bytes(kind: str, texts: list[str], start: int) -> bytes:
    """The token sequence of one file from row `start` under the byte tokenizer."""
    if kind == ".txt":  # one document: its lines, one end-of-text after the last
        return "".join(t + "\n" for t in texts[start:]).encode() + b"\0"
    return b"".join(t.encode() + b"\0" for t in texts[start:])


def expected_bytes(kind: str, written: dict[str, list[str]], order: list[int], file: int, row: int,
                   length: int) -> bytes:
    names = sorted(written)
    out = b"".join(example_bytes(kind, written[names[s]], row if p == file else 0)
                   for p, s in enumerate(order) if p >= file)
    epoch = b"".join(example_bytes(kind, written[names[s]], 0) for s in order)
    while len(out) < length:
        out += epoch
    return out[:length]


def take(stream, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [stream.next_batch() for _ in range(n)]


def sequence(batches) -> bytes:
    """The token sequence the batches cover, after checking each window's shape and shift."""
    tokens = []
    for x, y in batches:
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(x[1:, 0], y[:-1, -1])  # the next window starts where this one's target ends
        tokens.append(x.flatten())
    return bytes(torch.cat(tokens).tolist())


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("kind", KINDS)
def test_kind_is_read_packed_and_resumed_exactly(tmp_path: Path, kind: str) -> None:
    written = make_folder(tmp_path / "data", kind)
    data = TextData(str(tmp_path / "data"), "text", BYTES, 8, heldout=False)
    stream = data.train_stream(3, "peer-a")
    start = stream.state_dict()
    states, batches = [], []
    for _ in range(45):  # epochs of ~500 tokens, 24 a batch
        states.append(stream.state_dict())
        batches.append(stream.next_batch())
    got = sequence(batches)
    assert got == expected_bytes(kind, written, stream.order, start["file"], start["example"], len(got))
    assert len({s["file"] for s in states}) == 3 and states[-1]["epoch"] >= 1
    assert any(s["token"] > 0 for s in states)
    for k in range(0, 42, 3):  # a fresh reader, restored after k batches, goes on exactly
        fresh = TextData(str(tmp_path / "data"), "text", BYTES, 8, heldout=False).train_stream(3, "peer-a")
        fresh.load_state_dict(states[k])
        assert_same(take(fresh, 3), batches[k : k + 3])


def test_txt_file_is_one_document(tmp_path: Path) -> None:
    write_rows(tmp_path / "a.txt", ["first line", "second line", "third line"] * 20)
    stream = TextData(str(tmp_path / "a.txt"), "text", BYTES, 16, heldout=False).train_stream(2, "k")
    got = sequence(take(stream, 60))
    assert got.count(b"\0") >= 1
    assert all(piece.startswith(b"first line\nsecond line\n") for piece in got.split(b"\0")[1:-1])


def test_json_array_file_is_read_and_its_bad_item_located(tmp_path: Path) -> None:
    rows = [{"text": f"<a{i:02d}>", "n": i} for i in range(40)]
    (tmp_path / "rows.json").write_text(json.dumps(rows, indent=1))
    data = TextData(str(tmp_path / "rows.json"), "text", BYTES, 8, heldout=False)
    stream = data.train_stream(2, "k")
    start = stream.state_dict()["example"]
    batches = take(stream, 10)
    assert sequence(batches).startswith(b"".join(f"<a{i:02d}>".encode() + b"\0" for i in range(start, 40))[:160])
    fresh = data.train_stream(2, "k")
    fresh.load_state_dict(stream.state_dict())
    assert_same(take(fresh, 3), take(stream, 3))
    (tmp_path / "rows.json").write_text(json.dumps([*rows[:5], {"text": None}], indent=1))  # 4 lines an item
    with pytest.raises(DataError, match=r"rows\.json line 22 \(item 6 of the array\): field 'text' is null"):
        TextData(str(tmp_path / "rows.json"), "text", BYTES, 8, heldout=False)


def test_folder_lists_data_files_recursively_in_sorted_order(tmp_path: Path) -> None:
    write_rows(tmp_path / "b" / "z.jsonl", [f"z{i}" for i in range(40)])
    write_rows(tmp_path / "a.txt", ["a line"] * 40)
    write_rows(tmp_path / "b" / "c" / "y.parquet", ["y"] * 40)
    write_rows(tmp_path / ".cache" / "hidden.jsonl", ["hidden"])
    (tmp_path / "README.md").write_text("ignored")
    data = TextData(str(tmp_path), "text", BYTES, 8, heldout=False)
    assert [f.rel for f in data.files] == ["a.txt", "b/c/y.parquet", "b/z.jsonl"]
    assert data.describe().startswith(f"{tmp_path}: 3 files (.jsonl, .parquet, .txt), ")


def test_peer_keys_start_apart_and_one_key_starts_alike(tmp_path: Path) -> None:
    write_rows(tmp_path / "one.jsonl", [f"row {i:02d} of one file" for i in range(60)])
    data = TextData(str(tmp_path / "one.jsonl"), "text", BYTES, 8, heldout=False)
    starts = {data.train_stream(2, f"peer-{i}").state_dict()["example"] for i in range(8)}
    assert len(starts) >= 4
    assert_same(take(data.train_stream(2, "peer-3"), 2), take(data.train_stream(2, "peer-3"), 2))
    make_folder(tmp_path / "many", ".jsonl", files=5, rows=30)
    many = TextData(str(tmp_path / "many"), "text", BYTES, 8, heldout=False)
    assert len({tuple(many.train_stream(2, f"peer-{i}").order) for i in range(8)}) >= 3


def heldout_ids(written: dict[str, list[str]], seq_len: int) -> set[str]:
    """The examples touched by the first HELDOUT_WINDOWS windows in sorted order (byte tokens)."""
    need, offset, touched = HELDOUT_WINDOWS * seq_len + 1, 0, set()
    for name in sorted(written):
        for text in written[name]:
            if offset < need:
                touched.add(text.split(">")[0] + ">")
            offset += len(text.encode()) + 1
    return touched


def test_heldout_is_fixed_and_never_trained_on(tmp_path: Path) -> None:
    written = make_folder(tmp_path / "data", ".jsonl", files=3, rows=60)
    path = str(tmp_path / "data")
    every = {t.split(">")[0] + ">" for texts in written.values() for t in texts}
    held = heldout_ids(written, 8)
    assert 0 < len(held) < len(every) / 2
    windows = []
    for key, batch_size in (("a", 4), ("b", 5), ("c", 16)):
        stream, evals, description = text_streams(path, "", "text", BYTES, 8, batch_size, 100, key)
        assert "3 files (.jsonl)" in description
        assert [len(x) for x, _ in evals][:-1] == [batch_size] * (len(evals) - 1)
        windows.append(torch.cat([x for x, _ in evals]))
        trained = sequence(take(stream, 200)).decode()
        seen = set(re.findall(r"<\d:\d{3}>", trained))
        assert not seen & held
        assert seen == every - held
    assert all(torch.equal(w, windows[0]) for w in windows) and len(windows[0]) == HELDOUT_WINDOWS
    first = sorted(written)[0]
    assert bytes(windows[0][0].tolist()) == (written[first][0].encode() + b"\0" + written[first][1].encode())[:8]
    _, evals, _ = text_streams(path, "", "text", BYTES, 8, 5, 3, "a")
    assert len(evals) == 3 and torch.equal(torch.cat([x for x, _ in evals]), windows[0][:15])
    assert text_streams(path, "", "text", BYTES, 8, 5, 0, "a")[1] == []


def test_eval_data_is_held_out_whole_and_data_trained_on_whole(tmp_path: Path) -> None:
    written = make_folder(tmp_path / "data", ".jsonl", files=2, rows=40)
    write_rows(tmp_path / "eval.txt", [f"eval line {i}" for i in range(300)])
    stream, evals, description = text_streams(str(tmp_path / "data"), str(tmp_path / "eval.txt"), "text",
                                              BYTES, 8, 10, 20, "a")
    assert "eval data" in description
    assert len(evals) == 20 and bytes(evals[0][0][0].tolist()) == b"eval lin"
    seen = set(re.findall(r"<\d:\d{3}>", sequence(take(stream, 150)).decode()))
    assert seen == {t.split(">")[0] + ">" for texts in written.values() for t in texts}


def test_bad_data_names_the_file_and_the_line(tmp_path: Path) -> None:
    def error(path: Path, field: str = "text") -> str:
        with pytest.raises(DataError) as e:
            TextData(str(path), field, BYTES, 8, heldout=False)
        return str(e.value)

    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert "empty.jsonl" in error(tmp_path / "empty.jsonl") and "empty" in error(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    assert "blank.jsonl" in error(tmp_path / "blank.jsonl") and "no examples" in error(tmp_path / "blank.jsonl")
    lines = [json.dumps({"text": "fine"}), "", json.dumps({"text": "also fine"})]
    (tmp_path / "missing.jsonl").write_text("\n".join([*lines, json.dumps({"body": "x"})]) + "\n")
    assert re.search(r"missing\.jsonl line 4: no field 'text'", error(tmp_path / "missing.jsonl"))
    (tmp_path / "number.jsonl").write_text("\n".join([*lines, "", json.dumps({"text": 7})]) + "\n")
    assert re.search(r"number\.jsonl line 5: field 'text' is a number", error(tmp_path / "number.jsonl"))
    (tmp_path / "broken.json").write_text("\n".join([*lines, '{"text": "unterminated']) + "\n")
    assert re.search(r"broken\.json line 4: not valid JSON", error(tmp_path / "broken.json"))
    (tmp_path / "latin1.txt").write_bytes(b"good line\nstill good\ncaf\xe9 au lait\n")
    assert re.search(r"latin1\.txt line 3: not valid UTF-8", error(tmp_path / "latin1.txt"))
    write_rows(tmp_path / "rows.parquet", ["a", "b"])
    assert re.search(r"rows\.parquet row 1: no field 'body'", error(tmp_path / "rows.parquet", "body"))
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.md").write_text("# not data")
    (tmp_path / "nothing" / ".hidden.jsonl").write_text(json.dumps({"text": "hidden"}))
    assert re.search(r"nothing: no usable file.*\.jsonl", error(tmp_path / "nothing"))
    assert "not a data file" in error(tmp_path / "nothing" / "notes.md")
    assert "no such file" in error(tmp_path / "absent")


def test_errors_past_the_checked_rows_name_the_line_while_streaming(tmp_path: Path) -> None:
    good = [json.dumps({"text": f"row {i}"}) for i in range(1100)]
    cases = {"late.jsonl": ([*good, "", "{oops"], r"late\.jsonl line 1102: not valid JSON"),
             "mixed.jsonl": ([*good, json.dumps({"text": 5})], r"mixed\.jsonl line 1101: field 'text' is a number")}
    for name, (lines, message) in cases.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        data = TextData(str(tmp_path / name), "text", BYTES, 8, heldout=False)
        with pytest.raises(DataError, match=message):  # counting the rows for the start may meet it first
            take(data.train_stream(64, "k"), 100)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["ok"] * 1200 + [None] + ["ok"] * 10}), tmp_path / "nulls.parquet")
    data = TextData(str(tmp_path / "nulls.parquet"), "text", BYTES, 8, heldout=False)
    with pytest.raises(DataError, match=r"nulls\.parquet row 1201: field 'text' is null"):
        take(data.train_stream(64, "k"), 100)


def test_position_of_other_data_is_refused(tmp_path: Path) -> None:
    make_folder(tmp_path / "data", ".jsonl", files=2, rows=40)
    stream = TextData(str(tmp_path / "data"), "text", BYTES, 8, heldout=False).train_stream(2, "a")
    take(stream, 3)
    state = stream.state_dict()
    other_key = TextData(str(tmp_path / "data"), "text", BYTES, 8, heldout=False).train_stream(2, "b")
    with pytest.raises(DataError, match="changed since the checkpoint"):
        other_key.load_state_dict(state)
    with open(tmp_path / "data" / "part-1.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more row"}) + "\n")
    grown = TextData(str(tmp_path / "data"), "text", BYTES, 8, heldout=False).train_stream(2, "a")
    with pytest.raises(DataError, match="changed since the checkpoint"):
        grown.load_state_dict(state)
    with pytest.raises(DataError, match="lacks"):
        grown.load_state_dict({"epoch": 0})


def test_too_little_data_says_how_many_tokens(tmp_path: Path) -> None:
    write_rows(tmp_path / "small.jsonl", ["x" * 100] * 10)  # 1010 tokens
    with pytest.raises(DataError, match=r"small\.jsonl: too little data: 1010 tokens.*1025 tokens"):
        TextData(str(tmp_path / "small.jsonl"), "text", BYTES, 8)
    with pytest.raises(DataError, match="1010 tokens.*at least 4097"):
        TextData(str(tmp_path / "small.jsonl"), "text", BYTES, 1024, heldout=False).train_stream(1, "k")


def test_hf_tokenizer_trained_here(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    folder = train_tokenizer(tmp_path / "tok", corpus_texts(300), vocab_size=400)
    tok = load_tokenizer(str(folder))
    assert isinstance(tok, HFTokenizer) and tok.name == "tok"
    assert tok.hash == tokenizer_hash(str(folder)) != "bytes" and len(tok.hash) == 16
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.eot_id == raw.token_to_id("<|endoftext|>") and 300 <= tok.vocab_size <= 400
    texts = ["The cat sees the ball in the garden.", "Unknown wörds ∑ still encode"]
    assert tok.encode_batch(texts) == [raw.encode(t).ids for t in texts]
    assert tok.encode_batch(texts) == tok._tok(texts, add_special_tokens=False)["input_ids"]
    assert tok.save(tmp_path / "saved") and (tmp_path / "saved" / "tokenizer_config.json").exists()
    again = load_tokenizer(str(tmp_path / "saved"))  # through AutoTokenizer, with the config
    assert again.eot_id == tok.eot_id and again.encode_batch(texts) == tok.encode_batch(texts)

    corpus = write_jsonl_corpus(tmp_path / "corpus", n_files=2, rows_per_file=60)
    data = TextData(str(corpus), "text", tok, 16)
    assert "tokenizer tok" in data.describe()
    stream = data.train_stream(4, "peer-a")
    batches = take(stream, 12)
    tokens = torch.cat([x.flatten() for x, _ in batches])
    assert (tokens == tok.eot_id).sum() >= 2 and int(tokens.max()) < tok.vocab_size
    between = np.split(tokens.numpy(), np.flatnonzero(tokens.numpy() == tok.eot_id))[1]
    assert raw.decode(between[1:].tolist()).startswith(("The ", "A ", "My ", "We "))
    fresh = TextData(str(corpus), "text", tok, 16).train_stream(4, "peer-a")
    stream2 = data.train_stream(4, "peer-a")
    take(stream2, 5)
    fresh.load_state_dict(stream2.state_dict())
    assert_same(take(fresh, 7), batches[5:])


def test_tokenizer_errors(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    assert tokenizer_hash("") == "bytes" and isinstance(load_tokenizer(""), ByteTokenizer)
    with pytest.raises(TaskError, match="absent: no such folder"):
        tokenizer_hash(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskError, match="empty holds no tokenizer file.*tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain.train_from_iterator(corpus_texts(50), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    (tmp_path / "no_eot").mkdir()
    plain.save(str(tmp_path / "no_eot" / "tokenizer.json"))
    with pytest.raises(TaskError, match="no_eot has no end-of-text token.*add_special_tokens"):
        load_tokenizer(str(tmp_path / "no_eot"))


def test_memory_stays_bounded_while_streaming_a_big_file(tmp_path: Path) -> None:
    import psutil

    path = tmp_path / "big.jsonl"
    texts = corpus_texts(200, seed=1)
    with open(path, "w") as f:
        for i in range(14_000):  # ~48 MB
            f.write(json.dumps({"text": texts[i % 200] * 16, "id": i}) + "\n")
    size = path.stat().st_size
    stream = TextData(str(path), "text", BYTES, 1024, heldout=False).train_stream(16, "k")
    process = psutil.Process()
    take(stream, 20)
    warm = peak = process.memory_info().rss
    for i in range(size // (16 * 1024) + 1):  # the whole file, once
        stream.next_batch()
        if i % 50 == 0:
            peak = max(peak, process.memory_info().rss)
    assert peak - warm < size / 3, f"RSS grew {(peak - warm) / 1e6:.0f} MB streaming {size / 1e6:.0f} MB"


def test_position_survives_a_checkpoint_file(tmp_path: Path) -> None:
    """The stream's position, fingerprint included, goes through a real checkpoint file unchanged,
    with the run spec and asset paths `peer export` reads; the restored stream goes on exactly."""
    from peer.checkpoint import Checkpoint, latest, save_round
    from peer.config import RunSpec
    from peer.outer import GlobalState

    make_folder(tmp_path / "data", ".jsonl")
    stream = TextData(str(tmp_path / "data"), "text", BYTES, 8, heldout=False).train_stream(3, "peer-a")
    take(stream, 7)
    theta = torch.zeros(10)
    spec = RunSpec(model="tiny").to_record()
    save_round(tmp_path / "ckpt", Checkpoint(GlobalState(theta, theta.clone(), 3, 30), "run", "h", "p", {},
                                             stream.state_dict(), {}, {}, spec, {"tokenizer_path": "/x"}))
    loaded = latest(tmp_path / "ckpt")
    assert loaded.data == stream.state_dict() and loaded.spec == spec and loaded.assets == {"tokenizer_path": "/x"}
    fresh = TextData(str(tmp_path / "data"), "text", BYTES, 8, heldout=False).train_stream(3, "peer-a")
    fresh.load_state_dict(loaded.data)
    assert_same(take(fresh, 3), take(stream, 3))
