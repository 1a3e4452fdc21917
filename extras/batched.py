"""
valle.generate as the scripts call it, for many texts: in batches of at most max_batch, each
text with a random stream of its own (candidate c of a text: seed + c * SEED_STRIDE), a progress
report at each decode step, and whether each text's speech ended with <eos> or was cut off.

    codes, ended = batched.generate(ar, nar, texts, prompt_codes, prompt_text, seed=[...])
"""
import valle

SEED_STRIDE = 1_000_003  # candidate c of a text draws from seed + c * SEED_STRIDE (0: the seed)
# Texts decoded at once by default. At the paper's size a row takes about 0.25 GB in bf16: the
# AR's KV cache, the NAR's attention mask and activations (an estimate).
MAX_BATCH = 32


def reporting(cache_class, progress, total):
    """cache_class whose decode steps call progress(step, total): step 1 follows the first group."""
    class Reporting(cache_class):
        def step(self, model, new, pos):
            self.steps = getattr(self, "steps", 0) + 1
            progress(self.steps, total)
            return super().step(model, new, pos)
    return Reporting


def generate(ar, nar, texts, prompt_codes, prompt_text, sampling=valle.Sampling(), seed=0,
             max_seconds=None, use_cache=True, progress=None, cache_class=valle.KVCache,
             language="en", prompt_language="en", max_batch=MAX_BATCH):
    """valle.generate in batches of at most max_batch texts (None or 0: one batch) -> (codes,
    ended): a list of (8, T_i) codes, and whether each text's speech ended with <eos> (False: it
    reached its budget, cut off). seed: an int, or one per text. Every batch's text is checked
    before any is decoded. progress(step, total), if given, hears each batch's decode steps."""
    cfg, G = ar.cfg, ar.cfg.group_size
    target_ids = [valle.text_to_ids(t, language) for t in texts]
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(texts)
    if len(seeds) != len(texts):
        raise ValueError(f"{len(seeds)} seeds for {len(texts)} texts: give one per text")
    rows = max_batch or len(texts)
    batches = range(0, len(texts), rows)
    for k in batches:  # raises on a text too long for the model, before anything is decoded
        valle.prompted_text(cfg, target_ids[k: k + rows], prompt_text, None, prompt_language)
    budgets = valle.speech_budget(cfg, target_ids, max_seconds)
    room = (cfg.max_frames - prompt_codes.shape[1]) // G  # what generate_ar cuts budgets to
    codes, ended = [], []
    for k in batches:
        batch = slice(k, k + rows)
        steps = cache_class if progress is None else reporting(cache_class, progress, max(budgets[batch]))
        out = valle.generate(ar, nar, texts[batch], prompt_codes, prompt_text, sampling, seeds[batch],
                             max_seconds, use_cache, steps, language, prompt_language)
        codes += out
        # an item that drew no <eos> has exactly its budget of groups (valle.generate_ar)
        ended += [c.shape[1] < G * min(b, room) for c, b in zip(out, budgets[batch])]
    return codes, ended
