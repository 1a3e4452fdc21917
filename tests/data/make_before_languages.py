"""
How tests/data/before_languages/ was made: files of the code base before languages were added
(commit 10c2c0a), which today's code must still read (tests/test_languages.py).

    git worktree add /tmp/old 10c2c0a
    python tests/data/make_before_languages.py tests/data/before_languages /tmp/old
    python /tmp/old/data/prepare.py --layout folder --src <a folder us_female/ holding
        data/demo/us_female/us_female_0{0,1,2}.*> --out tests/data/before_languages/dataset --codec untrained

The checkpoint: a small model (d_model 16), trained on made-up codes until its greedy choices
have margins; expected.json: the codes it gave then, greedy and sampled, and a likelihood.
"""
import json
import sys

import torch

sys.path.insert(0, sys.argv[2])  # the old code base
import valle  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
cfg = valle.get_config("tiny", d_model=16, n_head=2, n_layer=1, d_ff=32, dropout=0.0,
                       group_size=2, max_text_tokens=64, max_frames=400)
ar, nar = valle.ARModel(cfg), valle.NARModel(cfg)
g = torch.Generator().manual_seed(0)
T = 48
start = torch.randint(0, valle.CODEBOOK_SIZE, (2, valle.N_CODEBOOKS, 1), generator=g)
stride = torch.tensor([[[7]], [[13]]]) * torch.arange(1, valle.N_CODEBOOKS + 1)[:, None]
codes = (start + stride * torch.arange(T)) % valle.CODEBOOK_SIZE
code_lens = torch.tensor([T, T - 8])
texts = [valle.text_to_ids("The cat sat on the mat."), valle.text_to_ids("A dog ran.")]
text, text_valid = valle.pad_ids(texts)
opt = torch.optim.AdamW(list(ar.parameters()) + list(nar.parameters()), lr=3e-3)
for step in range(400):
    a, _ = ar.loss(text, text_valid.sum(1), codes, code_lens)
    n, _, _ = nar.loss(text, text_valid.sum(1), codes, code_lens, torch.Generator().manual_seed(step))
    opt.zero_grad()
    (a + n).backward()
    opt.step()
print("loss", a.item(), n.item())
ar.eval(), nar.eval()
prompt = codes[0, :, :12]
out = {}
for name, sampling in [("greedy", valle.Sampling(top_p=0.0)), ("sampled", valle.Sampling())]:
    got = valle.generate(ar, nar, ["The cat sat on the mat.", "A dog ran."], prompt, "The cat.",
                         sampling, seed=3, max_seconds=0.4)
    out[name] = [c.tolist() for c in got]
out["likelihood"] = valle.likelihood(ar, ["The cat sat on the mat."], prompt, "The cat.", [codes[0, :, 12:30]])
out["texts"] = ["The cat sat on the mat.", "A dog ran."]
out["prompt_text"] = "The cat."
out["made_with"] = "valle.py of commit 10c2c0a, tests/data/make_before_languages.py"
valle.save_checkpoint(sys.argv[1] + "/checkpoint.pt", config=cfg.to_dict(), phones=valle.PHONES,
                      codec="untrained-seed0", ar=ar.state_dict(), nar=nar.state_dict(), step=400)
torch.save({"prompt": prompt}, sys.argv[1] + "/prompt.pt")
json.dump(out, open(sys.argv[1] + "/expected.json", "w"))
print({k: (v if k == "likelihood" else None) for k, v in out.items()})
