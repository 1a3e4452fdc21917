"""int8 weights for CPU inference (speedups.quantize_int8): what is converted, and how closely the
int8 model agrees with the fp32 one."""
import copy

import pytest
import torch
import torch.ao.nn.quantized.dynamic as nnqd
import torch.nn as nn

import valle
from extras import speedups
from conftest import random_checkpoint, run_script, write_prompt


@pytest.mark.parametrize("G, ar_layers", [(1, 12), (2, 14)])  # 4 a block x 3 blocks, + W_g in and out
def test_every_linear_layer_of_the_blocks_becomes_int8_and_the_heads_stay_fp32(G, ar_layers):
    cfg = valle.get_config("tiny", dropout=0.0, group_size=G)
    ar, nar = valle.ARModel(cfg).eval(), valle.NARModel(cfg).eval()
    assert speedups.quantize_int8(ar) == ar_layers and speedups.quantize_int8(nar) == 12
    for model in (ar, nar):
        assert not [m for m in model.modules() if isinstance(m, nn.Linear)]  # none left in fp32
        assert sum(isinstance(m, nnqd.Linear) for m in model.modules()) in (ar_layers, 12)
    assert ar.code_emb.weight.dtype == torch.float32  # the tied code-prediction head


def trained_pair(steps=60):
    """A tiny AR + NAR trained for a few seconds on codes that walk in steps, and its data:
    random weights give near-flat logits, whose argmax says nothing about int8 vs fp32."""
    torch.manual_seed(0)
    cfg = valle.get_config("tiny", dropout=0.0, group_size=2)
    ar, nar = valle.ARModel(cfg), valle.NARModel(cfg)
    text, valid = valle.pad_ids([valle.text_to_ids("The walk goes up."), valle.text_to_ids("Another.")])
    start = torch.randint(0, 1024, (2, 8, 1), generator=torch.Generator().manual_seed(0))
    stride = torch.tensor([[[7]], [[13]]]) * torch.arange(1, 9)[:, None]
    codes = (start + stride * torch.arange(60)) % 1024  # (2, 8, 60)
    lens = torch.tensor([60, 50])
    opt = torch.optim.AdamW(list(ar.parameters()) + list(nar.parameters()), lr=3e-3)
    for step in range(steps):
        loss = ar.loss(text, valid.sum(1), codes, lens)[0] + \
            nar.loss(text, valid.sum(1), codes, lens, torch.Generator().manual_seed(step))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ar.eval(), nar.eval(), (text, valid, codes, lens)


def teacher_forced_argmax(ar, nar, data):
    """Top-1 predictions at every position: the AR's for codebook 0, the NAR's for 1..7."""
    text, valid, codes, lens = data
    G = ar.cfg.group_size
    with torch.inference_mode():
        groups = torch.stack([valle.group_codes(c[0, :n], G)[:-1] for c, n in zip(codes, [60, 60])])
        ar_top = ar(groups, None, None, text, valid).argmax(-1)  # (B, N + 1, G), from <bos> on
        prompt, target = codes[:, :, :20], codes[:, :, 20:]
        ones = lambda t: torch.ones(t.shape[0], t.shape[2], dtype=torch.bool)  # noqa: E731
        nar_top = [nar(text, valid, prompt, ones(prompt), target, ones(target), j).argmax(-1)
                   for j in range(1, 8)]
    return ar_top, nar_top


def test_int8_agrees_with_fp32_on_a_trained_model():
    ar, nar, data = trained_pair()
    ar8, nar8 = copy.deepcopy(ar), copy.deepcopy(nar)
    speedups.quantize_int8(ar8), speedups.quantize_int8(nar8)
    (a32, n32), (a8, n8) = teacher_forced_argmax(ar, nar, data), teacher_forced_argmax(ar8, nar8, data)
    ar_agree = (a32 == a8).float().mean().item()
    nar_agree = [(x == y).float().mean().item() for x, y in zip(n32, n8)]
    assert ar_agree > 0.9 and min(nar_agree) > 0.9, (ar_agree, nar_agree)  # measured 0.98, 0.96-1.0
    text, valid, codes, lens = data
    with torch.inference_mode():  # the model has learned something to agree on
        assert ar.loss(text, valid.sum(1), codes, lens)[1] > 0.2  # chance: 0.001; measured 0.27


def test_sample_int8_writes_audio_and_refuses_bf16_and_compile(tmp_path):
    random_checkpoint(tmp_path / "model.pt")
    write_prompt(tmp_path / "prompt.wav")
    base = ["sample.py", "--checkpoint", str(tmp_path / "model.pt"), "--prompt", str(tmp_path / "prompt.wav"),
            "--prompt-text", "The prompt.", "--text", "Hello world.", "--max-new-seconds", "1", "--int8"]
    out = run_script(*base, "--out", str(tmp_path / "int8.wav"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "int8.wav").exists() and "int8 weights: 26 linear layers" in out.stderr
    for flag in ("--bf16", "--compile"):
        out = run_script(*base, flag, "--out", str(tmp_path / "bad.wav"))
        assert out.returncode == 2 and f"--int8 and {flag} do not go together" in out.stderr
        assert not (tmp_path / "bad.wav").exists()


def test_bench_int8_accuracy_reads_both_models_on_trains_split(prepared, tmp_path):
    """bench.py --int8-accuracy measures on train.py's held-out split, through train.evaluate:
    both rows of agreement are filled (AR: codebook 0; NAR: each codebook 1-7 drawn)."""
    import re
    random_checkpoint(tmp_path / "model.pt")
    out = run_script("bench.py", "--int8-accuracy", str(tmp_path / "model.pt"), prepared)
    assert out.returncode == 0, out.stderr
    ar = re.search(r"AR top-1 agreement, codebook 0\s+([\d.]+)\s+teacher forced, \d+ positions of "
                   r"(\d+) held-out", out.stdout)
    nar = re.search(r"NAR top-1 agreement, codebooks 1-7\s+((?:[\d.]+ )+)\s*teacher forced", out.stdout)
    assert ar and nar, out.stdout
    assert int(ar[2]) == 1  # 5% of 12 utterances, at least one: train.split's
    assert float(ar[1]) > 0.5 and all(0.5 < float(x) <= 1 for x in nar[1].split())
