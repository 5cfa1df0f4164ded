"""Test data made on the spot: a small English-like corpus a tiny model learns within a few hundred
steps, written as JSON lines, and a BPE tokenizer trained on it. No network, seconds at most."""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = ("the cat", "the dog", "a bird", "my friend", "the teacher", "a child", "the old man", "the farmer")
VERBS = ("sees", "likes", "finds", "follows", "helps", "watches", "calls", "feeds")
OBJECTS = ("the ball", "a red apple", "the small house", "her brother", "the green door", "a white horse")
PLACES = ("in the garden", "at the market", "by the river", "near the school", "on the hill", "in the kitchen")
TIMES = ("every morning", "at night", "on sunday", "after lunch", "before dinner")
COUNTS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def sentence(rng: random.Random) -> str:
    """One sentence of a small grammar: subject verb object place [time]; or a count up from a number."""
    if rng.random() < 0.15:
        start = rng.randrange(len(COUNTS) - 3)
        return "We count " + ", ".join(COUNTS[start : start + 4]) + "."
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(PLACES)]
    if rng.random() < 0.5:
        words.append(rng.choice(TIMES))
    text = " ".join(words) + "."
    return text[0].upper() + text[1:]


def corpus_texts(n_rows: int, seed: int = 0) -> list[str]:
    """n_rows paragraphs of 3 to 6 sentences."""
    rng = random.Random(seed)
    return [" ".join(sentence(rng) for _ in range(rng.randint(3, 6))) for _ in range(n_rows)]


def write_jsonl_corpus(out_dir: Path | str, n_files: int = 3, rows_per_file: int = 200, seed: int = 0) -> Path:
    """A folder of part-000.jsonl ... with rows {"text": paragraph, "id": "file-row"}; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        texts = corpus_texts(rows_per_file, seed=seed * 1000 + i)
        with open(out / f"part-{i:03d}.jsonl", "w", encoding="utf-8") as f:
            for j, text in enumerate(texts):
                f.write(json.dumps({"text": text, "id": f"{i}-{j}"}) + "\n")
    return out


def train_tokenizer(out_dir: Path | str, texts: list[str], vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer trained on texts, with the special token <|endoftext|> (id 0),
    saved as out_dir/tokenizer.json; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    return out


_TEST_KEYS: dict = {}


def named(name: str):
    """An identity whose peer id is `name`, for tests that build a NetCore without a DHT and call its
    handlers in-process (a signed call to another process would be refused: the id is not the key's hash)."""
    from peer.identity import Identity

    if "" not in _TEST_KEYS:
        _TEST_KEYS[""] = Identity.generate()
    key = _TEST_KEYS[""]
    return Identity(key.key, name, key.public_key, "")


def identity():
    """A real identity (a fresh key; its id is the key's hash)."""
    from peer.identity import Identity

    return Identity.generate()


def channels(who=None, secret: str = ""):
    """Client channels signing every call as `who` (an Identity; a fresh one when None)."""
    from peer.net.client import Channels
    from peer.net.signer import Signer

    return Channels(Signer(who or identity(), secret))


async def _store_as(_dht, node, identity, key, subkey, value, expiration_time):
    from hivemind.dht.validation import CompositeValidator

    from peer import records

    # runs in the DHT process: this one store is signed with `identity`'s key (validation does not
    # depend on the key, so the node's other traffic is checked the same meanwhile)
    saved = node.protocol.record_validator
    node.protocol.record_validator = CompositeValidator(records.validators(identity))
    try:
        return await node.store(key, value, expiration_time, subkey=subkey)
    finally:
        node.protocol.record_validator = saved


def store_as_future(dht, identity, key: str, value, subkey: str | None = None):
    """Stores `value` in `dht` as the peer `identity` would (signed with its key, under its protected
    subkey, or under `subkey` when given: an unprotected one, or a forged one), through the node's own
    store path: one DHT node publishes the records of several test peers. An MPFuture of the result."""
    from functools import partial

    from hivemind.utils import get_dht_time

    from peer.net.swarm import RECORD_TTL_S
    from peer.records import owner_subkey

    sub = owner_subkey(identity) if subkey is None else subkey
    return dht.run_coroutine(partial(_store_as, identity=identity, key=key, subkey=sub, value=value,
                                     expiration_time=get_dht_time() + RECORD_TTL_S), return_future=True)


def store_as(dht, identity, key: str, value, subkey: str | None = None, timeout_s: float = 10.0) -> bool:
    """store_as_future, waited for (from a thread that is not the DHT's)."""
    return bool(store_as_future(dht, identity, key, value, subkey).result(timeout=timeout_s))


async def pump(src, dst, transform=None) -> None:
    """Copies a TCP stream (asyncio reader to writer) until it ends or breaks, each read through
    `transform` when given (the test proxies' byte pump); closes `dst` after."""
    try:
        while data := await src.read(65536):
            dst.write(transform(data) if transform is not None else data)
            await dst.drain()
    except OSError:
        pass
    finally:
        dst.close()
