#!/usr/bin/env python3
"""Writes MODEL/reference/ for data/models/antkv-retrieval-2m with transformers (a test tool, not part of the
toolkit; PyTorch on the GPU machine), in the form of the shared models' reference/ (../shared/models/README.md):

  make_retrieval_reference.py --model DIR --test-text books-test.txt [--tokenizer-sample-out FILE.json]

- reference.safetensors: prompt_ids [T] int32, logits [T, vocab] fp32, layer{0,last}.k_pre_rope / .v_pre_rope
  [T, kv_heads*head_dim] (k_proj / v_proj outputs), layer{0,last}.k_post_rope [kv_heads, T, head_dim],
  greedy_ids (prompt + 48 greedy tokens); reference.json: prompt, greedy text, notes.
  All transformers fp32 math, eager attention, on the stored bf16 weights.
- ppl_books-test_txt.json: the test text tokenized once (BOS once), windows of max_position_embeddings tokens,
  bos_window and single_bos protocols, NLL per window (fp32, eager).
- needle_reference.json: {"cases": [...]} ~10 retrieval cases (prompt_ids with BOS, answer_ids = the fp32 greedy
  ids for the case's answer budget, expected text), and "accuracy": FP16 (sdpa) exact-match accuracy of passkey and
  single needle at 3 lengths x 5 depths (and the other tasks at the maximum length), haystack from the test text.
--tokenizer-sample-out: token ids of sample texts from the tokenizers library, to compare with the C++ tokenizer.
--quick: a smoke test of the whole script (2 cases, 1 case per cell, 4 perplexity windows); not a reference.
Everything is written to reference.tmp-* and renamed at the end.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import needle_accuracy as na  # noqa: E402
import retrieval_tasks as rt  # noqa: E402

PROMPT = "The old lighthouse keeper climbed the stairs every evening, and from the top he could see"
REFERENCE_CASES = [  # task, length, depth, case index
    ("passkey", 1024, 0.5, 0), ("passkey", 4096, 0.0, 0), ("passkey", 4096, 1.0, 0), ("passkey", 2048, 0.75, 0),
    ("niah_single", 2048, 0.25, 0), ("niah_single", 4096, 0.5, 0), ("niah_single_uuid", 1024, 0.75, 0),
    ("niah_multikey", 2048, 0.5, 0), ("niah_multivalue", 1024, 0.3, 0), ("niah_multiquery", 2048, 1.0, 0),
]


def k_post_rope(model, k_pre, T):
    """[kv_heads, T, head_dim]: k_proj output rotated as the attention layer rotates it."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    cfg = model.config
    hd = cfg.head_dim
    k = k_pre.view(1, T, cfg.num_key_value_heads, hd).transpose(1, 2)
    pos = torch.arange(T, device=k.device)[None]
    cos, sin = model.model.rotary_emb(k, pos)
    _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
    return k_rot[0]


@torch.no_grad()
def write_logits_reference(model, tok, bos, dst, name):
    from safetensors.torch import save_file
    ids = [bos] + tok.encode(PROMPT, add_special_tokens=False).ids
    T = len(ids)
    layers = model.model.layers
    last = len(layers) - 1
    captured = {}
    hooks = []
    for li in (0, last):
        for proj in ("k_proj", "v_proj"):
            mod = getattr(layers[li].self_attn, proj)
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, key=f"layer{li}.{proj[0]}_pre_rope": captured.__setitem__(key, o[0].float().clone())))
    x = torch.tensor([ids], device="cuda")
    logits = model(input_ids=x).logits[0].float()
    for h in hooks:
        h.remove()
    t = {"prompt_ids": torch.tensor(ids, dtype=torch.int32), "logits": logits.cpu()}
    for li in (0, last):
        t[f"layer{li}.k_pre_rope"] = captured[f"layer{li}.k_pre_rope"].cpu()
        t[f"layer{li}.v_pre_rope"] = captured[f"layer{li}.v_pre_rope"].cpu()
        t[f"layer{li}.k_post_rope"] = k_post_rope(model, captured[f"layer{li}.k_pre_rope"], T).float().cpu()
    seq = list(ids)
    for _ in range(48):                      # full recompute each step: the plain definition of greedy
        nxt = int(model(input_ids=torch.tensor([seq], device="cuda")).logits[0, -1].argmax())
        seq.append(nxt)
    t["greedy_ids"] = torch.tensor(seq, dtype=torch.int32)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(dst, "reference.safetensors"))
    cfg = model.config
    info = dict(model=name, params=sum(p.numel() for p in model.parameters()),
                config=dict(hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
                            kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, ffn=cfg.intermediate_size,
                            theta=cfg.rope_parameters["rope_theta"], max_position=cfg.max_position_embeddings),
                prompt=PROMPT, greedy_text=tok.decode(seq, skip_special_tokens=False),
                notes=("logits: [T, vocab] fp32 from transformers in fp32 (eager attention) on the bf16 checkpoint; "
                       "k/v_pre_rope: [T, kv_heads*head_dim] (k_proj/v_proj outputs); k_post_rope: "
                       f"[kv_heads, T, head_dim]; layers 0 and {last}; greedy_ids: prompt + 48 greedy tokens "
                       "(full recompute); perplexity: see ppl_books-test_txt.json; retrieval: needle_reference.json"))
    return info


@torch.no_grad()
def window_nll(model, windows, batch=8):
    out = []
    for i in range(0, len(windows), batch):
        x = torch.tensor(np.stack(windows[i:i + batch]), device="cuda")
        logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, x[:, 1:, None])[..., 0]
        out.extend(nll.double().sum(1).tolist())
    return out


def write_ppl(model, tok, text_path, seq_len, dst, max_windows=None):
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    t0 = time.time()
    ids = np.asarray(tok.encode(text).ids, dtype=np.int64)  # BOS once (the tokenizer's post-processor)
    print(f"ppl: {len(ids)} tokens of {os.path.basename(text_path)} ({time.time() - t0:.1f} s to tokenize)", flush=True)
    s = seq_len
    nb = (len(ids) - 1) // (s - 1)
    bos_w = [np.concatenate([ids[:1], ids[1 + c * (s - 1):1 + (c + 1) * (s - 1)]]) for c in range(nb)]
    ns = len(ids) // s
    single = [ids[c * s:(c + 1) * s] for c in range(ns)]
    if max_windows:
        bos_w, single = bos_w[:max_windows], single[:max_windows]
    res = dict(text=os.path.basename(text_path), text_bytes=len(text.encode("utf-8")), tokens=int(len(ids)),
               first_ids=ids[:16].tolist(), seq_len=s, engine="transformers fp32, eager attention, stored weights")
    for key, wins in (("bos_window", bos_w), ("single_bos", single)):
        nll = window_nll(model, wins)
        res[key] = dict(windows=len(wins), nll_sum_per_window=nll, ppl=math.exp(sum(nll) / (len(wins) * (s - 1))),
                        ppl_first_8_windows=math.exp(sum(nll[:8]) / (min(8, len(wins)) * (s - 1))))
        print(f"ppl {key}: {res[key]['ppl']:.3f} over {len(wins)} windows of {s}", flush=True)
    res["how"] = ("tokenizer(text) once (BOS first). bos_window: window c = [BOS] + ids[1+c*(s-1) : 1+(c+1)*(s-1)]; "
                  "single_bos: window c = ids[c*s : (c+1)*s]. Each window's NLL is summed over its s-1 predicted "
                  "positions; ppl = exp(total NLL / (windows*(s-1))).")
    name = "ppl_" + os.path.basename(text_path).replace(".", "_") + ".json"
    with open(os.path.join(dst, name), "w") as f:
        json.dump(res, f, indent=1)
    return res


def write_needle_reference(model32, model16, tok, bos, words, max_len, dst, seed, quick):
    cases = []
    for task, L, depth, c in (REFERENCE_CASES[:2] if quick else REFERENCE_CASES):
        case = na.make_case(tok, bos, words, task, L, depth, c, seed)
        gen = na.greedy(model32, case["prompt_ids"], case["answer_budget"])
        dec = tok.decode(gen, skip_special_tokens=True)
        cases.append(dict(task=case["task"].replace("_uuid", ""), kind=case["kind"], length=L, depth=depth,
                          prompt_tokens=len(case["prompt_ids"]), prompt_ids=case["prompt_ids"], answer_ids=gen,
                          answer_budget=case["answer_budget"], expected=case["expected"], decoded=dec,
                          exact=na.is_exact(dec, case["expected"])))
    print(f"needle reference (fp32 greedy): {sum(c['exact'] for c in cases)}/{len(cases)} exact", flush=True)
    depths = [0.0, 1.0] if quick else [0.0, 0.25, 0.5, 0.75, 1.0]
    lengths = [1024, max_len] if quick else [1024, 2048, max_len]
    per_cell = 1 if quick else 4
    t0 = time.time()

    def progress(task, L, rows):
        print(f"  {task} L {L}: {sum(r['exact'] for r in rows)}/{len(rows)} so far ({time.time() - t0:.0f} s)",
              flush=True)
    rows = na.run_cases(model16, tok, bos, words, ["passkey", "niah_single"], lengths, depths, per_cell, seed + 1,
                        progress)
    rows += na.run_cases(model16, tok, bos, words, ["niah_single_uuid", "niah_multikey", "niah_multivalue",
                                                    "niah_multiquery"], [max_len], depths, per_cell, seed + 1, progress)
    noise = na.haystack_words(None, "noise")
    rows_noise = na.run_cases(model16, tok, bos, noise, ["passkey"], [max_len], depths, per_cell, seed + 2)
    summary = na.summarize(rows)
    summary_noise = na.summarize(rows_noise)
    for task, s in summary.items():
        print(f"FP16 {task}: {100 * s['accuracy']:.1f}% ({s['n']} cases) by length "
              f"{json.dumps({k: round(v, 3) for k, v in s['by_length'].items()})}", flush=True)
    print(f"FP16 passkey, noise filler, L {max_len}: {100 * summary_noise['passkey']['accuracy']:.1f}%", flush=True)
    misses = [dict(task=r["task"], length=r["length"], depth=r["depth"], expected=r["expected"], got=r["decoded"])
              for r in rows + rows_noise if not r["exact"]]
    doc = dict(
        how=("prompt = BOS + tokenizer('{intro}\\n{haystack with needles}\\n{question}'); the model continues with "
             "' {answer}' (scripts/retrieval_tasks.py has the templates). answer_ids: greedy ids from transformers "
             "(fp32, eager attention, stored bf16 weights) for answer_budget tokens, no stop at EOS. Haystack: "
             "words of ../data/books-test.txt (held out from training). depth: fraction of the haystack's words "
             "before the asked needle."),
        templates=dict(passkey=dict(intro=rt.PASSKEY_INTRO, needle=rt.PASSKEY_NEEDLE, question=rt.PASSKEY_QUESTION),
                       niah=dict(intro=rt.NIAH_INTRO, needle=rt.NIAH_NEEDLE, question_one=rt.NIAH_QUESTION_ONE,
                                 question_many=rt.NIAH_QUESTION_MANY, noise_filler=rt.NOISE)),
        cases=cases,
        accuracy=dict(dtype="fp16", attention="sdpa", cases_per_cell=per_cell, depths=depths, lengths=lengths,
                      haystack="books-test.txt", by_task=summary, passkey_noise_filler=summary_noise,
                      misses=misses[:40]))
    with open(os.path.join(dst, "needle_reference.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    return summary, summary_noise


def write_tokenizer_sample(tok, test_text, out):
    with open(test_text, encoding="utf-8") as f:
        text = f.read()
    samples = [text[:20000], text[1000000:1010000],
               "The pass key is 71432. Remember it. 71432 is the pass key.\nWhat is the pass key? The pass key is",
               "One of the special magic uuids for quiet-otter is: 3f2a9c1e-77b0-4d2e-9a1f-0c5e8d7b6a42.",
               "  leading spaces, tabs\tand   runs of spaces; ünïcödé — “quotes” 東京 😀\n\nnew paragraph"]
    doc = dict(samples=[dict(text=s, ids=tok.encode(s).ids) for s in samples],
               how="tokenizers library, tokenizer.encode(text) (post-processor: BOS first)")
    with open(out, "w") as f:
        json.dump(doc, f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--test-text", required=True)
    p.add_argument("--seed", type=int, default=26)
    p.add_argument("--tokenizer-sample-out")
    p.add_argument("--quick", action="store_true", help="smoke test: few cases and windows (not a reference)")
    a = p.parse_args()
    t0 = time.time()
    with open(os.path.join(a.model, "config.json")) as f:
        cfg = json.load(f)
    bos, max_len = cfg["bos_token_id"], cfg["max_position_embeddings"]
    tok = na.load_tokenizer(a.model)
    failed = []

    def stage(label, fn, *args):
        """Runs one output's stage; a failure is reported and the other stages still run (each is independent),
        and the folder is then left as reference.tmp-make, never renamed to reference/."""
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001 -- reported, and the run fails at the end
            traceback.print_exc()
            print(f"stage '{label}' FAILED", flush=True)
            failed.append(label)
            return None

    if a.tokenizer_sample_out:
        stage("tokenizer sample", write_tokenizer_sample, tok, a.test_text, a.tokenizer_sample_out)
    name = os.path.basename(os.path.normpath(a.model))
    dst = os.path.join(a.model, "reference.tmp-make")
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    model32 = na.load_model(a.model, torch.float32, "eager")
    info = stage("logits reference", write_logits_reference, model32, tok, bos, dst, name) or {}
    words = na.haystack_words(a.test_text, "text")
    model16 = na.load_model(a.model, torch.float16, "sdpa")
    acc = stage("needle reference", write_needle_reference, model32, model16, tok, bos, words, max_len, dst, a.seed,
                a.quick)
    ppl = stage("perplexity", write_ppl, model32, tok, a.test_text, max_len, dst, 4 if a.quick else None)
    if ppl:
        info["ppl_books_test"] = dict(seq_len=max_len, bos_window=ppl["bos_window"]["ppl"],
                                      single_bos=ppl["single_bos"]["ppl"])
    if acc:
        summary, summary_noise = acc
        info["fp16_retrieval_accuracy"] = {t: s["accuracy"] for t, s in summary.items()}
        info["fp16_retrieval_accuracy"]["passkey_noise_filler"] = summary_noise["passkey"]["accuracy"]
    with open(os.path.join(dst, "reference.json"), "w") as f:
        json.dump(info, f, indent=1)
    if failed:
        raise SystemExit(f"make_retrieval_reference.py: stages failed: {', '.join(failed)} (partial output left in {dst})")
    final = os.path.join(a.model, "reference")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(dst, final)
    print(f"wrote {final} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
