"""Generate a speech corpus with flite or espeak-ng for the learning recipe (docs/learning.md).

Sentences come from a small grammar written for this project (CC0, like the rest of data/):
a few hundred words combined into short, simple sentences, every one different. Each voice
reads its own share of them. Held-out sentences, never used in training, go to a second folder
in the same voices: the test set for eval.py.

    python data/make_corpus.py --out data/corpus --train 2000 --test 40 --voices 2
    python data/make_corpus.py --out data/flite --train 2000 --test 40 --voices slt,rms
    python data/make_corpus.py --out data/bilingual --languages en,de --train 200 --test 20
    python data/make_corpus.py --out data/speak --text data/sentences.txt --train 16000 --test 80 \
        --voices slt,rms,awb,kal16

--text reads the sentences from a file instead, one a line (data/sentences.txt: WordNet's
examples, data/open_vocab.txt: sentences written to test words never trained on).

Writes <out>/train/<voice>/<id>.flac and <out>/test/<voice>/<id>.flac (16 kHz, with a
same-name .txt transcript): the folder layout of data/prepare.py and eval.py; and the same as
manifests, <out>/train.list and <out>/test.list (path|text|speaker|language), the layout for
more than one language. With --languages, each voice (an espeak-ng variant, speed and pitch)
reads --train and --test sentences in each language: the same speaker in every language.
Needs the programs of the voices chosen: flite (English only) or espeak-ng (Debian/Ubuntu: apt
install flite espeak-ng; macOS: brew install flite espeak-ng). Where Whisper is installed
(requirements-eval.txt), it prints how well Whisper reads each voice's held-out sentences.
"""
import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from extras import cli  # noqa: E402

# The corpus makers' voices (this script's and make_demo.py's), distinguishable speakers: name,
# program, its voice, and for espeak-ng words per minute and pitch (0-99). espeak-ng's are formant
# synthesis; in another language a speaker keeps its variant, speed and pitch (LANGUAGE_VOICES).
# flite's are built from recordings of people (CMU ARCTIC), English only, and far easier for
# an ASR: Whisper tiny.en's WER on 20 sentences was slt 0.11, rms 0.09, awb 0.19, kal16 0.19,
# espeak-ng's us_male 0.36 and us_female 0.32 (the same sentences).
VOICES = [
    ("us_male", "espeak-ng", "en-us+m3", 150, 45),
    ("us_female", "espeak-ng", "en-us+f3", 150, 60),
    ("gb_male", "espeak-ng", "en-gb+m1", 145, 35),
    ("gb_female", "espeak-ng", "en-gb+f2", 155, 70),
    ("us_male2", "espeak-ng", "en-us+m1", 160, 30),
    ("us_female2", "espeak-ng", "en-us+f4", 145, 75),
    ("gb_male2", "espeak-ng", "en-gb+m5", 150, 50),
    ("scot_female", "espeak-ng", "en-gb-scotland+f2", 155, 65),
    ("slt", "flite", "slt", None, None),  # US English, female
    ("rms", "flite", "rms", None, None),  # US English, male
    ("awb", "flite", "awb", None, None),  # Scottish English, male
    ("kal16", "flite", "kal16", None, None),  # US English, male (diphones)
    ("ked", "festival", "ked_diphone", None, None),  # US English, male (diphones; Festival)
]
MAX_WER = 0.2  # a voice Whisper reads worse than this is a poor test of whether a model speaks
RATE = 16_000
LANGUAGE_VOICES = {"de": "de", "es": "es"}  # espeak-ng's voice for each language but English

# The grammar: [determiner] [adjective] noun verb [determiner] [adjective] noun [place].
NOUNS = ("dog cat bird fish horse cow goat sheep mouse frog boy girl man woman child king queen "
         "farmer doctor teacher baker sailor painter pilot nurse driver student singer tailor "
         "cook judge clown").split()
OBJECTS = ("ball book box cup hat key lamp map pen ring rope shoe sock spoon stick stone table "
           "chair bell coat drum flag kite letter apple bread cake egg lemon melon onion pear "
           "plum carrot basket bottle candle feather hammer ladder mirror pillow ribbon "
           "bucket blanket").split()
ADJECTIVES = ("big small old young red green blue yellow black white brown happy sad quiet loud "
              "tall short warm cold soft hard clean dirty heavy light fast slow round bright "
              "dark shiny tiny").split()
VERBS = ("sees finds takes holds drops moves opens pulls pushes lifts throws catches carries "
         "brings buys sells paints cleans hides wants likes needs keeps breaks fixes washes "
         "counts draws watches").split()
PLACES = ("at home, in the garden, on the hill, by the river, near the school, under the bridge, "
          "in the kitchen, at the market, on the boat, in the morning, at night, after lunch, "
          "before dinner, in the rain, every day").split(", ")
DETERMINERS = ["the", "a", "my", "your", "our", "this", "that", "every"]


def noun_phrase(rng, nouns):
    words = [rng.choice(DETERMINERS)]
    if rng.random() < 0.6:
        words.append(rng.choice(ADJECTIVES))
    words.append(rng.choice(nouns))
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return words


def sentence(rng):
    words = noun_phrase(rng, NOUNS) + [rng.choice(VERBS)] + noun_phrase(rng, OBJECTS)
    if rng.random() < 0.4:
        words += rng.choice(PLACES).split()
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


# German: subject, verb, object (articles in place: no agreement to get wrong), [place].
SUBJECTS_DE = ("der Hund, die Katze, der Vogel, das Pferd, die Kuh, die Ziege, das Schaf, "
               "die Maus, der Frosch, der Junge, das Mädchen, der Mann, die Frau, das Kind, der König, "
               "die Königin, der Bauer, die Ärztin, der Lehrer, der Bäcker, die Malerin, "
               "der Fahrer, die Sängerin, der Koch, die Richterin").split(", ")
VERBS_DE = ("sieht findet nimmt hält trägt kauft verkauft malt sucht wäscht zählt bringt "
            "versteckt braucht öffnet hebt wirft fängt zeichnet repariert").split()
OBJECTS_DE = ("den Ball, das Buch, die Kiste, die Tasse, den Hut, den Schlüssel, die Lampe, "
              "die Karte, den Ring, das Seil, den Schuh, den Löffel, den Stein, den Tisch, "
              "den Stuhl, die Glocke, den Mantel, die Trommel, die Fahne, den Brief, den Apfel, "
              "das Brot, den Kuchen, das Ei, die Zitrone, die Birne, die Pflaume, den Korb, "
              "die Flasche, die Kerze, die Feder, den Hammer, die Leiter, den Spiegel, "
              "das Kissen, den Eimer, die Decke").split(", ")
PLACES_DE = ("zu Hause, im Garten, auf dem Hügel, am Fluss, bei der Schule, unter der Brücke, "
             "in der Küche, auf dem Markt, auf dem Boot, am Morgen, in der Nacht, nach dem "
             "Essen, im Regen, jeden Tag").split(", ")


# Spanish: the same shape.
SUBJECTS_ES = ("el perro, el gato, el pájaro, el caballo, la vaca, la cabra, la oveja, el ratón, "
               "la rana, el niño, la niña, el hombre, la mujer, el rey, la reina, el granjero, "
               "la médica, el maestro, el panadero, la pintora, el piloto, la enfermera, "
               "el cocinero, la cantante").split(", ")
VERBS_ES = ("ve encuentra toma lleva compra vende pinta busca lava cuenta trae esconde "
            "necesita abre levanta tira dibuja guarda quiere rompe").split()
OBJECTS_ES = ("la pelota, el libro, la caja, la taza, el sombrero, la llave, la lámpara, "
              "el mapa, el anillo, la cuerda, el zapato, la cuchara, la piedra, la mesa, "
              "la silla, la campana, el abrigo, el tambor, la bandera, la carta, la manzana, "
              "el pan, el pastel, el huevo, el limón, la pera, la cesta, la botella, la vela, "
              "la pluma, el martillo, el espejo, la almohada, el cubo").split(", ")
PLACES_ES = ("en casa, en el jardín, en la colina, junto al río, cerca de la escuela, bajo el "
             "puente, en la cocina, en el mercado, en el barco, por la mañana, por la noche, "
             "después de comer, bajo la lluvia, cada día").split(", ")


def subject_verb_object(subjects, verbs, objects, places):
    """The German and Spanish grammar, from its word lists: a function of a random generator."""
    def sentence(rng):
        words = [rng.choice(subjects), rng.choice(verbs), rng.choice(objects)]
        if rng.random() < 0.4:
            words.append(rng.choice(places))
        text = " ".join(words)
        return text[0].upper() + text[1:] + "."
    return sentence


GRAMMARS = {"en": sentence,
            "de": subject_verb_object(SUBJECTS_DE, VERBS_DE, OBJECTS_DE, PLACES_DE),
            "es": subject_verb_object(SUBJECTS_ES, VERBS_ES, OBJECTS_ES, PLACES_ES)}


def sentences(n, seed, language="en"):
    """n different sentences, the same for the same seed."""
    rng, seen = random.Random(seed), set()
    while len(seen) < n:
        seen.add(GRAMMARS[language](rng))
    out = sorted(seen)
    random.Random(seed + 1).shuffle(out)
    return out


def read_sentences(path, n, first, seed):
    """--text: n sentences of a file (one a line), shuffled by seed, after skipping its first."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError as e:
        cli.fail(f"cannot read --text {path}: {e.strerror}")
    random.Random(seed).shuffle(lines)
    if first + n > len(lines):
        cli.fail(f"--text {path} has {len(lines)} sentences: --first {first} and {n} more do not fit")
    return lines[first: first + n]


def speak(text, program, voice, wpm, pitch, tmp):
    """One sentence -> float32 audio at RATE."""
    wav = os.path.join(tmp, "x.wav")
    stdin = None
    if program == "flite":  # writes 16 kHz
        command = ["flite", "-voice", voice, "-t", text, "-o", wav]
    elif program == "festival":  # Festival's text2wave reads the text from its input
        command, stdin = ["text2wave", "-eval", f"(voice_{voice})", "-o", wav], text
    else:
        command = ["espeak-ng", "-v", voice, "-s", str(wpm), "-p", str(pitch), "-w", wav, text]
    subprocess.run(command, input=stdin, text=True, check=True, capture_output=True)
    audio, sr = sf.read(wav, dtype="float32")
    # espeak-ng writes 22.05 kHz; linear interpolation to 16 kHz keeps the files small (the
    # speech sits below 5 kHz) and needs no resampler here; prepare.py resamples to 24 kHz.
    t = np.arange(int(len(audio) * RATE / sr)) * sr / RATE
    return np.interp(t, np.arange(len(audio)), audio).astype(np.float32)


def pick_voices(spec):
    """--voices: a count (the table's first N) or names, comma-separated -> rows of VOICES."""
    by_name = {row[0]: row for row in VOICES}
    if spec.isdigit():
        if not 1 <= int(spec) <= len(VOICES):
            cli.fail(f"--voices must be 1-{len(VOICES)} or names, not {spec}")
        return VOICES[: int(spec)]
    names = spec.split(",")
    unknown = [n for n in names if n not in by_name]
    if unknown or len(set(names)) != len(names):
        cli.fail(f"--voices takes distinct names from {', '.join(by_name)} (or a count), not {spec!r}")
    return [by_name[n] for n in names]


def wer_by_voice(out, voices):
    """Whisper's WER on each voice's held-out recordings (None: Whisper is not installed)."""
    from extras import scorers
    try:
        asr = scorers.ASR("whisper")
    except ValueError:
        return None
    wers = {}
    for name, *_ in voices:
        refs, hyps = [], []
        for line in open(os.path.join(out, "test.list")):
            path, text, speaker, language = line.rstrip("\n").split("|")
            if speaker == name and language == "en":
                wav, sr = sf.read(os.path.join(out, path), dtype="float32")
                refs.append(text)
                hyps.append(asr.transcribe(wav, sr))
        if refs:
            wers[name] = scorers.word_error_rate(refs, hyps)
    return asr.name, wers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/corpus", help="folder to write (replaced if it exists)")
    p.add_argument("--train", type=int, default=2000, help="training sentences (all voices)")
    p.add_argument("--test", type=int, default=40, help="held-out sentences (all voices)")
    p.add_argument("--voices", default="2",
                   help=f"how many voices (the first of {', '.join(v[0] for v in VOICES)}), or "
                        "their names, comma-separated")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same sentences")
    p.add_argument("--text", help="read the sentences from this file, one a line, shuffled by "
                                  "--seed (English only), instead of the grammar")
    p.add_argument("--first", type=int, default=0,
                   help="with --text: skip its first N sentences (those another corpus took)")
    p.add_argument("--languages", default="en",
                   help=f"comma-separated, from {', '.join(GRAMMARS)}: --train and --test "
                        "sentences in each")
    args = p.parse_args(argv)
    languages = args.languages.split(",")
    unknown = [x for x in languages if x not in GRAMMARS]
    if unknown or len(set(languages)) != len(languages):
        cli.fail(f"--languages takes distinct languages from {', '.join(GRAMMARS)}, "
                 f"not {args.languages!r}")
    voices = pick_voices(args.voices)
    if args.train < 0 or args.test < 2 * len(voices) or args.first < 0:
        cli.fail(f"--train {args.train} --test {args.test} --first {args.first}: need two held-out "
                 f"sentences per voice ({len(voices)}) and no negative count")
    if args.text and languages != ["en"]:
        cli.fail("--text holds English sentences: give --languages en")
    if languages != ["en"] and any(program == "flite" for _, program, *_ in voices):
        cli.fail("flite's voices speak English only: give --languages en, or espeak-ng voices")
    for program in sorted({program for _, program, *_ in voices}):
        command = "text2wave" if program == "festival" else program
        if shutil.which(command) is None:
            package = "festival festvox-kdlpc16k" if program == "festival" else program
            cli.fail(f"{program} is not installed: apt install {package} (macOS: brew install {program})")
    tmp_out = args.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp_out, ignore_errors=True)
    seconds, lists = 0.0, {"train": [], "test": []}
    with tempfile.TemporaryDirectory() as tmp:
        for language in languages:
            texts = (read_sentences(args.text, args.train + args.test, args.first, args.seed)
                     if args.text else sentences(args.train + args.test, args.seed, language))
            split = {"train": texts[: args.train], "test": texts[args.train:]}
            for part, items in split.items():
                for i, text in enumerate(items):
                    name, program, voice, wpm, pitch = voices[i % len(voices)]  # voices take turns
                    if language != "en":  # the same speaker: its variant, speed and pitch
                        voice = LANGUAGE_VOICES[language] + "+" + voice.split("+")[1]
                    folder = os.path.join(tmp_out, part, name)
                    os.makedirs(folder, exist_ok=True)
                    audio = speak(text, program, voice, wpm, pitch, tmp)
                    seconds += len(audio) / RATE
                    tag = "" if language == "en" else f"{language}_"
                    stem = os.path.join(folder, f"{name}_{tag}{part}_{i:05d}")
                    sf.write(stem + ".flac", audio, RATE)
                    with open(stem + ".txt", "w") as f:
                        f.write(text + "\n")
                    path = os.path.relpath(stem + ".flac", tmp_out)
                    lists[part].append(f"{path}|{text}|{name}|{language}\n")
        for part, lines in lists.items():  # manifests: data/prepare.py --layout manifest
            with open(os.path.join(tmp_out, part + ".list"), "w") as f:
                f.writelines(lines)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp_out, args.out)  # all or nothing
    print(f"wrote {args.train} training and {args.test} held-out sentences in {len(voices)} "
          f"voices and {len(languages)} language(s) ({seconds / 60:.1f} min of speech) "
          f"to {args.out}")
    measured = wer_by_voice(args.out, voices)
    if measured is None:
        print("(install requirements-eval.txt to see how well Whisper reads each voice)")
        return
    asr, wers = measured
    for name, wer in wers.items():
        flag = f": above {MAX_WER:.0%}, a poor judge of a model's speech" if wer > MAX_WER else ""
        print(f"  {name}: {asr} reads its held-out recordings at WER {wer:.3f}{flag}")


if __name__ == "__main__":
    main()
