"""Regenerate the bundled demo corpus in data/demo/ with espeak-ng (Debian: apt install espeak-ng).

Four synthetic speakers read the same 20 sentences (written for this project): 80 utterances,
about 3 minutes, stored as 16 kHz FLAC in the folder layout that prepare.py reads
(data/demo/<speaker>/<id>.flac with a same-name .txt transcript).

    python data/make_demo.py
"""
import os
import subprocess
import tempfile

import soundfile as sf

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
# espeak-ng voice + variant, words per minute, pitch: four distinguishable speakers
SPEAKERS = {
    "us_male": ("en-us+m3", 165, 45),
    "us_female": ("en-us+f3", 160, 60),
    "gb_male": ("en-gb+m1", 150, 35),
    "scot_female": ("en-gb-scotland+f2", 170, 70),
}
RATE = 16_000


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
    with tempfile.TemporaryDirectory() as tmp:
        for speaker, (voice, wpm, pitch) in SPEAKERS.items():
            os.makedirs(os.path.join(root, speaker), exist_ok=True)
            for i, text in enumerate(SENTENCES):
                wav = os.path.join(tmp, "x.wav")
                subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-p", str(pitch),
                                "-w", wav, text], check=True)
                subprocess.run(["sox", wav, "-r", str(RATE), os.path.join(tmp, "y.wav")], check=True)
                audio, sr = sf.read(os.path.join(tmp, "y.wav"), dtype="float32")
                stem = os.path.join(root, speaker, f"{speaker}_{i:02d}")
                sf.write(stem + ".flac", audio, sr)
                with open(stem + ".txt", "w") as f:
                    f.write(text + "\n")
    print(f"wrote {len(SPEAKERS) * len(SENTENCES)} utterances to {root}")


if __name__ == "__main__":
    main()
