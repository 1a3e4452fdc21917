"""Write data/sentences.txt, the English text the shipped model learned from: WordNet 3.0's usage
examples (Princeton University; licence in data/README.md), kept where they read as speech.

    python data/wordnet_sentences.py   # reads /usr/share/wordnet (Debian: apt install wordnet-base)

An example is kept when it is 5-16 words of letters and plain punctuation, every word is in the
CMU pronouncing dictionary (so that g2p-en and the synthesizers read it alike), and none of its
words is a content word of data/open_vocab.txt, the sentences that test words never trained on.
Examples are deduplicated ignoring case, capitalized and closed with a full stop.
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from extras import cli, english  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# open_vocab.txt's words that training may contain: articles, possessives, prepositions, "and"
FUNCTION_WORDS = set("a an the my our her his their your its on in at of for with from over onto "
                     "to and through around all every both".split())


def words(text):
    return re.findall(r"[a-z']+", text.lower().replace("-", " "))


def examples(wordnet):
    """Every quoted usage example in WordNet's data files, in file order."""
    found = []
    for part in ("noun", "verb", "adj", "adv"):
        with open(os.path.join(wordnet, f"data.{part}"), encoding="latin-1") as f:
            for line in f:
                if not line.startswith("  ") and "|" in line:  # the licence header is indented
                    found += re.findall(r'"([^"]+)"', line.split("|", 1)[1])
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wordnet", default="/usr/share/wordnet", help="WordNet 3.0's dict folder")
    p.add_argument("--out", default=os.path.join(HERE, "sentences.txt"))
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.wordnet, "data.noun")):
        cli.fail(f"no WordNet at {args.wordnet}: apt install wordnet-base, or give --wordnet")
    cmu = english.cmudict()
    with open(os.path.join(HERE, "open_vocab.txt"), encoding="utf-8") as f:
        banned = {w for line in f for w in words(line)} - FUNCTION_WORDS
    kept, seen = [], set()
    for text in examples(args.wordnet):
        text = text.strip().replace(";", ",").strip(" ,")
        if re.search(r"[^A-Za-z ,.'?!-]|--|\s-|-\s", text):
            continue
        ws = words(text)
        if not 5 <= len(ws) <= 16 or banned & set(ws) or any(w not in cmu for w in ws):
            continue
        text = text[0].upper() + text[1:] + ("" if text[-1] in ".?!" else ".")
        if text.lower() not in seen:
            seen.add(text.lower())
            kept.append(text)
    with cli.atomic(args.out, "w") as f:
        f.write("".join(line + "\n" for line in kept))
    print(f"wrote {len(kept)} sentences ({len({w for t in kept for w in words(t)})} words) to {args.out}")


if __name__ == "__main__":
    main()
