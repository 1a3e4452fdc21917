"""The README and docs/ stay true: every flag of every script is documented, the commands of
their ```bash blocks name scripts, files and flags that exist, and a figure quoted on several
pages is the same on each (and true, where the code can compute it)."""
import glob
import os
import re
import shlex
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

import valle

from conftest import ROOT

SCRIPTS = ["train.py", "sample.py", "eval.py", "bench.py", "data/prepare.py",
           "data/make_corpus.py", "data/make_demo.py", "data/wordnet_sentences.py",
           "models/export.py", "docs/figures.py"]
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
# Folders of the repository whose files a command may name; what commands write (runs/,
# data/prepared/, data/corpus/, anything after --out) and users' data (LJSpeech-1.1, ...)
# need not exist.
TRACKED = ("data/", "tests/", "extras/", "docs/", "models/")
WRITTEN = ("data/prepared", "data/corpus", "data/flite", "data/bilingual", "data/speak", "data/ked")  # made by the commands


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def flags(script):
    """The flags a script's argparse takes (hidden ones left out); --x with
    BooleanOptionalAction also takes --no-x."""
    found = set()
    for call in re.finditer(r"add_argument\((.*?)\)\n", read(script), re.S):
        args = call.group(1)
        if "SUPPRESS" in args:
            continue
        names = re.findall(r'^\s*"(--[\w-]+)"|,\s*"(--[\w-]+)"', args.split("help=")[0])
        for name in [a or b for a, b in names]:
            found.add(name)
            if "BooleanOptionalAction" in args:
                found.add("--no-" + name[2:])
    return found


def commands():
    """(doc, command tokens) for every command of every ```bash block, continuation lines joined."""
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", read(doc), re.S):
            text = re.sub(r"\\\n\s*", " ", block)
            for line in text.splitlines():
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    yield doc, shlex.split(line)


def test_every_flag_of_every_script_is_documented():
    docs = "\n".join(read(d) for d in DOCS)
    missing = {s: sorted(f for f in flags(s) if not re.search(re.escape(f) + r"(?![\w-])", docs))
               for s in SCRIPTS}
    assert all(len(flags(s)) > 0 for s in SCRIPTS)
    assert not any(missing.values()), missing


def test_the_commands_name_scripts_files_and_flags_that_exist():
    seen = 0
    for doc, tokens in commands():
        for i, token in enumerate(tokens):
            if token.startswith(TRACKED) and not token.startswith(WRITTEN) and tokens[i - 1] != "--out":
                assert os.path.exists(os.path.join(ROOT, token)), f"{doc}: {token} does not exist"
        scripts = [t for t in tokens if t in SCRIPTS]
        if tokens[0] == "bash" and tokens[1] == "run.sh":
            command = re.escape(tokens[2])
            assert re.search(rf'^\s*{command}\)|= {command} \]', read("run.sh"), re.M), \
                f"{doc}: run.sh has no command {tokens[2]}"
            seen += 1
        if scripts:
            known = flags(scripts[0])
            unknown = [t.split("=")[0] for t in tokens if t.startswith("--") and t.split("=")[0] not in known]
            unknown = [t for t in unknown if tokens.index(t) > tokens.index(scripts[0])]
            assert not unknown, f"{doc}: {' '.join(tokens)}: {scripts[0]} has no {unknown}"
            seen += 1
    assert seen >= 20  # the blocks were read


@pytest.mark.parametrize("doc", DOCS)
def test_docs_link_to_files_that_exist(doc):
    for target in re.findall(r"\]\(([^)#]+)\)", read(doc)):
        if not target.startswith("http"):
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target))
            assert os.path.exists(path), f"{doc} links to {target}, which does not exist"


# -----------------------------------------------------------------------------
# Figures quoted on more than one page: one value everywhere. Each page's text is read with its
# whitespace collapsed (a figure may wrap), and every match of a figure's pattern, on every page
# of DOCS, must give the same value. To keep one more figure equal, add a row to FIGURES.


def preset_parameters(preset, digits):
    """A preset's 'AR + NAR' parameter counts as the docs quote them: '1.0M + 2.0M' (digits 1)."""
    cfg = valle.get_config(preset)
    with torch.device("meta"):  # shapes only: the paper preset costs no memory
        counts = [sum(p.numel() for p in model(cfg).parameters())
                  for model in (valle.ARModel, valle.NARModel)]
    return " + ".join(f"{n / 1e6:.{digits}f}M" for n in counts)


def milliseconds(number, unit):
    """'0.88', 's' -> '880 ms'; '881', 'ms' -> '881 ms': one unit, so 0.88 s and 881 ms differ."""
    value = float(number.replace(",", "")) * (1000 if unit == "s" else 1)
    return f"{value:g} ms"


NOT_A_SENTENCE_END = r"(?:(?!\. )[^|])"  # a gap that stays within one sentence and table cell


def preset_pattern(preset, number):
    """'the tiny preset', '`--preset tiny`' or '`tiny`', then within the sentence 'X + Y parameters'."""
    named = rf"(?:\b{preset}`? preset\b|--preset {preset}\b|`{preset}`)"
    return rf"{named}{NOT_A_SENTENCE_END}{{0,120}}?\b({number} \+ {number}) parameters"


@dataclass
class Figure:
    name: str
    pattern: str  # a regex; its groups, joined by a space (or by `value`), are the figure
    where: tuple  # pages that quote it: found nowhere there, the pattern has rotted
    truth: Optional[Callable[[], str]] = None  # the value the code gives, where it can
    value: Optional[Callable[..., str]] = None  # groups -> the value compared

    def values(self, text):
        return [(self.value or (lambda *g: " ".join(g)))(*m.groups())
                for m in re.finditer(self.pattern, text)]


FIGURES = [
    Figure("the tiny preset's parameters", preset_pattern("tiny", r"\d+\.\dM"),
           where=("docs/learning.md",), truth=lambda: preset_parameters("tiny", 1)),
    Figure("the small preset's parameters", preset_pattern("small", r"\d+\.\dM"),
           where=("docs/learning.md",), truth=lambda: preset_parameters("small", 1)),
    Figure("the paper preset's parameters", preset_pattern("paper", r"\d+M"),
           where=("docs/training.md", "docs/performance.md"),
           truth=lambda: preset_parameters("paper", 0)),
    Figure("the memory band of a paper-preset step at 6,000 frames on a GPU (an estimate)",
           r"6,000 frames[^|]{0,80}?\b(\d+-\d+) GiB", where=("docs/training.md",)),
    Figure("the epoch plan's time at LibriTTS size",
           r"epoch plan\b.{0,70}?\b(\d[\d,.]*) (ms|s)\b",
           where=("docs/training.md", "docs/performance.md"), value=milliseconds),
    Figure("the demo's real-time factor",
           r"demo's real-time factor (?:is |of )?(\d+\.\d+)", where=("docs/performance.md",)),
    Figure("pocketsphinx's WER on the demo's sentences 15-19, which dropped it",
           r"pocketsphinx\b[^|]{0,100}?\bheard (?:a WER of )?(\d\.\d+)", where=("docs/learning.md",)),
    Figure("the shipped model's held-out WER, greedy (continuation / cross)",
           r"(\d+\.\d)% / (\d+\.\d)% greedy", where=("docs/model.md", "README.md")),
    Figure("the shipped model's open-vocabulary WER, greedy (cross)",
           r"(?:never heard at|open vocabulary at most 35% cross \|) (\d+\.\d)%", where=("docs/model.md", "README.md")),
]


def test_every_quoted_parameter_count_is_a_presets():
    """Any 'X + Y parameters' on any page is the AR + NAR of some preset, as the code builds it."""
    true = {preset_parameters(p, d) for p in valle.PRESETS for d in (0, 1)}
    quoted = {(doc, q) for doc in DOCS for q in re.findall(r"\b(\d+(?:\.\d)?M \+ \d+(?:\.\d)?M) "
                                                          r"parameters", " ".join(read(doc).split()))}
    assert quoted, "no page quotes a preset's 'AR + NAR parameters'"
    wrong = sorted((doc, q) for doc, q in quoted if q not in true)
    assert not wrong, f"not any preset's parameters ({sorted(true)}): {wrong}"


@pytest.mark.parametrize("figure", FIGURES, ids=lambda f: f.name)
def test_a_figure_is_the_same_on_every_page_that_quotes_it(figure):
    found = {}  # page -> the values it gives
    for doc in DOCS:
        values = figure.values(" ".join(read(doc).split()))
        if values:
            found[doc] = sorted(set(values))
    rotted = [page for page in figure.where if page not in found]
    assert not rotted, (f"{figure.name}: not found in {rotted}; the page changed its words or "
                        "dropped the figure: update the page or the pattern in FIGURES")
    values = {v for vs in found.values() for v in vs}
    assert len(values) == 1, f"{figure.name}: the pages disagree: {found}"
    if figure.truth:
        assert values == {figure.truth()}, (f"{figure.name}: the pages say {values.pop()}, the "
                                            f"code gives {figure.truth()}")
