"""Regenerate the demo corpus in data/demo/ with espeak-ng (Debian: apt install espeak-ng).

Four of make_corpus.py's voices read the same 20 sentences (written for this project): 80
utterances, about 3 minutes, stored as 16 kHz FLAC in the folder layout that prepare.py reads
(data/demo/<speaker>/<id>.flac with a same-name .txt transcript). data/README.md says how the
bundled files were made.

    python data/make_demo.py                      # into data/demo
    python data/make_demo.py --out /tmp/demo      # anywhere else
"""
import argparse
import os
import shutil
import sys
import tempfile

import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_corpus import RATE, VOICES, cli, speak  # noqa: E402  (the one voice table)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me when you get home tonight.",
    "We planted seven apple trees behind the old barn.",
    "The train to the city leaves at half past nine.",
    "She found a silver key under the kitchen table.",
    "Rain is expected over the hills later this week.",
    "My brother reads a new book every single month.",
    "Turn left at the bridge and follow the river north.",
    "The children laughed as the kite rose into the sky.",
    "A warm cup of tea makes a cold morning better.",
    "He painted the fence green before the summer fair.",
    "Our neighbors keep two dogs and a very loud parrot.",
    "The museum opens early on the first Sunday of May.",
    "Could you pass the salt and the pepper, please?",
    "Thirty students waited quietly outside the hall.",
    "The little boat drifted slowly toward the island.",
    "Fresh bread smells wonderful on a rainy afternoon.",
    "She whispered the answer so nobody else could hear.",
    "The clock on the tower stopped at exactly noon.",
    "Write your name clearly at the top of the page.",
]
SPEAKERS = ["us_male", "us_female", "gb_male", "scot_female"]  # rows of make_corpus.VOICES


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo"),
                   help="folder to write (default: data/demo)")
    root = p.parse_args(argv).out
    if shutil.which("espeak-ng") is None:
        cli.fail("espeak-ng is not installed: apt install espeak-ng (macOS: brew install espeak-ng)")
    voices = {row[0]: row[1:] for row in VOICES}  # name -> program, voice, speed, pitch
    with tempfile.TemporaryDirectory() as tmp:
        for speaker in SPEAKERS:
            os.makedirs(os.path.join(root, speaker), exist_ok=True)
            for i, text in enumerate(SENTENCES):
                stem = os.path.join(root, speaker, f"{speaker}_{i:02d}")
                sf.write(stem + ".flac", speak(text, *voices[speaker], tmp), RATE)
                with open(stem + ".txt", "w") as f:
                    f.write(text + "\n")
    print(f"wrote {len(SPEAKERS) * len(SENTENCES)} utterances to {root}")


if __name__ == "__main__":
    main()
