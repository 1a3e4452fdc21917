"""Does the model learn to read its text? A synthetic alignment task that it can only solve by
attending to the right phone at the right time (issue 16).

Each utterance is a random string of phones, each "spoken" for a random 3-6 frames. Codebook 0
holds one of three codes per frame (onset, middle, steady part of a phone), chosen by the phone's
class: 4 classes, so the phone itself cannot be read off codebook 0. Codebooks 1-7 hold a code of
the phone itself (and its part), so the NAR must read the text too. Everything is a function of
the phones and the random durations: the AR's accuracy on codebook 0 is capped near 0.7 (when a
phone ends is a coin toss), the NAR's is 1. Most of codebook 0 (the middle and steady frames)
follows from the codes before it; only the onsets need the text, so the text's worth shows in
the loss with the right text against the wrong one, and in greedy codes that spell the text."""
import pytest
import torch

import valle

PHONES = list(range(valle.PHONE_ID["AA0"], valle.PHONE_ID["AA0"] + 24))  # 24 phones, 8 classes
CLASSES = 8
MIN_FRAMES, MAX_FRAMES = 3, 6  # per phone


def utterance(generator):
    """-> (phone ids (L,), codes (8, T)): 5-9 phones, each 3-6 frames."""
    n = int(torch.randint(5, 10, (1,), generator=generator))
    ids = torch.tensor(PHONES)[torch.randint(0, len(PHONES), (n,), generator=generator)]
    frames = []
    for p in ids.tolist():
        length = int(torch.randint(MIN_FRAMES, MAX_FRAMES + 1, (1,), generator=generator))
        for t in range(length):
            part = min(t, 2)  # onset, middle, steady
            c0 = 3 * (p % CLASSES) + part
            rest = [(97 * p + 131 * k + 7 * part) % valle.CODEBOOK_SIZE for k in range(1, 8)]
            frames.append([c0] + rest)
    return ids, torch.tensor(frames).T


def batch(utterances):
    """[(ids, codes)] -> the padded batch that ARModel.loss and NARModel.loss take."""
    ids, codes = zip(*utterances)
    text, _ = valle.pad_ids([i.tolist() for i in ids])
    code_lens = torch.tensor([c.shape[1] for c in codes])
    padded = torch.zeros(len(codes), 8, int(code_lens.max()), dtype=torch.long)
    for row, c in zip(padded, codes):
        row[:, : c.shape[1]] = c
    return text, torch.tensor([len(i) for i in ids]), padded, code_lens


@pytest.fixture(scope="module")
def trained():
    """A tiny AR (G=2) and NAR trained for 250 steps on fresh synthetic batches of 48 (about a
    minute on 2 cores), and 64 held-out utterances. No dropout: at 250 steps the AR is just
    learning when the onsets come, and whether it has learned it by then varied with the random
    stream that dropout draws from (greedy edits, own text against another's: 0.60 / 0.79 and
    0.77 / 0.82 for two seeds with dropout; 0.16 / 0.77 with none, seed 0)."""
    torch.manual_seed(0)
    cfg = valle.get_config("tiny", group_size=2, dropout=0.0)
    ar, nar = valle.ARModel(cfg), valle.NARModel(cfg)
    opts = [torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0) for m in (ar, nar)]
    generator = torch.Generator().manual_seed(1)
    steps, warmup = 250, 20
    for step in range(steps):
        text, text_lens, codes, code_lens = batch([utterance(generator) for _ in range(48)])
        losses = [ar.loss(text, text_lens, codes, code_lens)[0],
                  nar.loss(text, text_lens, codes, code_lens, generator=generator,
                           j=1 if step % 2 else None)[0]]  # codebook 1 is the one that needs text
        for model, opt, loss in zip((ar, nar), opts, losses):
            for group in opt.param_groups:
                group["lr"] = 2e-3 * min(1.0, (step + 1) / warmup)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as train.py does
            opt.step()
    held_out = batch([utterance(torch.Generator().manual_seed(10_000 + i)) for i in range(64)])
    return ar.eval(), nar.eval(), held_out


def wrong_text(text, text_lens):
    """Each utterance gets the next one's text (the same texts, paired wrongly)."""
    return text.roll(1, dims=0), text_lens.roll(1, dims=0)


@torch.no_grad()
def test_the_ar_reads_its_text(trained):
    ar, _, (text, text_lens, codes, code_lens) = trained
    torch.manual_seed(0)
    loss, acc = ar.loss(text, text_lens, codes, code_lens)
    wrong_loss, wrong_acc = ar.loss(*wrong_text(text, text_lens), codes, code_lens)
    # Measured: 0.67 accuracy (0.53 with the wrong text); 0.81 nats with the right text, 2.59
    # with the wrong one. The onsets, a fifth of the codes, carry the whole gap.
    assert acc > 0.6, f"held-out codebook-0 accuracy {acc:.3f}"
    assert wrong_loss - loss > 0.4, f"right text {loss:.3f} vs wrong text {wrong_loss:.3f} nats"
    assert wrong_acc < acc - 0.03


@torch.no_grad()
def test_the_nar_reads_its_text(trained):
    """Codebook 1 names the phone within its class: only the text says which. Higher codebooks
    follow from codebook 1 (as a real codec's residuals lean on the codebooks below them)."""
    _, nar, (text, text_lens, codes, code_lens) = trained

    def loss(j, text, text_lens):  # the same prompt/target splits for both texts
        return nar.loss(text, text_lens, codes, code_lens, generator=torch.Generator().manual_seed(j), j=j)

    right, right_acc, _ = loss(1, text, text_lens)
    wrong, wrong_acc, _ = loss(1, *wrong_text(text, text_lens))
    assert right_acc > 0.9, f"codebook 1: held-out accuracy {right_acc:.3f}"
    assert wrong - right > 2.0, f"codebook 1: right text {right:.3f} vs wrong text {wrong:.3f} nats"
    assert wrong_acc < 0.7
    for j in (4, 7):
        assert loss(j, text, text_lens)[1] > 0.95


def classes(c0):
    """Codebook-0 codes -> the classes of the phones they spell (one per run of a class)."""
    spelled = [c // 3 for c in c0]
    return [k for i, k in enumerate(spelled) if i == 0 or k != spelled[i - 1]]


@torch.no_grad()
def test_greedy_codes_follow_the_text(trained):
    """Free-running, greedy, no voice prompt (the task has one voice): the classes spelled by
    the generated codebook 0 are closer to the held-out text's than to another text's (measured
    on the 64 held-out utterances: 0.16 against 0.77 edits per class)."""
    from rapidfuzz.distance import Levenshtein
    ar, _, (text, text_lens, _, _) = trained
    n = len(text)  # all 64 held-out utterances
    texts = [[p % CLASSES for p in text[i, : text_lens[i]].tolist()] for i in range(n)]
    t, tv = valle.pad_ids([text[i, : text_lens[i]].tolist() for i in range(n)])
    c0 = valle.generate_ar(ar, t, tv, torch.zeros(0, dtype=torch.long), max_groups=40,
                           sampling=valle.Sampling(top_k=1, ras=False))
    own = sum(Levenshtein.normalized_distance(classes(c.tolist()), texts[i])
              for i, c in enumerate(c0)) / n
    other = sum(Levenshtein.normalized_distance(classes(c.tolist()), texts[i - 1])
                for i, c in enumerate(c0)) / n
    assert own < other - 0.1, f"edit distance to own text {own:.3f}, other {other:.3f}"


@torch.no_grad()
def test_eval_text_gaps_see_the_models_read(trained, monkeypatch):
    """eval.py's text gaps (own text minus another text, mean log-probability per code) on
    held-out utterances: clearly positive for both models, and exactly the opposite with the
    texts swapped. Texts are named here; text_to_ids looks their phones up."""
    import eval as evaluation
    ar, nar, (text, text_lens, codes, code_lens) = trained
    names = {f"utterance {i}": text[i, : text_lens[i]].tolist() for i in range(8)}
    monkeypatch.setattr(valle, "text_to_ids", lambda name, language="en": names[name])
    no_prompt = torch.zeros(8, 0, dtype=torch.long)
    gaps = [evaluation.text_gaps(ar, nar, f"utterance {i}", f"utterance {i - 1}", no_prompt, None,
                                 codes[i, :, : code_lens[i]]) for i in range(1, 8)]
    ar_gap, nar_gap = (sum(g) / len(gaps) for g in zip(*gaps))
    assert ar_gap > 0.3 and nar_gap > 0.3, f"AR gap {ar_gap:.3f}, NAR gap {nar_gap:.3f} nats"
    swapped = evaluation.text_gaps(ar, nar, "utterance 0", "utterance 1", no_prompt, None,
                                   codes[1, :, : code_lens[1]])
    assert swapped == pytest.approx([-g for g in gaps[0]], abs=1e-5)
