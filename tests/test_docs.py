"""The README and docs/ stay true: every flag of every script is documented, and the commands of
their ```bash blocks name scripts, files and flags that exist."""
import glob
import os
import re
import shlex

import pytest

from conftest import ROOT

SCRIPTS = ["train.py", "sample.py", "eval.py", "bench.py", "data/prepare.py",
           "data/make_corpus.py", "data/make_demo.py"]
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
# Folders of the repository whose files a command may name; what commands write (runs/,
# data/prepared/, data/corpus/, anything after --out) and users' data (LJSpeech-1.1, ...)
# need not exist.
TRACKED = ("data/", "tests/", "extras/", "docs/")
WRITTEN = ("data/prepared", "data/corpus", "data/flite", "data/bilingual")  # made by the commands


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
