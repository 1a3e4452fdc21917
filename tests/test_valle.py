"""Tests of valle.py: CPU, offline, seconds."""
import contextlib
import copy
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import valle
from extras import audio, batched, cli, codecs, speedups
from valle import EOS


# --- grouped code modeling (§3.1) -------------------------------------------

@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_group_ungroup_round_trip(G):
    for T in range(0, 20):
        c0 = torch.randint(0, 1024, (T,))
        groups = valle.group_codes(c0, G)
        assert groups.shape == (T // G + 1, G)
        assert (groups[-1] == EOS).all() and (groups[:-1] != EOS).all()
        # leading codes are clipped so that T is a multiple of G
        assert torch.equal(valle.ungroup(groups), c0[T % G:])


def test_ungroup_drops_the_whole_group_that_holds_an_eos():
    # SPEC §2: training ends on a whole <eos> group, so inference keeps whole groups of codes
    for groups in ([[1, 2], [3, EOS], [EOS, EOS]], [[1, 2], [EOS, 3]], [[1, 2], [EOS, EOS]]):
        assert valle.ungroup(torch.tensor(groups)).tolist() == [1, 2]
    assert valle.ungroup(torch.tensor([[1, 2], [3, 4]])).tolist() == [1, 2, 3, 4]
    assert valle.ungroup(torch.tensor([[EOS, 5], [6, 7]])).tolist() == []


class EndsMidGroup(valle.ARModel):
    """G=2, hand-made logits: the prefill's group is (3, 4), each step's the next two codes, and
    the third group draws code 7 in slot 0 and <eos> in slot 1."""

    def logits(self, h):
        self.calls = getattr(self, "calls", 0) + 1  # one call a group, cached or naive
        out = torch.full((*h.shape[:2], 2, EOS + 1), -1e9)
        n = self.calls
        out[..., 0, 2 * n + 1] = out[..., 1, EOS if n == 3 else 2 * n + 2] = 0.0
        return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_group_with_eos_in_any_slot_ends_the_speech_and_keeps_none_of_its_codes(use_cache):
    ar = EndsMidGroup(valle.get_config("tiny", group_size=2)).eval()
    text, valid = valle.pad_ids([[12, 13]])
    out = valle.generate_ar(ar, text, valid, torch.zeros(0, dtype=torch.long), 10,
                            valle.Sampling(top_p=0.0, ras=False), use_cache=use_cache)[0]
    assert out.tolist() == [3, 4, 5, 6]  # (7, <eos>) ends it: whole groups, as in training


class HalfEos(valle.ARModel):
    """p(<eos>) = 1/2 in every slot, the other half shared by the 1024 codes."""

    def logits(self, h):
        out = torch.zeros(*h.shape[:2], self.cfg.group_size, EOS + 1)
        out[..., EOS] = math.log(1024)
        return out


def test_the_likelihood_scores_the_whole_eos_group_that_training_ends_on():
    from extras import scorers
    ar = HalfEos(valle.get_config("tiny", group_size=2)).eval()
    prompt = torch.randint(0, 1024, (8, 10))
    codes = torch.randint(0, 1024, (8, 4))  # two groups
    ended, cut = scorers.likelihood(ar, ["Hi.", "Hi."], prompt, "Hey.", [codes, codes], [True, False])
    code, eos = math.log(1 / 2048), math.log(1 / 2)
    assert ended == pytest.approx((4 * code + 2 * eos) / 6, abs=1e-4)  # the <eos> group: G codes
    assert cut == pytest.approx(code, abs=1e-4)


def test_decoding_ignores_the_mode_the_caller_left_the_models_in():
    torch.manual_seed(0)
    cfg = valle.get_config("tiny", dropout=0.5)
    ar, nar = valle.ARModel(cfg).eval(), valle.NARModel(cfg).eval()
    prompt = torch.randint(0, 1024, (8, 30), generator=torch.Generator().manual_seed(1))
    run = lambda: valle.generate(ar, nar, ["A few words.", "More."], prompt, "Hey.",  # noqa: E731
                                 valle.Sampling(top_p=0.0), max_seconds=1)
    evaluated = run()
    ar.train(), nar.train()  # as a training loop leaves them: dropout on
    trained = run()
    assert all(torch.equal(a, b) for a, b in zip(evaluated, trained))
    assert ar.training and nar.training  # and their mode comes back


def ar_logits(ar, text, groups):
    text, valid = valle.pad_ids([text])
    return ar(groups[None], None, None, text, valid)[0]  # from <bos>: (N + 1, G, 1025)


@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_ar_is_causal_over_groups(G):
    torch.manual_seed(G)
    ar = valle.ARModel(valle.get_config("tiny", group_size=G, dropout=0.0)).eval()
    groups = torch.randint(0, 1024, (6, G))
    before = ar_logits(ar, [10, 11, 12], groups)
    k = 3
    groups[k] = (groups[k] + 1) % 1024  # change group k: only predictions of groups > k move
    after = ar_logits(ar, [10, 11, 12], groups)
    assert torch.equal(before[: k + 1], after[: k + 1])
    assert not torch.allclose(before[k + 1:], after[k + 1:])


def test_ar_loss_counts_the_eos_group_and_ignores_padding(models):
    ar, _ = models
    text, valid = valle.pad_ids([[20, 21, 22], [23, 24]])
    codes = torch.randint(0, 1024, (2, 8, 12))
    lens = torch.tensor([12, 7])
    loss, _ = ar.loss(text, valid.sum(1), codes, lens)
    # the same items one at a time, weighted by their number of target codes
    G = ar.cfg.group_size
    losses = [ar.loss(text[i:i + 1, : valid[i].sum()], valid[i:i + 1].sum(1), codes[i:i + 1, :, : lens[i]],
                      lens[i:i + 1])[0] for i in range(2)]
    counts = [(int(n) // G + 1) * G for n in lens]  # real groups + the <eos> group
    expected = sum(l * n for l, n in zip(losses, counts)) / sum(counts)
    assert torch.allclose(loss, expected, atol=1e-5)


# --- decoding: KV cache vs naive, seeds, batches ----------------------------

@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("top_p", [0.0, 0.8])
def test_cached_decoding_matches_naive(G, top_p):
    torch.manual_seed(G)
    ar = valle.ARModel(valle.get_config("tiny", group_size=G, dropout=0.0)).eval()
    text, valid = valle.pad_ids([[12, 13, 14, 15, 16], [17, 18]])  # padded batch
    prompt = torch.randint(0, 1024, (13,))
    sampling = valle.Sampling(top_p=top_p)
    runs = [valle.generate_ar(ar, text, valid, prompt, 40 // G, sampling,
                              torch.Generator().manual_seed(7), use_cache=c) for c in (True, False)]
    for cached, naive in zip(*runs):
        assert len(cached) > 0
        assert torch.equal(cached, naive)


@pytest.mark.skipif(not speedups.ONEDNN, reason="this torch has no oneDNN")
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64), (1, 1, 2, 64), "transposed"])
def test_onednn_linear_matches_f_linear(shape):
    torch.manual_seed(0)
    x = torch.randn(64, 5).T if shape == "transposed" else torch.randn(*shape)
    w, b = torch.randn(300, 64), torch.randn(300)
    with torch.inference_mode():
        for bias in (b, None):
            assert torch.allclose(speedups.linear(x, w, bias), F.linear(x, w, bias), atol=1e-5)
    wg = w.clone().requires_grad_()
    speedups.linear(x, wg, b).sum().backward()  # training keeps the autograd path
    assert torch.allclose(wg.grad, x.reshape(-1, 64).sum(0).expand(300, 64), atol=1e-4)


@pytest.mark.skipif(not speedups.ONEDNN, reason="this torch has no oneDNN")
def test_decoding_does_not_depend_on_the_cpu_kernel(models, monkeypatch):
    ar, nar = copy.deepcopy(models)
    with torch.no_grad():
        for m in (ar, nar):
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    p.normal_(std=0.1)  # initialised to zero: make them count
    for m in (ar, nar):  # the module swap reaches every linear layer and the tied heads
        speedups.onednn(m)
        assert not any(type(x) in (torch.nn.Linear, valle.TiedHead) for x in m.modules())
    assert isinstance(ar.head, speedups.OneDNNHead) and isinstance(nar.head, speedups.OneDNNHead)
    monkeypatch.setattr(speedups, "ONEDNN_MIN_WEIGHT", 0)  # the tiny preset's weights are small
    text, valid = valle.pad_ids([[12, 13, 14, 15, 16], [17, 18]])
    groups = torch.randint(0, 1024, (2, 9, ar.cfg.group_size))
    codes = torch.randint(0, 1024, (2, 8, 18))

    @torch.inference_mode()
    def outputs():
        cache = valle.KVCache(ar.cfg, 2, text.shape[1] + 2 + 9)
        prefill = ar(groups[:, :-1], None, cache, text, valid)
        step = cache.step(ar, groups[:, -1:], torch.full((2, 1), 9))  # one matrix-vector step
        nar_logits = nar(text, valid, codes[..., :6], torch.ones(2, 6, dtype=torch.bool),
                         codes[..., 6:], torch.ones(2, 12, dtype=torch.bool), 3)
        return prefill, step, nar_logits

    fast = outputs()
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # PyTorch's own switch
    for a, b in zip(fast, outputs()):
        assert a.abs().max() > 0.1  # real logits, not zeros
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("B", [1, 2])  # at B=1 a view of the groups looks contiguous
def test_compiled_fixed_shape_decoding_matches_naive(monkeypatch, B):
    # The decode step that a GPU replays as a CUDA graph: compiled here for the CPU, where it
    # runs the same fixed-shape cache code (tensor write position, whole-buffer attention).
    monkeypatch.setattr(speedups, "ONEDNN_MIN_WEIGHT", 0)  # the naive path uses oneDNN, as at paper size
    torch.manual_seed(2)
    ar = speedups.onednn(valle.ARModel(valle.get_config("tiny", group_size=2, dropout=0.0)).eval())
    text, valid = valle.pad_ids([[12, 13, 14, 15, 16], [17, 18]][:B])
    prompt = torch.randint(0, 1024, (13,))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):  # one compile serves every step
        runs = [valle.generate_ar(ar, text, valid, prompt, 20, valle.Sampling(),
                                  torch.Generator().manual_seed(7), use_cache=not naive,
                                  cache_class=speedups.FixedShapeCache) for naive in (False, True)]
    for compiled, naive in zip(*runs):
        assert len(compiled) > 0
        assert torch.equal(compiled, naive)


def test_a_full_fixed_shape_cache_says_so_after_the_prefill(models):
    ar, _ = models
    text, valid = valle.pad_ids([list(range(20, 30))])
    groups = torch.randint(0, 1024, (1, 256 - 12, 2))
    with torch.inference_mode():
        cache = speedups.FixedShapeCache(ar.cfg, 1, 256)  # 256 slots, the rounding's unit
        ar(groups, None, cache, text, valid)  # the prefill fills every slot: 10 + 2 + 244
        with pytest.raises(RuntimeError, match="KV cache is full"):  # not a failed index_copy_
            cache.step(ar, groups[:, -1:], torch.full((1, 1), 245))


def test_same_seed_same_codes_other_seed_other_codes(models):
    ar, nar = models
    prompt = torch.randint(0, 1024, (8, 50))
    run = lambda seed: valle.generate(ar, nar, ["A short test."], prompt, "The prompt.", seed=seed)[0]  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert a.shape[0] == 8 and torch.equal(a, b)
    assert a.shape != c.shape or not torch.equal(a, c)


def test_batch_matches_one_at_a_time_when_greedy(models):
    ar, nar = models
    prompt = torch.randint(0, 1024, (8, 40))
    greedy = valle.Sampling(top_p=0.0, ras=False)
    texts = ["One.", "Two words here, and a few more.", "Three is the last one."]
    batch = valle.generate(ar, nar, texts, prompt, "Voice.", greedy, max_seconds=1)
    for text, together in zip(texts, batch):
        alone = valle.generate(ar, nar, [text], prompt, "Voice.", greedy, max_seconds=1)[0]
        assert torch.equal(together, alone)


def test_an_items_codes_do_not_depend_on_its_batch(models):
    ar, nar = models
    prompt = torch.randint(0, 1024, (8, 40), generator=torch.Generator().manual_seed(0))
    sampling = valle.Sampling(top_p=0.8)  # random draws and RAS on
    run = lambda texts, seed=3: valle.generate(ar, nar, texts, prompt, "Voice.", sampling,  # noqa: E731
                                               seed=seed, max_seconds=1)
    target = "The sentence we follow."
    alone = run([target])[0]
    for batch in ([target, "Two.", "Three words here."], ["One.", target, "Three words here."],
                  ["One, and more.", "Two.", target]):
        assert torch.equal(run(batch)[batch.index(target)], alone)
    # the candidates of one sentence (its seed + c * SEED_STRIDE), run as one batch, equal each
    # candidate run on its own
    three = run([target] * 3, [3 + batched.SEED_STRIDE * c for c in range(3)])
    assert len({c.shape[1] for c in three}) > 1 or not torch.equal(three[0], three[1])
    for c, codes in enumerate(three):
        gens = [torch.Generator().manual_seed(3 + batched.SEED_STRIDE * c)]  # candidate c's stream, alone
        text, valid = valle.pad_ids([valle.text_to_ids("Voice.") + [valle.PHONE_ID["_"]]
                                     + valle.text_to_ids(target)])
        max_groups = min(valle.MAX_FRAMES_PER_TOKEN * len(valle.text_to_ids(target)), 75) // 2
        c0 = valle.generate_ar(ar, text, valid, prompt[0], max_groups, sampling, gens)[0]
        assert torch.equal(codes[0], c0)
    assert torch.equal(three[0], alone)  # candidate 0 is the single sample


class LoopyAR(valle.ARModel):
    """Always prefers code 7; <eos> is its second choice (p = 0.27)."""

    def logits(self, h):
        out = torch.full((*h.shape[:2], self.cfg.group_size, EOS + 1), -1e9)
        out[..., 7], out[..., EOS] = 2.0, 1.0
        return out


def test_repetition_aware_sampling_escapes_a_greedy_loop():
    ar = LoopyAR(valle.get_config("tiny")).eval()
    text, valid = valle.pad_ids([[12, 13]])
    prompt = torch.tensor([1, 2, 3, 4])
    lengths = {}
    for ras in (False, True):
        out = valle.generate_ar(ar, text, valid, prompt, 200, valle.Sampling(top_p=0.0, ras=ras),
                                torch.Generator().manual_seed(0))[0]
        lengths[ras] = len(out)
    assert lengths[False] == 200 * ar.cfg.group_size  # greedy loops on code 7 until the cap
    assert lengths[True] < 20  # RAS falls back to plain sampling and soon draws <eos>


def test_eos_at_the_first_step_gives_empty_speech(models):
    class Mute(valle.ARModel):
        def logits(self, h):
            out = torch.full((*h.shape[:2], self.cfg.group_size, EOS + 1), -1e9)
            out[..., EOS] = 0.0
            return out
    _, nar = models
    ar = Mute(valle.get_config("tiny")).eval()
    out = valle.generate(ar, nar, ["Hello."], torch.randint(0, 1024, (8, 30)), "Hi.")
    assert out[0].shape == (8, 0)


def test_generation_stops_at_the_length_cap(models):
    ar, nar = models
    out = valle.generate(ar, nar, ["Hi."], torch.randint(0, 1024, (8, 30)), "Hey.",
                         valle.Sampling(top_p=0.0, ras=False))[0]
    n_tokens = len(valle.text_to_ids("Hi."))
    assert 0 < out.shape[1] <= valle.MAX_FRAMES_PER_TOKEN * n_tokens


class NeverEnds(valle.ARModel):
    """An AR model that never predicts <eos>: only the length limits stop it."""

    def logits(self, h):
        out = super().logits(h)
        out[..., EOS] = -1e9
        return out


@pytest.mark.parametrize("G", [1, 2, 4])
def test_prompt_and_speech_fill_the_position_tables_at_most(models, G):
    """The one length limit: prompt + speech <= max_frames, the size of both models' tables."""
    torch.manual_seed(0)
    cfg = valle.get_config("tiny", dropout=0.0, group_size=G, max_frames=40)
    ar, nar = NeverEnds(cfg).eval(), valle.NARModel(cfg).eval()
    text, valid = valle.pad_ids([[12, 13, 14]])
    for Tp in (29, 30):  # a prompt length that G divides, and one that it does not
        prompt = torch.randint(0, 1024, (8, Tp))
        c0 = valle.generate_ar(ar, text, valid, prompt[0], 1000, valle.Sampling(top_p=0.0))[0]
        assert len(c0) == (40 - Tp) // G * G  # every whole group that fits, no more
        assert valle.generate_nar(nar, text, valid, prompt, [c0])[0].shape == (8, len(c0))
    with pytest.raises(ValueError, match="the prompt fills"):
        valle.generate_ar(ar, text, valid, torch.randint(0, 1024, (40 - G + 1,)), 10)
    long = valle.generate(ar, nar, ["Hi."], torch.randint(0, 1024, (8, 30)), "Hey.", max_seconds=60)[0]
    assert long.shape == (8, 10 // G * G)  # max_seconds asks for more than the tables hold


# --- samplers (§3.4.1) ---------------------------------------------------------

def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(valle.filter_logits(logits, **kw))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.0) == [True, False, False, False]  # greedy
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.8 >= 0.7
    assert kept(top_p=0.85) == [True, True, True, False]
    assert kept(top_p=1.0) == [True] * 4


def test_repetition_ratio_counts_the_previous_k_codes():
    history = torch.tensor([[5, 5, 1, 2, 3, 4, 6, 7, 8, 9, 5],
                            [-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 3]])
    r = valle.repetition_ratio(torch.tensor([5, 3]), history, window=10)
    assert r.tolist() == [0.2, 0.1]  # the first 5 lies outside the window


def test_ras_falls_back_when_the_code_appeared_once_in_the_window():
    # Algorithm 1 with K=10, t_r=0.1: one earlier occurrence among the last ten codes is enough
    logits = torch.log(torch.tensor([0.6] + [0.4 / 9] * 9)).expand(2000, 10)  # prefers code 0
    cfg = valle.Sampling(top_p=0.0)  # the nucleus draw is always code 0
    g = torch.Generator().manual_seed(0)
    never = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1]).expand(2000, 20)
    assert (valle.repetition_aware_sample(logits, never, g, cfg) == 0).all()  # 0 is 11 codes back
    once = torch.tensor([9, 1, 2, 3, 4, 5, 6, 7, 8, 0]).expand(2000, 10)  # r = 0.1 = t_r
    codes = valle.repetition_aware_sample(logits, once, g, cfg)
    assert 0.35 < (codes != 0).float().mean() < 0.45  # a plain sample: 40% are not code 0
    off = valle.repetition_aware_sample(logits, once, g, valle.Sampling(top_p=0.0, ras=False))
    assert (off == 0).all()
    strict = valle.Sampling(top_p=0.0, ras_threshold=0.15)  # now two repeats are needed
    assert (valle.repetition_aware_sample(logits, once, g, strict) == 0).all()


class CycleAR(valle.ARModel):
    """Greedy decoding loops through codes 100..106 (a period of 7) for ever."""

    def logits(self, h):
        B, S = h.shape[:2]
        out = torch.full((B, S, self.cfg.group_size, EOS + 1), -1e9)
        out[..., 100:107] = 0.0
        out[..., EOS] = -3.0
        self.calls = getattr(self, "calls", 0) + 1
        out[..., 100 + self.calls % 7] = 5.0  # the preferred code moves on at every step (G=1)
        return out


def test_ras_breaks_a_loop_with_a_period_of_seven():
    # Reading RAS as "two repeats among the last ten" never fires on this loop: 0 fallbacks.
    ar = CycleAR(valle.get_config("tiny", group_size=1)).eval()
    text, valid = valle.pad_ids([[12, 13]])
    prompt = torch.tensor([1, 2, 3, 4])
    greedy = valle.generate_ar(ar, text, valid, prompt, 30, valle.Sampling(top_p=0.0, ras=False))[0]
    assert len(greedy) == 30 and greedy[:14].tolist() == [100 + (k + 1) % 7 for k in range(14)]
    ar.calls = 0
    ras = valle.generate_ar(ar, text, valid, prompt, 30, valle.Sampling(top_p=0.0),
                            torch.Generator().manual_seed(0))[0]
    assert len(ras) < 30 or not torch.equal(ras, greedy)  # the loop was broken
    assert torch.equal(ras[:7], greedy[:7])  # the first period has no repeat: pure greedy


def test_repetition_history_starts_with_the_prompt(monkeypatch):
    seen = []
    real = valle.repetition_aware_sample
    monkeypatch.setattr(valle, "repetition_aware_sample",
                        lambda logits, history, *a: seen.append(history.clone()) or real(logits, history, *a))
    ar = valle.ARModel(valle.get_config("tiny", group_size=2, dropout=0.0)).eval()
    text, valid = valle.pad_ids([[12, 13]])
    prompt = torch.arange(100, 125)  # 25 codes: the first is clipped to make whole groups
    valle.generate_ar(ar, text, valid, prompt, 2, valle.Sampling(), torch.Generator().manual_seed(0))
    assert seen[0].tolist() == [list(range(115, 125))]  # the prompt's last K = 10 codes
    assert seen[1][0, :-1].tolist() == list(range(116, 125))  # then the drawn code joins


def test_ras_fallback_is_a_plain_sample_from_the_full_distribution():
    # SPEC §4: temperature (like top-k and top-p) shapes the nucleus draw, not the fallback
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1])).expand(4000, 3)
    history = torch.zeros(4000, 10, dtype=torch.long)  # code 0 everywhere: the fallback fires
    cfg = valle.Sampling(temperature=0.5, top_p=0.0)  # the nucleus draw is code 0
    codes = valle.repetition_aware_sample(logits, history, torch.Generator().manual_seed(0), cfg)
    share = torch.bincount(codes, minlength=3) / 4000.0
    # the model's own 0.6 / 0.3 / 0.1; at temperature 0.5 it would be 0.78 / 0.20 / 0.02
    assert abs(share[0] - 0.6) < 0.03 and abs(share[2] - 0.1) < 0.02, share


def test_temperature_divides_the_logits():
    logits = torch.log(torch.tensor([1.0, 4.0])).expand(40000, 2)
    g = torch.Generator().manual_seed(0)
    share = valle.sample(logits, g, temperature=2.0).float().mean()  # p(1) = 2 / 3, not 16 / 17
    assert abs(share - 2 / 3) < 0.01
    assert abs(valle.sample(logits, g, temperature=0.5).float().mean() - 16 / 17) < 0.01


def test_each_row_has_its_own_random_stream():
    logits = torch.randn(3, 50)
    rows = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7)]  # noqa: E731
    together = valle.sample(logits, rows())
    alone = [valle.sample(logits[i:i + 1], [rows()[i]]) for i in range(3)]
    assert together.tolist() == [int(a) for a in alone]
    assert valle.sample(logits[[2, 0]], [rows()[2], rows()[0]]).tolist() == [together[2], together[0]]


def test_sampling_is_reproducible_with_a_generator():
    logits = torch.randn(4, 1025)
    history = torch.randint(0, 1025, (4, 10))
    draw = lambda: valle.repetition_aware_sample(logits, history, torch.Generator().manual_seed(3))  # noqa: E731
    assert torch.equal(draw(), draw())


# --- NAR (§3.3.2) --------------------------------------------------------------

def nar_inputs(B=2, Tp=10, T=15):
    text, valid = valle.pad_ids([[20, 21, 22, 23], [24, 25]][:B])
    prompt = torch.randint(0, 1024, (B, 8, Tp))
    target = torch.randint(0, 1024, (B, 8, T))
    ones = lambda n: torch.ones(B, n, dtype=torch.bool)  # noqa: E731
    return text, valid, prompt, ones(Tp), target, ones(T)


@pytest.mark.parametrize("j", [1, 4, 7])
def test_nar_reads_only_codebooks_below_j(models, j):
    _, nar = models
    text, tv, prompt, pv, target, tgv = nar_inputs()
    before = nar(text, tv, prompt, pv, target, tgv, j)
    changed = target.clone()
    changed[:, j:] = torch.randint(0, 1024, changed[:, j:].shape)
    assert torch.equal(before, nar(text, tv, prompt, pv, changed, tgv, j))
    changed[:, j - 1] = (changed[:, j - 1] + 1) % 1024
    assert not torch.allclose(before, nar(text, tv, prompt, pv, changed, tgv, j))


def test_nar_prompt_reads_all_eight_codebooks(models):
    _, nar = models  # Eq. 13: prompt frames embed the sum of all 8 codebooks
    text, tv, prompt, pv, target, tgv = nar_inputs()
    before = nar(text, tv, prompt, pv, target, tgv, 2)
    for k in (0, 3, 7):
        changed = prompt.clone()
        changed[:, k] = (changed[:, k] + 1) % 1024
        assert not torch.allclose(before, nar(text, tv, changed, pv, target, tgv, 2)), k


def test_nar_is_told_which_codebook_by_e_j(models):
    _, nar = models  # the code-ID token e_j (§3.3.2), not e_eos, ends the sequence
    nar = copy.deepcopy(nar)
    text, tv, prompt, pv, target, tgv = nar_inputs()
    before = nar(text, tv, prompt, pv, target, tgv, 4)
    with torch.no_grad():
        nar.codebook_id.weight[5] += 1.0  # another codebook's id: no effect on j = 4
        assert torch.equal(before, nar(text, tv, prompt, pv, target, tgv, 4))
        nar.codebook_id.weight[4] += 1.0
        assert not torch.allclose(before, nar(text, tv, prompt, pv, target, tgv, 4))


def test_the_nars_two_e_eos_compute_one_state_in_every_layer(models):
    # why they need no position of their own (NARModel's docstring)
    _, nar = models
    text, tv, prompt, pv, target, tgv = nar_inputs()
    states = []
    hooks = [b.register_forward_hook(lambda m, a, out: states.append(out)) for b in nar.transformer.blocks]
    nar(text, tv, prompt, pv, target, tgv, 3)
    for h in hooks:
        h.remove()
    L, S = text.shape[1], prompt.shape[2] + target.shape[2]
    for h in states:  # (B, L + 1 + S + 2, d): e_eos at L and at L + 1 + S
        assert torch.allclose(h[:, L], h[:, L + 1 + S], atol=1e-5)
        assert not torch.allclose(h[:, L], h[:, -1])  # e_j is another token


def test_nar_loss_skips_padded_target_frames(models):
    _, nar = models
    text, text_valid = valle.pad_ids([[20, 21, 22, 23], [24, 25]])
    codes = torch.randint(0, 1024, (2, 8, 30), generator=torch.Generator().manual_seed(0))
    code_lens = torch.tensor([30, 12])
    j = 3
    loss, _, _ = nar.loss(text, text_valid.sum(1), codes, code_lens, torch.Generator().manual_seed(5), j)
    # the same split, item by item: the loss is the mean over real target frames of both items
    frac = 0.1 + 0.4 * torch.rand(2, generator=torch.Generator().manual_seed(5))
    total, count = 0.0, 0
    for i in range(2):
        n, L = int(code_lens[i]), int(text_valid[i].sum())
        split = min(max(1, int(n * frac[i])), n - 1)
        ones = lambda m: torch.ones(1, m, dtype=torch.bool)  # noqa: E731
        logits = nar(text[i:i + 1, :L], ones(L), codes[i:i + 1, :, :split], ones(split),
                     codes[i:i + 1, :, split:n], ones(n - split), j)
        total += F.cross_entropy(logits[0], codes[i, j, split:n], reduction="sum")
        count += n - split
    assert torch.allclose(loss, total / count, atol=1e-5)


def test_nar_loss_reaches_target_frames_only(models):
    _, nar = models
    captured = {}
    nar.transformer.ln_f.register_forward_hook(lambda m, i, out: captured.update(h=out) or out.retain_grad())
    text, lens = valle.pad_ids([[20, 21, 22, 23]])[0], torch.tensor([4])
    codes = torch.randint(0, 1024, (1, 8, 40))
    loss, _, _ = nar.loss(text, lens, codes, torch.tensor([40]), torch.Generator().manual_seed(0))
    loss.backward()
    grad = captured["h"].grad[0].abs().sum(-1)  # (S,) per position
    L = 4 + 1  # text + e_eos
    audio = grad[L: L + 40]
    n_prompt = int((audio == 0).sum())
    assert 4 <= n_prompt <= 20  # the prompt is a 10-50% prefix, and carries no loss
    assert (audio[:n_prompt] == 0).all() and (audio[n_prompt:] > 0).all()
    assert (grad[:L] == 0).all() and (grad[L + 40:] == 0).all()


# --- text frontend -------------------------------------------------------------

def phones(text):
    return " ".join(valle.phonemize(text))


def test_numbers_are_spelled_out():
    assert "TH R IY1 _ D AA1 L ER0 Z" in phones("It costs $3.50.")
    assert "T W EH1 N T IY0 _ F AY1 V" in phones("25 cats")


def test_punctuation_and_word_boundaries():
    assert valle.phonemize("Hi, you?") == ["HH", "AY1", "_", ",", "_", "Y", "UW1", "_", "?"]


def test_unknown_word_gets_phones_from_the_neural_model():
    ps = valle.phonemize("Zorbulator")
    assert len(ps) >= 6 and all(p in valle.ARPABET for p in ps)


def test_homograph_reading_follows_the_context():
    ps = phones("I will record the record.")
    assert "R IH0 K AO1 R D" in ps and "R EH1 K ER0 D" in ps


def test_non_ascii_input():
    assert phones("café") == "K AH0 F EY1"  # accents are stripped
    assert phones("hello 你好 world") == phones("hello world")
    with pytest.raises(ValueError, match="nothing to pronounce"):
        valle.text_to_ids("你好")


@pytest.mark.parametrize("text", ["", "   ", "?!...", "123-"[:0]])
def test_empty_text_is_an_error(text):
    with pytest.raises(ValueError, match="nothing to pronounce"):
        valle.text_to_ids(text)


def test_ids_come_from_the_fixed_table():
    ids = valle.text_to_ids("Hello world.")
    assert [valle.PHONES[i] for i in ids] == valle.phonemize("Hello world.")
    assert len(valle.PHONES) == 3 + 6 + 70 + len(valle.IPA) <= valle.PHONE_SLOTS  # test_languages.py


def test_frontend_works_offline_without_downloads(tmp_path):
    code = (
        "import socket, nltk\n"
        "def refuse(*a, **k): raise RuntimeError('network access attempted')\n"
        "socket.socket.connect = refuse\n"
        "nltk.download = refuse\n"
        "import valle\n"
        "print(' '.join(valle.phonemize('I refuse to read 3 books.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"NLTK_DATA": str(tmp_path), "PATH": "/usr/bin:/bin",
                              "PYTHONPATH": str(__import__("pathlib").Path(valle.__file__).parent)})
    assert out.returncode == 0, out.stderr
    assert "R IH0 F Y UW1 Z" in out.stdout and "TH R IY1" in out.stdout


# --- codec ---------------------------------------------------------------------

def test_load_audio_downmixes_and_resamples(tmp_path):
    n = 16000
    stereo = np.stack([np.full(n, 0.5), np.full(n, 0.1)], axis=1).astype(np.float32)
    sf.write(tmp_path / "a.wav", stereo, 16000)
    wav = audio.load_audio(str(tmp_path / "a.wav"))
    assert wav.shape == (24000,)
    assert wav[1000:-1000].sub(0.3).abs().max() < 1e-3  # mean of the channels


def test_load_audio_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        audio.load_audio(str(tmp_path / "missing.wav"))
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match="cannot read"):
        audio.load_audio(str(tmp_path / "bad.wav"))


def test_codec_load_by_kind(tmp_path):
    assert codecs.load("untrained-seed3").kind == "untrained-seed3"
    with pytest.raises(ValueError, match="offline, pass --encodec-checkpoint"):
        codecs.load("pretrained", str(tmp_path / "missing.th"))
    (tmp_path / "bad.th").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load pretrained EnCodec") as error:
        codecs.load("pretrained", str(tmp_path / "bad.th"))
    assert "\n" not in str(error.value)  # one line, though torch's own message has many


def test_pick_device():
    assert cli.pick_device("cpu") == torch.device("cpu")
    assert cli.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="is not a device"):
        cli.pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            cli.pick_device("cuda:1")


def test_codec_round_trip_shapes(codec):
    wav = torch.randn(24000 + 100)
    codes = codec.encode(wav)
    assert codes.shape == (8, math.ceil(24100 / 320)) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 1024
    assert codec.decode(codes).shape == (codes.shape[1] * 320,)


def test_test_codec_codes_follow_the_audio(codec):
    t = torch.arange(24000) / 24000
    a = codec.encode(torch.sin(2 * math.pi * 220 * t))
    b = codec.encode(torch.sin(2 * math.pi * 880 * t) * (t < 0.5))
    for k in range(8):  # every codebook is informative, not stuck on code 0
        assert len(a[k].unique()) > 5
    assert (a != b).float().mean() > 0.5
    assert torch.equal(a, codecs.untrained(seed=0).encode(torch.sin(2 * math.pi * 220 * t)))


def steady_vowel(seconds=1.0, f0=137.0):
    """A sustained vowel-like sound: harmonics of f0 with a formant-like envelope. (At 150 Hz
    a hop would hold two whole periods, and every frame would see the same phase.)"""
    t = torch.arange(int(seconds * valle.SAMPLE_RATE)) / valle.SAMPLE_RATE
    amps = [math.exp(-((k * f0 - 700) / 400) ** 2) + 0.5 * math.exp(-((k * f0 - 1200) / 300) ** 2)
            for k in range(1, 30)]
    return 0.3 * sum(a * torch.sin(2 * math.pi * k * f0 * t) for k, a in enumerate(amps, 1))


DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "demo")


def changes(c0):
    return (c0[1:] != c0[:-1]).float().mean().item()


def test_spectral_codec_codes_follow_what_is_said(codec):
    """The spectral test codec's codes follow the spectrum, the untrained one's the waveform's
    phase: through a steady sound its codes stay put, and the same recording 160 samples (half a
    hop) later keeps most of them, where the untrained codec changes nearly every code. So the
    same sentence in two similar voices shares many codes, more than two sentences in one voice.
    (Measured on data/demo: half-hop shift 0.27 vs 0.90 edits per code; same sentence 0.45 vs
    same voice 0.82, where the untrained codec gives 0.89 vs 0.91.)"""
    from rapidfuzz.distance import Levenshtein
    spectral = codecs.load("spectral-seed0")
    assert spectral.kind == "spectral-seed0" and not spectral.speaks and not codec.speaks
    vowel = steady_vowel()
    assert changes(spectral.encode(vowel)[0, 4:]) < 0.1  # after the window fills
    assert changes(codec.encode(vowel)[0, 4:]) > 0.5
    wavs = {(speaker, i): audio.trim_silence(audio.load_audio(
        os.path.join(DEMO, speaker, f"{speaker}_{i:02d}.flac")))
        for speaker in ("us_male", "gb_male") for i in range(6)}

    def edits(a, b):
        return Levenshtein.normalized_distance(a[0].tolist(), b[0].tolist())

    def shifted(c):  # mean edits per code between a recording and itself half a hop later
        return sum(edits(c.encode(w), c.encode(F.pad(w, (160, 0))))
                   for (s, _), w in wavs.items() if s == "us_male") / 6
    assert shifted(spectral) < 0.4 and shifted(codec) > 0.7
    codes = {k: spectral.encode(w) for k, w in wavs.items()}
    same_sentence = sum(edits(codes["us_male", i], codes["gb_male", i]) for i in range(6)) / 6
    same_voice = sum(edits(codes[s, i], codes[s, (i + 1) % 6])
                     for s in ("us_male", "gb_male") for i in range(6)) / 12
    assert same_sentence < same_voice - 0.2
    # causal like EnCodec: a batch pads on the right and changes nothing but the last frame
    a, b = vowel[:20_000], steady_vowel(0.5, 110.0)
    for one, batched in zip((a, b), spectral.encode_batch([a, b])):
        assert torch.equal(spectral.encode(one)[:, :-1], batched[:, :-1])


# --- learning --------------------------------------------------------------------

def test_tiny_ar_and_nar_overfit_one_utterance(codec):
    """Both losses fall from ~6.9 (uniform over 1024 codes) in 250 steps: the AR to under 0.05
    (seen: 0.003), the NAR, averaged over codebooks 1..7, to under 0.6 (seen: 0.15). The overfit
    AR then continues its own prompt with exactly the training codes, <eos> included."""
    torch.manual_seed(0)
    t = torch.arange(int(1.2 * 24000)) / 24000
    codes = codec.encode(torch.sin(2 * math.pi * (150 + 300 * t) * t))[None]  # (1, 8, 90)
    lens = torch.tensor([codes.shape[2]])
    text = torch.tensor([valle.text_to_ids("A rising tone.")])
    text_lens = torch.tensor([text.shape[1]])
    cfg = valle.get_config("tiny", dropout=0.0)
    ar, nar = valle.ARModel(cfg), valle.NARModel(cfg)
    opt = torch.optim.AdamW(list(ar.parameters()) + list(nar.parameters()), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    nar_loss = lambda j: nar.loss(text, text_lens, codes, lens, torch.Generator().manual_seed(1), j)[0]  # noqa: E731
    first = ar.loss(text, text_lens, codes, lens)[0].item(), nar_loss(3).item()
    for step in range(250):
        ar_loss, _ = ar.loss(text, text_lens, codes, lens)
        loss, _, _ = nar.loss(text, text_lens, codes, lens, g)
        opt.zero_grad()
        (ar_loss + loss).backward()
        opt.step()
    assert first[0] > 6.5 and first[1] > 6.5
    with torch.no_grad():
        final_nar = sum(nar_loss(j).item() for j in range(1, 8)) / 7
    assert ar_loss.item() < 0.05 and final_nar < 0.6, (ar_loss.item(), final_nar)
    ar.eval()
    prompt = codes[0, 0, :20]
    out = valle.generate_ar(ar, text, torch.ones_like(text, dtype=torch.bool), prompt, 100,
                            valle.Sampling(top_p=0.0, ras=False))[0]
    assert torch.equal(out, codes[0, 0, 20:])


def test_trim_silence_cuts_both_ends_with_a_margin():
    sr = valle.SAMPLE_RATE
    tone = 0.5 * torch.sin(2 * math.pi * 200 * torch.arange(sr) / sr)
    wav = torch.cat([torch.zeros(sr // 2), tone, torch.zeros(sr)])  # 0.5 s + 1 s + 1 s
    out = audio.trim_silence(wav)
    assert abs(len(out) - (sr + 2 * int(0.05 * sr))) <= sr // 50  # the tone and two 50 ms margins
    assert out.abs().max() == tone.abs().max()
    assert len(audio.trim_silence(torch.zeros(sr))) == 0
    assert torch.equal(audio.trim_silence(tone), tone)


# --- bf16: CPU autocast as the proxy for the GPU's ------------------------------------

def cached_and_naive_logits(ar, groups):
    """Logits of the last 3 positions: from one full forward, and from a prefill + 3 cached
    single-group steps. Returns (naive, cached, cache)."""
    text, valid = valle.pad_ids([[12, 13, 14, 15, 16], [17, 18]])
    N = groups.shape[1]
    naive = ar(groups, None, None, text, valid)[:, -3:]
    cache = valle.KVCache(ar.cfg, 2, text.shape[1] + 2 + N)
    ar(groups[:, :-3], None, cache, text, valid)  # the prefill
    cached = torch.cat([cache.step(ar, groups[:, n:n + 1], torch.full((2, 1), n + 1))
                        for n in range(N - 3, N)], dim=1)  # group n at audio position n + 1
    return naive.float(), cached.float(), cache


@pytest.mark.parametrize("size", ["tiny", "onednn"])
def test_bf16_autocast_decoding_and_training(size):
    # "onednn": weights above speedups.ONEDNN_MIN_WEIGHT, which fp32 inference sends to oneDNN
    extra = dict(n_layer=2, n_head=8, d_model=512, d_ff=2048) if size == "onednn" else {}
    torch.manual_seed(0)
    ar = valle.ARModel(valle.get_config("tiny", dropout=0.0, **extra)).eval()
    assert (ar.transformer.blocks[0].qkv.weight.numel() >= speedups.ONEDNN_MIN_WEIGHT) == (size == "onednn")
    groups = torch.randint(0, 1024, (2, 9, 2), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        naive32, cached32, cache32 = cached_and_naive_logits(ar, groups)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            naive, cached, cache = cached_and_naive_logits(ar, groups)
    assert cache32.k[0].dtype == torch.float32 and cache.k[0].dtype == torch.bfloat16
    assert torch.allclose(naive32, cached32, atol=1e-5)  # fp32: the same up to summation order
    # bf16 (8 bits of mantissa): logits of scale ~1 agree to a few hundredths
    assert (naive - cached).abs().max() < 0.05, (naive - cached).abs().max()
    assert (naive - naive32).abs().max() < 0.1 and (naive - naive32).abs().max() > 0  # really bf16
    # a training step under autocast: finite, close to fp32, with gradients for every weight
    ar.train()
    text, lens = valle.pad_ids([[12, 13, 14, 15, 16]])[0], torch.tensor([5])
    codes = torch.randint(0, 1024, (1, 8, 30), generator=torch.Generator().manual_seed(2))
    loss32 = ar.loss(text, lens, codes, torch.tensor([30]))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ar.loss(text, lens, codes, torch.tensor([30]))[0]
    loss.backward()
    assert abs(loss.item() - loss32.item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ar.parameters()
               if p is not ar.text_pos.weight)


def test_bf16_fixed_shape_step_and_bf16_weights():
    import golden  # a trained model, whose greedy choices win by margins that bf16 keeps: a
    ar, _ = golden.load_weights()  # random one's near-ties flip with the CPU's kernels
    text, valid, codes, _ = golden.made_up_batch()
    run = lambda **kw: valle.generate_ar(ar, text, valid, codes[0, 0, :16], 12,  # noqa: E731
                                         valle.Sampling(top_p=0.0), torch.Generator().manual_seed(7), **kw)
    fp32 = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = run(use_cache=False)
        fixed = run(cache_class=speedups.FixedShapeCache)  # the compiled fixed-shape step
    assert [len(a) for a in naive] == [len(a) for a in fp32] == [24, 24]
    for other in (fixed, fp32):  # 48 of 48 on AVX-512, on AVX2 and with oneDNN off
        assert sum(int((a[:n] == b[:n]).sum()) for a, b in zip(naive, other)
                   for n in [min(len(a), len(b))]) >= 0.9 * 48
    torch.manual_seed(0)
    ar = valle.ARModel(valle.get_config("tiny", dropout=0.0)).eval()
    text, valid = valle.pad_ids([[12, 13, 14, 15, 16], [17, 18]])
    prompt = torch.randint(0, 1024, (13,), generator=torch.Generator().manual_seed(1))
    bf16 = speedups.bf16_linears(copy.deepcopy(ar))  # what sample.py --bf16 does, under autocast
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, cache = cached_and_naive_logits(bf16, torch.randint(0, 1024, (2, 9, 2)))
        assert cache.k[0].dtype == torch.bfloat16
        assert all(len(c) > 0 for c in valle.generate_ar(bf16, text, valid, prompt, 12,
                                                          valle.Sampling(top_p=0.0)))


# --- golden regression ----------------------------------------------------------

def test_golden_codes_are_unchanged():
    """The stored weights (tests/data/golden.pt) give the stored codes, exactly, on any CPU: any
    change that alters decoding fails here. When the change is meant, run `python
    tests/golden.py --write` and say why in the commit."""
    import golden  # tests/golden.py: pytest puts tests/ on the path
    expected = golden.expected()
    got = golden.decode(*golden.load_weights())
    assert set(got) == set(expected) - {f"loss_first_{golden.LOSS_STEPS}_steps"}
    for name in got:
        assert got[name] == expected[name], name


def test_golden_training_losses_are_unchanged():
    """The first steps of training from the same seed give the stored losses, within a
    tolerance: training is not bit-reproducible across instruction sets."""
    import golden
    stored = golden.expected()[f"loss_first_{golden.LOSS_STEPS}_steps"]
    losses = golden.train(golden.LOSS_STEPS)[2]
    assert losses == pytest.approx(stored, rel=golden.LOSS_RTOL)


# --- right on GPUs: no waiting for the device, devices, budgets, precision -------------------

@pytest.mark.parametrize("G", [1, 2, 4])
def test_group_batch_groups_each_row_on_its_own(G):
    c0 = torch.randint(0, 1024, (3, 13))
    lens = torch.tensor([13, 6, 9])
    batch = valle.group_batch(c0, lens, G)
    assert batch.shape == (3, 13 // G + 1, G)
    for row, n in zip(range(3), lens.tolist()):  # clip n % G leading codes, close with <eos>
        own = torch.cat([c0[row, n % G: n], torch.full((G,), EOS)]).view(-1, G)
        assert torch.equal(batch[row, : len(own)], own)
        assert (batch[row, len(own):] == valle.IGNORE).all()


class DeviceReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations that make the host wait for a device (a value read back, a boolean
    mask's count: nonzero, or indexing with a mask; a copy onto it that is not non_blocking),
    on tensors of the given device."""
    WAITS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)

    def __init__(self, device):
        super().__init__()
        self.device, self.reads = torch.device(device), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        on_device = [a for a in args if isinstance(a, torch.Tensor) and a.device == self.device]
        if func in self.WAITS and on_device:
            self.reads.append(str(func))
        if func == torch.ops.aten.index.Tensor and on_device and any(  # x[mask] counts it inside
                i is not None and i.dtype == torch.bool for i in args[1]):
            self.reads.append("boolean mask")
        if (func == torch.ops.aten._to_copy.default and (kwargs or {}).get("device") == self.device
                and not (kwargs or {}).get("non_blocking")):  # a copy in that waits for the device
            self.reads.append("blocking copy")
        return func(*args, **(kwargs or {}))


def test_a_training_step_never_waits_for_the_device():
    """A whole train.py step (both losses, backward, clipping, AdamW) on the meta device, which
    stands in for a GPU: lengths come from the CPU, and no value is read back from the device
    (on meta a read would fail anyway: it has no values)."""
    import argparse
    import train
    torch.manual_seed(0)
    cfg = valle.get_config("tiny", dropout=0.0)
    raw = train.Both(valle.ARModel(cfg), valle.NARModel(cfg)).to("meta")
    optimizer = torch.optim.AdamW(raw.parameters(), foreach=True)
    text, text_lens = torch.randint(3, 60, (2, 12)).to("meta"), torch.tensor([12, 7])
    codes, code_lens = torch.randint(0, 1024, (2, 8, 40)).to("meta"), torch.tensor([40, 23])
    batches = iter([(text, text_lens, codes, code_lens)] * 2)
    args = argparse.Namespace(grad_accum=2, clip=1.0)
    with DeviceReads("meta") as reads:
        stats, norms = train.train_step(raw, raw, optimizer, batches, torch.Generator().manual_seed(0),
                                        contextlib.nullcontext(), args, ddp=False)
    assert reads.reads == []
    assert sorted(stats) == ["ar", "ar_acc", "nar", "nar_acc"] and sorted(norms) == ["ar", "nar"]
    assert all(v.device.type == "meta" for v in [*stats.values(), *norms.values()])
    # the counter sees what the old losses did: a CUDA-scalar slice and a boolean mask
    with DeviceReads("cpu") as reads:
        lens = torch.tensor([5, 3])
        torch.zeros(2, 9)[0, : lens[0]], torch.zeros(4)[torch.tensor([True, False, True, True])]
    assert reads.reads == ["aten._local_scalar_dense.default", "boolean mask"]
    with DeviceReads("meta") as reads:
        lens.to("meta"), lens.to("meta", non_blocking=True)
    assert reads.reads == ["blocking copy"]


def test_sampling_refuses_values_that_would_decode_wrongly():
    for bad in (dict(temperature=0), dict(temperature=-1), dict(temperature=float("nan")),
                dict(ras_window=0), dict(ras_threshold=0), dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            valle.Sampling(**bad)
    valle.Sampling(temperature=0.5, top_p=0.0, ras_window=1, ras_threshold=1.0)  # all fine


def test_codec_takes_input_from_any_device():
    class Spy(torch.nn.Module):  # an EnCodec on another device (meta), recording its inputs
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, device="meta"))
            self.seen = []

        def set_target_bandwidth(self, bw):
            pass

        def encode(self, x):
            self.seen.append(x.device.type)
            return [(torch.zeros(len(x), 8, 3, dtype=torch.long), None)]  # codes: any device

        def decode(self, frames):
            self.seen.append(frames[0][0].device.type)
            return torch.zeros(1, 1, 960, device=frames[0][0].device)

    codec = valle.Codec(Spy(), "spy")
    codec.encode(torch.zeros(960))
    codec.encode_batch([torch.zeros(960), torch.zeros(640)])
    codec.decode(torch.zeros(8, 3, dtype=torch.long))
    assert codec.model.seen == ["meta"] * 3


def test_checkpoints_reach_the_disk_before_they_replace_the_last(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("replace") or real_replace(a, b))
    cli.save_checkpoint(str(tmp_path / "c.pt"), step=3)
    assert calls == ["fsync", "replace", "fsync"]  # the data, the rename, then the folder's entry
    assert torch.load(tmp_path / "c.pt", weights_only=True) == {"step": 3}
    assert os.listdir(tmp_path) == ["c.pt"]


def test_each_item_has_its_own_step_budget_and_batches_may_be_capped(models):
    """Without <eos>, an item stops at its own budget (MAX_FRAMES_PER_TOKEN per text token),
    not at the budget of its batch's longest text; so capped batches give the same codes."""
    _, nar = models
    torch.manual_seed(0)
    ar = NeverEnds(valle.get_config("tiny", dropout=0.0)).eval()
    prompt = torch.randint(0, 1024, (8, 30), generator=torch.Generator().manual_seed(0))
    texts = ["Hi.", "A longer one here.", "Go."]
    texts = [t for t in texts for _ in range(2)]  # two candidates each
    seeds = [5 + batched.SEED_STRIDE * c for _ in range(3) for c in range(2)]
    whole, ended = batched.generate(ar, nar, texts, prompt, "Hey.", seed=seeds, max_batch=None)
    for k, text in enumerate(texts):
        budget = valle.MAX_FRAMES_PER_TOKEN * len(valle.text_to_ids(text)) // 2 * 2
        assert whole[k].shape == (8, budget)
    assert ended == [False] * 6  # each reached its budget: cut off
    for cap in (1, 4):
        capped, _ = batched.generate(ar, nar, texts, prompt, "Hey.", seed=seeds, max_batch=cap)
        assert all(torch.equal(a, b) for a, b in zip(whole, capped))


def test_bf16_inference_keeps_norms_residual_and_logits_in_fp32():
    """speedups.bf16_linears under autocast (sample.py --bf16): bf16 matrix products, the rest fp32;
    closer to fp32 than casting every weight to bf16 (what --bf16 did before)."""
    import golden
    ar, _ = golden.load_weights()
    text, valid, codes, _ = golden.made_up_batch()
    groups = valle.group_codes(codes[0, 0], 2)[None, :-1]

    def logits(model, autocast):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(groups, None, None, text[:1], valid[:1])

    fp32 = logits(ar, False)
    mixed_model = speedups.bf16_linears(copy.deepcopy(ar))
    assert mixed_model.transformer.blocks[0].qkv.weight.dtype == torch.bfloat16
    assert mixed_model.transformer.blocks[0].ln1.weight.dtype == torch.float32
    assert mixed_model.code_emb.weight.dtype == torch.float32
    mixed = logits(mixed_model, True)
    cast = logits(copy.deepcopy(ar).to(torch.bfloat16), False)
    assert mixed.dtype == torch.float32 and cast.dtype == torch.float32  # the head is fp32
    error, cast_error = (mixed - fp32).abs().mean(), (cast - fp32).abs().mean()
    assert 0 < error < cast_error, (error, cast_error)
    agree = (mixed.argmax(-1) == fp32.argmax(-1)).float().mean()
    assert agree == 1.0  # the golden model's choices win by margins that bf16 keeps
