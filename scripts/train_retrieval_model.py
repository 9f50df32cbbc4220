#!/usr/bin/env python3
"""Trains data/models/antkv-retrieval-2m: a ~1.7M-parameter LLaMA (transformers LlamaForCausalLM; GQA 4/2,
head_dim 64, context 4096) that is a language model of book text AND retrieves (passkey, single/multi-key,
multi-value, multi-query needles; scripts/retrieval_tasks.py), small enough to keep in the repository (a test tool,
not part of the toolkit; PyTorch on the GPU machine).

  train_retrieval_model.py --text books-calib.txt --tokenizer-from models/stories260K --out DIR
      [--steps N | --steps auto --budget-s 300] [--seed 1234] [--workers 8]

Data (deterministic per seed and step): every window starts with BOS. Window kinds: a retrieval task (haystack:
book text, or 25% of them the repeated RULER noise sentence; depth uniform in [0, 1] with 10% at exactly 0 or 1),
plain book text (10%), and copy windows (book spans of 16-256 tokens each followed by its repeat: 30% of the
windows in the first quarter of the steps, 5% later), which make the induction (copy) heads that retrieval needs
form early: a first run without them (4039 steps, 265M tokens) learned the answer format but not to copy the value.
Window lengths: 256/512 for the first quarter of the steps (many tasks per step), then 512..4096 (4096 most often);
65536 tokens per step. Loss: mean next-token NLL over all non-answer positions (the model stays a language model
of the text) + --answer-weight x mean NLL over the answer tokens (value(s) and EOS). Batches after the first
timing steps are made by --workers processes (each batch depends only on the seed and its step).
--steps auto times a few steps of each length and picks the step count that fits --budget-s; the count used is
printed and written to train_log.json (pass it as --steps to repeat the run). Output in HF layout: config.json,
model.safetensors (bf16, tied embeddings), tokenizer.json, tokenizer_config.json, train_log.json.
Checkpoint selection (--select-cases > 0, the default): from --select-from of the steps on, --select-evals times
plus once at the last step, the live model decodes passkey and single-needle cases (needle_accuracy.py's, seed
--select-seed, haystack the training text; lengths 1024/2048/4096 up to --max-pos x 5 depths x --select-cases) and
the weights with the best mean of the two accuracies are the ones saved (ties: the later step). Why: answer-token accuracy during training
does not predict passkey accuracy at the evaluation's lengths and depths (a run 1.45x longer than the committed
model's ended at 0.984 answer-token accuracy, against 0.981, yet retrieved 60% of passkeys against 95%).
Fine-tuning (--init-from DIR, e.g. the committed model): the model and its architecture come from DIR (the
architecture flags are ignored), there is no early phase (no short windows, copy windows at 5%), --task-mix can shift
the tasks' shares, and the selection evaluates the starting weights first, so the saved weights are never worse than
the start on the selection cases. train_log.json then keeps the base model's log under "base_log".
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.utils.data
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import retrieval_tasks as rt  # noqa: E402
import needle_accuracy as na  # noqa: E402

LENGTHS = (256, 512, 1024, 2048, 4096)
EARLY_LENGTHS = (256, 512)
EARLY_FRACTION = 0.25
MAIN_LENGTHS = (512, 1024, 2048, 4096)
MAIN_MIX = (0.1, 0.2, 0.3, 0.4)
CALIB_PER_LENGTH = 8
TASK_MIX = {"passkey": 0.25, "niah_single": 0.25, "niah_multikey": 0.2, "niah_multivalue": 0.1, "niah_multiquery": 0.2}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", nargs="+", required=True, help="training text file(s)")
    p.add_argument("--tokenizer-from", required=True, help="folder with tokenizer.json and tokenizer_config.json")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", default="auto", help="step count, or 'auto' to fit --budget-s")
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--answer-weight", type=float, default=2.0)
    p.add_argument("--eos-weight", type=float, default=1.0,
                   help="weight of an answer's closing EOS among its answer tokens (1: as the value's tokens); the "
                        "retrieval model's misses copy the value and do not stop (recipes/needle-results.md)")
    p.add_argument("--workers", type=int, default=8, help="data processes after the timing steps (0: none)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--max-pos", type=int, default=4096)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--select-cases", type=int, default=2, help="cases per length x depth of each selection "
                   "evaluation (0: no selection, the last step's weights are saved)")
    p.add_argument("--select-from", type=float, default=0.5, help="fraction of the steps after which to evaluate")
    p.add_argument("--select-evals", type=int, default=8, help="evaluations from --select-from on, one more at the last step")
    p.add_argument("--select-seed", type=int, default=4321, help="seed of the selection cases (not the reference's)")
    p.add_argument("--select-s-per-eval", type=float, default=4.0,
                   help="seconds reserved per evaluation when --steps auto sizes the run")
    p.add_argument("--init-from", default=None, help="fine-tune the HF-layout model in this folder (see above)")
    p.add_argument("--task-mix", default=None, help="task=share,... over " + ", ".join(TASK_MIX)
                   + " (shares normalized; default " + ",".join(f"{k}={v:g}" for k, v in TASK_MIX.items()) + ")")
    a = p.parse_args()
    a.task_mix_dict = dict(TASK_MIX)
    if a.task_mix is not None:
        mix = {}
        for part in a.task_mix.split(","):
            k, _, v = part.partition("=")
            try:
                mix[k.strip()] = float(v)
            except ValueError:
                p.error(f"--task-mix {a.task_mix}: '{part}' is not task=share")
            if k.strip() not in TASK_MIX or mix[k.strip()] < 0:
                p.error(f"--task-mix {a.task_mix}: '{part}': unknown task or negative share")
        if sum(mix.values()) <= 0:
            p.error(f"--task-mix {a.task_mix}: the shares sum to zero")
        a.task_mix_dict = {k: mix.get(k, 0.0) / sum(mix.values()) for k in TASK_MIX}
    if a.steps != "auto":
        try:
            a.steps = int(a.steps)
        except ValueError:
            p.error(f"--steps {a.steps}: expected a positive integer or 'auto'")
        if a.steps <= 0:
            p.error(f"--steps {a.steps}: must be positive")
    if not a.eos_weight > 0:
        p.error(f"--eos-weight {a.eos_weight}: must be positive")
    if a.tokens_per_step % max(LENGTHS) != 0:
        p.error(f"--tokens-per-step {a.tokens_per_step} must be a multiple of {max(LENGTHS)}")
    if max(LENGTHS) > a.max_pos:
        p.error(f"--max-pos {a.max_pos} is below the longest training window {max(LENGTHS)}")
    return a


def tokenize_text(tok, paths):
    """The files' token stream exactly as tokenizing the whole text would give (no merge crosses a newline with
    this tokenizer): each line is tokenized after its newline, the newline's standalone '▁' dropped."""
    space = tok.token_to_id("▁")
    parts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        encs = tok.encode_batch(["\n" + ln for ln in lines], add_special_tokens=False)
        for e in encs:
            ids = e.ids
            if not ids or ids[0] != space:
                raise SystemExit(f"{path}: unexpected tokenization of a line (no leading '▁'): {ids[:4]}")
            parts.append(np.asarray(ids[1:], dtype=np.int32))
    return np.concatenate(parts)


def is_early(step, total, early_fraction):
    return step < early_fraction * total


def window_length(step, total, seed, calib_steps, early_fraction):
    rng = np.random.default_rng([seed, step, 1])
    if step < calib_steps:                      # timing steps: CALIB_PER_LENGTH steps of each length in turn
        return LENGTHS[step // CALIB_PER_LENGTH]
    if is_early(step, total, early_fraction):
        return int(rng.choice(EARLY_LENGTHS))
    return int(rng.choice(MAIN_LENGTHS, p=MAIN_MIX))


def make_task_spec(rng, mix):
    task = str(rng.choice(list(mix), p=list(mix.values())))
    kind = "number" if task == "passkey" or rng.random() < 0.7 else "uuid"
    digits = int(rng.integers(3, 10)) if task == "passkey" else int(rng.integers(4, 10))
    if task == "niah_multikey":
        count = int(rng.integers(2, 6))
    else:
        count = int(rng.integers(2, 5))
    if kind == "uuid":
        count = min(count, 3)
    return rt.make_task(task, rng, kind=kind, digits=digits, count=count)


def make_batch(windows, step, seed, L, batch, early, mix):
    """[batch, L] ids and [batch, L-1] answer mask (targets that are answer tokens); deterministic per step."""
    rng = np.random.default_rng([seed, step])
    ids = np.empty((batch, L), dtype=np.int64)
    ans = np.zeros((batch, L - 1), dtype=bool)
    p_copy = 0.3 if early else 0.05
    for b in range(batch):
        got = None
        u = rng.random()
        if u < p_copy:
            got = windows.copy_window(L, rng)
        elif u >= p_copy + 0.1:
            spec = make_task_spec(rng, mix)
            u = rng.random()
            depth = 0.0 if u < 0.05 else 1.0 if u < 0.1 else float(rng.random())
            got = windows.task_window(spec, L, depth, rng, noise_filler=rng.random() < 0.25)
        if got is None:
            got = windows.lm_window(L, rng)
        ids[b] = got[0]
        if got[1] is not None:
            a0, a1 = got[1]
            ans[b, a0 - 1:a1 - 1] = True
    return ids, ans


class Batches(torch.utils.data.Dataset):
    """Batch number `step` of a run of `total` steps (for a DataLoader: batches made by worker processes)."""

    def __init__(self, windows, seed, total, tokens_per_step, calib_steps, first, last, early_fraction, mix):
        self.early_fraction, self.mix = early_fraction, mix
        self.windows, self.seed, self.total = windows, seed, total
        self.tokens_per_step, self.calib_steps, self.first, self.last = tokens_per_step, calib_steps, first, last

    def __len__(self):
        return self.last - self.first

    def __getitem__(self, i):
        step = self.first + i
        L = window_length(step, self.total, self.seed, self.calib_steps, self.early_fraction)
        early = (step < self.calib_steps and self.early_fraction > 0) or is_early(step, self.total, self.early_fraction)
        ids, ans = make_batch(self.windows, step, self.seed, L, self.tokens_per_step // L, early, self.mix)
        return torch.from_numpy(ids), torch.from_numpy(ans)


def lr_at(step, total, base, warmup):
    if step < warmup:
        return base * (step + 1) / warmup
    f = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * f)))


def save_model(model, args, tok_dir, out, log):
    """HF layout, written to a temporary folder then renamed."""
    from safetensors.torch import save_file
    tmp = out.rstrip("/") + ".tmp-train"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.config.save_pretrained(tmp)
    cfg_path = os.path.join(tmp, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    # the fields the shared models' config.json carry (both spellings of rope_theta and of the dtype)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["rope_theta"] = args.rope_theta
    cfg["dtype"] = "bfloat16"
    cfg["torch_dtype"] = "bfloat16"
    cfg["tie_word_embeddings"] = True
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    sd = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}             # tied: the head is the embedding
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(tmp, name))
    with open(os.path.join(tmp, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
        f.write("\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def select_eval(model, tok, bos, words, seed, cases, max_len):
    """Passkey and single-needle accuracy of the live model (greedy, fp32): {task: accuracy}, seconds."""
    t = time.time()
    lengths = [L for L in (1024, 2048, 4096) if L <= max_len] or [max_len]
    was_training = model.training
    model.eval()
    rows = na.run_cases(model, tok, bos, words, ["passkey", "niah_single"], lengths, [0, 0.25, 0.5, 0.75, 1], cases,
                        seed)
    if was_training:
        model.train()
    return {k: v["accuracy"] for k, v in na.summarize(rows).items()}, time.time() - t


def is_select_step(step, total, calib_steps, args):
    """Whether step (1-based, after its update) is one of the selection evaluations."""
    if args.select_cases <= 0 or total >= 10 ** 9 or step < calib_steps:
        return False
    first = max(calib_steps, int(total * args.select_from))
    every = max(1, math.ceil((total - first) / max(1, args.select_evals)))
    return step == total or (step >= first and (step - first) % every == 0)


def check_reload(model, out, device):
    """The saved folder loads with transformers and gives the bf16 weights' logits."""
    from transformers import AutoModelForCausalLM
    m2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
    ref = {k: v.detach().to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    m1 = type(model)(model.config).to(device).eval()
    m1.load_state_dict(ref)
    x = torch.randint(3, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(7)).to(device)
    x[0, 0] = model.config.bos_token_id
    with torch.no_grad():
        a, b = m1(input_ids=x).logits, m2(input_ids=x).logits
    err = float((a - b).abs().max() / a.abs().max())
    theta = m2.config.rope_parameters["rope_theta"] if getattr(m2.config, "rope_parameters", None) else None
    print(f"reload check: max rel logit difference {err:.2e}, rope_theta {theta}, tied "
          f"{m2.lm_head.weight.data_ptr() == m2.model.embed_tokens.weight.data_ptr()}", flush=True)
    if not (err < 1e-5):
        raise SystemExit(f"{out}: the saved model does not reproduce the trained weights (rel err {err:.2e})")
    return err


def main():
    args = parse_args()
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    if not torch.cuda.is_available():
        raise SystemExit("train_retrieval_model.py: no CUDA device (it trains on the GPU machine)")
    device = torch.device("cuda")
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    tok_path = os.path.join(args.tokenizer_from, "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    with open(os.path.join(args.tokenizer_from, "tokenizer_config.json")) as f:
        tcfg = json.load(f)
    bos, eos = tok.token_to_id(tcfg["bos_token"]), tok.token_to_id(tcfg["eos_token"])
    if bos is None or eos is None:
        raise SystemExit(f"{tok_path}: BOS {tcfg['bos_token']!r} or EOS {tcfg['eos_token']!r} not in the vocabulary")

    t0 = time.time()
    stream = tokenize_text(tok, args.text)
    windows = rt.TokenWindows(tok, stream, bos, eos)
    print(f"text: {len(stream)} tokens from {', '.join(args.text)} ({time.time() - t0:.1f} s)", flush=True)
    select_words = na.haystack_words(args.text[0], "text") if args.select_cases > 0 else None

    early_fraction = 0.0 if args.init_from else EARLY_FRACTION
    base_log = None
    if args.init_from:
        model = LlamaForCausalLM.from_pretrained(args.init_from, dtype=torch.float32,
                                                 attn_implementation="sdpa").to(device)
        config = model.config
        if config.vocab_size != tok.get_vocab_size() or config.bos_token_id != bos or config.eos_token_id != eos:
            raise SystemExit(f"{args.init_from}: vocabulary/BOS/EOS differ from {tok_path}'s")
        rp = getattr(config, "rope_parameters", None) or {}
        args.rope_theta = float(rp.get("rope_theta", getattr(config, "rope_theta", args.rope_theta)))
        args.max_pos = config.max_position_embeddings
        args.layers, args.heads, args.kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
        args.hidden, args.ffn, args.head_dim = config.hidden_size, config.intermediate_size, config.head_dim
        if max(LENGTHS) > args.max_pos:
            raise SystemExit(f"{args.init_from}: max_position_embeddings {args.max_pos} < {max(LENGTHS)}")
        lp = os.path.join(args.init_from, "train_log.json")
        if os.path.exists(lp):
            with open(lp) as f:
                base_log = json.load(f)
            base_log = base_log.get("base_log", base_log)   # the first training of a chain
        print(f"fine-tuning {args.init_from} (the architecture flags are ignored)", flush=True)
    else:
        model = None
    config = model.config if model is not None else LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.max_pos, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta}, tie_word_embeddings=True,
        bos_token_id=bos, eos_token_id=eos, attention_bias=False, mlp_bias=False, hidden_act="silu",
        initializer_range=0.02)
    config._attn_implementation = "sdpa"
    if model is None:
        model = LlamaForCausalLM(config).to(device)
    model.train()
    print(f"task mix: {json.dumps({k: round(v, 3) for k, v in args.task_mix_dict.items()})}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters, {args.layers} layers, hidden {args.hidden}, heads {args.heads}/"
          f"{args.kv_heads} x {args.head_dim}, ffn {args.ffn}, vocab {config.vocab_size}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)

    calib_steps = CALIB_PER_LENGTH * len(LENGTHS)   # timing steps, grouped by length (the same in every mode)
    total = args.steps if args.steps != "auto" else 10 ** 9
    group_time = {}
    sums = torch.zeros(4, device=device)       # lm nll sum, lm count, answer nll sum, answer count
    ans_correct = torch.zeros(2, device=device)
    history = []
    t_train = time.time()
    stopped_early = False
    step = 0
    selection, best = [], None                  # best: (score, step, state dict on the CPU)
    loader = None

    def make_loader(first, last, total_steps):
        ds = Batches(windows, args.seed, total_steps, args.tokens_per_step, calib_steps, first, last, early_fraction,
                     args.task_mix_dict)
        return iter(torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=args.workers,
                                                pin_memory=True, prefetch_factor=8 if args.workers else None))

    data_time = {}
    if args.steps == "auto":                    # CPU time of one batch per length (the workers share it)
        for L in LENGTHS:
            t = time.time()
            make_batch(windows, 10 ** 9 + L, args.seed, L, args.tokens_per_step // L, True, args.task_mix_dict)
            data_time[L] = time.time() - t
    if args.init_from and args.select_cases > 0:   # the starting weights are a candidate
        acc, secs = select_eval(model, tok, bos, select_words, args.select_seed, args.select_cases, args.max_pos)
        selection.append(dict(step=0, passkey=acc["passkey"], niah_single=acc["niah_single"], seconds=round(secs, 1)))
        print(f"selection at step 0 (the starting weights): passkey {acc['passkey']:.3f}, single "
              f"{acc['niah_single']:.3f} ({secs:.1f} s)", flush=True)
        best = ((acc["passkey"] + acc["niah_single"]) / 2, 0,
                {k: v.detach().clone().cpu() for k, v in model.state_dict().items()})
        t_train = time.time()
    while step < total:
        if step == 0:                           # the timing steps' lengths do not depend on the step count
            loader = make_loader(0, calib_steps, total)
        elif step == calib_steps:               # the schedule is known from here on
            loader = make_loader(calib_steps, total, total)
        ids_b, ans_b = next(loader)
        # timing (steady state, data made by the workers meanwhile): steps 2..7 of each length's group
        if args.steps == "auto" and step < calib_steps and step % CALIB_PER_LENGTH == 2:
            torch.cuda.synchronize()
            tg = time.time()
        B, L = ids_b.shape
        ids = ids_b.to(device, non_blocking=True)
        ans = ans_b.to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total if total < 10 ** 9 else 10 ** 6, args.lr, args.warmup)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="none").view(B, L - 1)
        ansf = ans.float()
        lmf = 1.0 - ansf
        n_ans = ansf.sum()
        answ = ansf
        if args.eos_weight != 1.0:              # the answer's EOS (its targets that are EOS) weighted up or down
            answ = ansf * (1.0 + (args.eos_weight - 1.0) * (ids[:, 1:] == eos).float())
        loss = (nll * lmf).sum() / lmf.sum() + args.answer_weight * (nll * answ).sum() / answ.sum().clamp(min=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            sums += torch.stack([(nll * lmf).sum(), lmf.sum(), (nll * ansf).sum(), n_ans])
            pred_ok = (logits[:, :-1].argmax(-1) == ids[:, 1:]).float()
            ans_correct += torch.stack([(pred_ok * ansf).sum(), n_ans])
        if args.steps == "auto" and step < calib_steps and step % CALIB_PER_LENGTH == CALIB_PER_LENGTH - 1:
            torch.cuda.synchronize()
            group_time[L] = (time.time() - tg) / (CALIB_PER_LENGTH - 2)
        step += 1
        if args.steps == "auto" and step == calib_steps:
            t_len = {k: max(group_time[k], data_time[k] / max(1, args.workers)) for k in LENGTHS}
            early_t = sum(t_len[k] for k in EARLY_LENGTHS) / len(EARLY_LENGTHS)
            main_t = sum(p * t_len[k] for k, p in zip(MAIN_LENGTHS, MAIN_MIX))
            per_step = (early_fraction * early_t + (1 - early_fraction) * main_t) * 1.04
            left = args.budget_s - (time.time() - t_train)
            if args.select_cases > 0:
                left -= (args.select_evals + 1) * args.select_s_per_eval  # is_select_step's count
            total = step + max(0, int(left / per_step))
            print(f"timing: s/step by length {json.dumps({k: round(v, 4) for k, v in group_time.items()})}, "
                  f"data s/batch {json.dumps({k: round(v, 4) for k, v in data_time.items()})}; "
                  f"{per_step:.4f} s/step expected -> {total} steps in {args.budget_s:.0f} s", flush=True)
        if step % args.log_every == 0 or step == total:
            s = sums.tolist()
            c = ans_correct.tolist()
            el = time.time() - t_train
            row = dict(step=step, L=L, lm_nll=s[0] / max(s[1], 1), answer_nll=s[2] / max(s[3], 1),
                       answer_token_acc=c[0] / max(c[1], 1), lr=opt.param_groups[0]["lr"], elapsed_s=round(el, 1))
            history.append(row)
            print(f"step {step}/{total if total < 10 ** 9 else '?'} L {L} lm_nll {row['lm_nll']:.3f} "
                  f"answer_nll {row['answer_nll']:.3f} answer_tok_acc {row['answer_token_acc']:.3f} "
                  f"lr {row['lr']:.2e} {el:.0f} s", flush=True)
            sums.zero_()
            ans_correct.zero_()
        if is_select_step(step, total, calib_steps, args):
            acc, secs = select_eval(model, tok, bos, select_words, args.select_seed, args.select_cases, args.max_pos)
            score = (acc["passkey"] + acc["niah_single"]) / 2
            selection.append(dict(step=step, passkey=acc["passkey"], niah_single=acc["niah_single"],
                                  seconds=round(secs, 1)))
            print(f"selection at step {step}: passkey {acc['passkey']:.3f}, single {acc['niah_single']:.3f} "
                  f"({secs:.1f} s)", flush=True)
            if best is None or score >= best[0]:
                best = (score, step, {k: v.detach().clone().cpu() for k, v in model.state_dict().items()})
        if args.steps == "auto" and time.time() - t_train > args.budget_s + 45:
            print(f"stopping early at step {step}: {args.budget_s + 45:.0f} s passed", flush=True)
            stopped_early = True
            break
    torch.cuda.synchronize()
    train_s = time.time() - t_train
    print(f"trained {step} steps in {train_s:.0f} s ({step * args.tokens_per_step / train_s / 1e6:.2f} M tokens/s)",
          flush=True)
    selected_step = step
    if best is not None:
        selected_step = best[1]
        if best[1] != step:
            model.load_state_dict(best[2])
        print(f"selected the weights of step {best[1]} (mean of passkey and single {best[0]:.3f})", flush=True)

    log = dict(script="scripts/train_retrieval_model.py",
               args={k: v for k, v in vars(args).items() if k != "task_mix_dict"}, task_mix=args.task_mix_dict,
               steps=step, stopped_early=stopped_early, train_seconds=round(train_s, 1),
               tokens_seen=step * args.tokens_per_step, text_tokens=int(len(stream)), params=n_params,
               device=torch.cuda.get_device_name(0), torch=torch.__version__, history=history,
               selection=selection, selected_step=selected_step, init_from=args.init_from, base_log=base_log)
    import transformers
    log["transformers"] = transformers.__version__
    save_model(model, args, args.tokenizer_from, args.out, log)
    check_reload(model, args.out, device)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
