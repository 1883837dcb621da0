"""training/runs.py: the texts and their tokens, and the run folder's files with their
checksums (the run folder a whole `train.py` run fills is tested in test_train.py and
test_sample.py)."""
import pytest
import torch

from assertions import assert_same
from training import runs

# --------------------------------------------------------------------------- texts and tokens


def test_vocab_has_unk_first_and_unknown_characters_map_to_it():
    vocab = runs.build_vocab("banana")
    assert vocab == runs.UNK + "abn"
    ids, unknown = runs.encode("nab\u03c3a!", vocab)
    assert ids.tolist() == [3, 1, 2, 0, 1, 0] and unknown == 2
    assert runs.decode(ids.tolist(), vocab) == "nab\ufffda\ufffd"  # UNK shows as a mark


def test_corpora_are_deterministic_and_split_by_position():
    text = runs.pretraining_text()
    vocab = runs.build_vocab(text)
    a, b = runs.make_corpus(text, vocab), runs.make_corpus(text, vocab)
    assert a.fingerprint == b.fingerprint and a.unknown == 0
    assert len(a.train) + len(a.val) == len(text)
    assert abs(len(a.val) / len(text) - runs.VAL_FRACTION) < 1e-3
    fine = runs.make_corpus(runs.finetuning_text(), vocab)
    decoded = runs.decode(fine.train[:20000].tolist(), vocab)
    assert decoded.startswith("# ---- textwrap.py") and "def " in decoded


# ------------------------------------------------------------------------ files and checksums

def test_checkpoint_round_trip_and_every_damage_is_a_one_line_error(tmp_path):
    path = str(tmp_path / "c.pt")
    runs.save_checkpoint({"weights": torch.arange(1000.0), "step": 3}, path)
    ckpt = runs.read_checkpoint(path)
    assert ckpt["step"] == 3
    assert_same(ckpt["weights"], torch.arange(1000.0), "weights read back from the checkpoint")
    good = open(path, "rb").read()
    half = len(good) // 2
    damages = {"middle": lambda d: d[:half] + bytes([d[half] ^ 1]) + d[half + 1:],
               "truncated": lambda d: d[:len(d) // 2],
               "digest": lambda d: d.replace(d[80:81], b"x" if d[80:81] != b"x" else b"y", 1),
               "first line": lambda d: b"junk" + d[4:],
               "empty": lambda d: b""}
    for what, damage in damages.items():
        with open(path, "wb") as f:
            f.write(damage(good))
        with pytest.raises(runs.CorruptFile, match="c.pt") as error:
            runs.read_checkpoint(path)
        assert "\n" not in str(error.value), what
    assert "empty" in str(error.value)


def test_json_files_carry_a_checksum_and_a_change_is_detected(tmp_path):
    path = str(tmp_path / "run.json")
    runs.write_json(path, {"lora": {"rank": 8}})
    assert runs.read_json(path) == {"lora": {"rank": 8}}
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text.replace('"rank": 8', '"rank": 9'))
    with pytest.raises(runs.CorruptFile, match="run.json does not match"):
        runs.read_json(path)
