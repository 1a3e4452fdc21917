"""docs/figures.py: what it reads of a run, and the attention it draws (without matplotlib)."""
import importlib.util
import os

import torch

import valle
from conftest import ROOT

spec = importlib.util.spec_from_file_location("figures", os.path.join(ROOT, "docs", "figures.py"))
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)


def test_it_reads_each_models_validation_loss_and_the_wer_of_each_stop(tmp_path):
    (tmp_path / "train.log").write_text(
        "step   100 | ar 6.400 | grad norm ar 1.05 | lr 2.00e-04\n"
        "val    500 | ar 2.844 | top-1 accuracy per codebook 0:0.307 | 5.7 s\n"
        "val   1000 | ar 2.581 nar 6.100 | top-1 accuracy per codebook 0:0.342 | 5.5 s\n")
    log = str(tmp_path / "train.log")
    assert figures.validation_losses(log, "ar") == {500: 2.844, 1000: 2.581}
    assert figures.validation_losses(log, "nar") == {1000: 6.1}
    (tmp_path / "eval_2000.txt").write_text(
        "mode          system                         SIM   WER %\n"
        "continuation  recordings (ground truth)    0.842    14.5\n"
        "continuation  this model, G=2              0.809    41.3    1.11\n"
        "cross         this model, G=2              0.833    62.0    1.26\n")
    assert figures.eval_wers(str(tmp_path)) == {2000: {"continuation": 41.3, "cross": 62.0}}


def test_the_attention_it_draws_is_the_models_own():
    """Its probabilities, applied to the values, give what each block's attention computed."""
    torch.manual_seed(0)
    ar = valle.ARModel(valle.get_config("tiny", dropout=0.0)).eval()
    text, groups = torch.tensor([[20, 21, 22, 23, 24]]), torch.randint(0, 1024, (1, 6, 2))
    captured = []
    hooks = [b.qkv.register_forward_hook(lambda m, i, out: captured.append(out)) for b in ar.transformer.blocks]
    hooks += [b.proj.register_forward_pre_hook(lambda m, i: captured.append(i[0])) for b in ar.transformer.blocks]
    probs = figures.attention(ar, text, groups)  # (layers, heads, S, S)
    for h in hooks:
        h.remove()
    cfg, S = ar.cfg, 5 + 2 + 6
    assert probs.shape == (cfg.n_layer, cfg.n_head, S, S)
    assert torch.allclose(probs.sum(-1), torch.ones(cfg.n_layer, cfg.n_head, S))
    assert (probs.triu(1) == 0).all()  # causal
    for layer in range(cfg.n_layer):  # qkv and the proj input of this layer, from the same pass
        qkv, y = captured[2 * layer], captured[2 * layer + 1]
        v = qkv.split(cfg.d_model, dim=2)[2].view(1, S, cfg.n_head, cfg.head_dim).transpose(1, 2)
        mine = (probs[layer][None] @ v).transpose(1, 2).reshape(1, S, cfg.d_model)
        assert torch.allclose(mine, y, atol=1e-5)
    to_text = figures.text_attention(ar, text, groups)
    assert to_text.shape == (cfg.n_layer, 7, 5)  # <bos> and 6 groups, over 5 phones


def test_diagonality_prefers_a_monotonic_alignment():
    diagonal = torch.eye(10)
    assert figures.diagonality(diagonal) == 1.0
    stuck = torch.zeros(10, 10)
    stuck[:, 0] = 1  # every audio position on the first phone
    assert figures.diagonality(stuck) < 0.25  # only the first rows are near it
