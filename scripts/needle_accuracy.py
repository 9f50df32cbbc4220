#!/usr/bin/env python3
"""Retrieval accuracy of a Hugging Face LLaMA checkpoint with transformers (a test tool, not part of the toolkit;
PyTorch on the GPU machine): the tasks of scripts/retrieval_tasks.py as text prompts (BOS + prompt), greedy
decoding with the KV cache, exact match of the expected value(s).

  needle_accuracy.py --model DIR --haystack books-test.txt --lengths 512 2048 --depths 0 0.25 0.5 0.75 1
      [--tasks passkey niah_single] [--cases 4] [--dtype fp16|bf16|fp32] [--filler text noise] [--out FILE.json]

A case of length L has a prompt of at most L - budget tokens, budget = the answer's token count + 2, so prompt and
answer fit in L (at most max_position_embeddings). Exact: the decoded continuation, stripped, starts with the
expected answer and the next character does not continue the value (not a letter, digit or '-').
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import retrieval_tasks as rt  # noqa: E402

TASK_DEFAULTS = {  # kind, digits, needle count of the eval cases
    "passkey": ("number", 5, 1),
    "niah_single": ("number", 7, 1),
    "niah_single_uuid": ("uuid", 0, 1),
    "niah_multikey": ("number", 7, 4),
    "niah_multivalue": ("number", 7, 3),
    "niah_multiquery": ("number", 7, 2),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def load_model(model_dir, dtype, attn, device="cuda"):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    return m.to(device=device, dtype=dtype).eval()


def load_tokenizer(model_dir):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))


@torch.no_grad()
def greedy(model, ids, n_new):
    """n_new greedy tokens after the prompt ids (no stop at EOS: a fixed budget, as a C++ replay would run)."""
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    out = model(input_ids=x, use_cache=True)
    past, nxt, gen = out.past_key_values, int(out.logits[0, -1].argmax()), []
    for i in range(n_new):
        gen.append(nxt)
        if i + 1 == n_new:
            break
        out = model(input_ids=torch.tensor([[nxt]], device=dev), past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
    return gen


def is_exact(decoded, expected):
    d, e = decoded.strip(), expected.strip()
    if not d.startswith(e):
        return False
    rest = d[len(e):]
    return not rest or not (rest[0].isalnum() or rest[0] == "-")


def task_name_and_spec(task, rng):
    kind, digits, count = TASK_DEFAULTS[task]
    base = "niah_single" if task == "niah_single_uuid" else task
    return rt.make_task(base, rng, kind=kind, digits=digits, count=count)


def make_case(tok, bos, words, task, L, depth, case, seed):
    """One case: prompt ids (BOS first), the expected answer text and the answer budget."""
    rng = np.random.default_rng([seed, rt.TASKS.index(task.replace("_uuid", "")), L, int(round(depth * 1000)), case,
                                 1 if task.endswith("_uuid") else 0])
    spec = task_name_and_spec(task, rng)
    budget_ans = answer_budget(tok, spec)
    start = int(rng.integers(0, max(1, len(words) - 2 * L)))
    encode = lambda text: [bos] + tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    ids, text, answer = rt.fit_prompt(encode, spec, words, start, L - budget_ans, depth, seed=int(rng.integers(1 << 30)))
    return dict(task=task, kind=spec["kind"], length=L, depth=depth, case=case, prompt_ids=ids,
                expected=answer.strip(), answer_budget=budget_ans, values=spec["values"])


def answer_budget(tok, spec):
    longest = rt.answer_text(spec, list(range(len(spec["needles"]))))
    return len(tok.encode(longest, add_special_tokens=False).ids) + 2


def haystack_words(path, filler):
    if filler == "noise":
        return (" ".join([rt.NOISE] * 4000)).split()
    with open(path, encoding="utf-8") as f:
        return f.read().split()


def run_cases(model, tok, bos, words, tasks, lengths, depths, cases, seed, progress=None):
    rows = []
    for task in tasks:
        for L in lengths:
            for d in depths:
                for c in range(cases):
                    case = make_case(tok, bos, words, task, L, d, c, seed)
                    gen = greedy(model, case["prompt_ids"], case["answer_budget"])
                    dec = tok.decode(gen, skip_special_tokens=True)
                    case.update(answer_ids=gen, decoded=dec, exact=is_exact(dec, case["expected"]),
                                values_found=sum(v in dec for v in case["values"]) / len(case["values"]))
                    rows.append(case)
            if progress:
                progress(task, L, rows)
    return rows


def summarize(rows):
    """accuracy per task, per task x length and per task x length x depth."""
    out = {}
    for r in rows:
        t = out.setdefault(r["task"], {"n": 0, "exact": 0, "by_length": {}, "by_length_depth": {}})
        t["n"] += 1
        t["exact"] += r["exact"]
        bl = t["by_length"].setdefault(str(r["length"]), [0, 0])
        bl[0] += r["exact"]
        bl[1] += 1
        bd = t["by_length_depth"].setdefault(f"{r['length']}@{r['depth']:g}", [0, 0])
        bd[0] += r["exact"]
        bd[1] += 1
    for t in out.values():
        t["accuracy"] = t["exact"] / t["n"]
        t["by_length"] = {k: v[0] / v[1] for k, v in t["by_length"].items()}
        t["by_length_depth"] = {k: v[0] / v[1] for k, v in t["by_length_depth"].items()}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--haystack", required=True, help="text file for the haystack (held-out text)")
    p.add_argument("--filler", choices=("text", "noise"), nargs="+", default=["text"])
    p.add_argument("--lengths", type=int, nargs="+", required=True)
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--tasks", nargs="+", default=["passkey"], choices=list(TASK_DEFAULTS))
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--seed", type=int, default=26)
    p.add_argument("--out")
    a = p.parse_args()
    with open(os.path.join(a.model, "config.json")) as f:
        cfg = json.load(f)
    mx = cfg.get("max_position_embeddings")
    for L in a.lengths:
        if mx and L > mx:
            p.error(f"--lengths {L} exceeds {a.model}'s max_position_embeddings {mx}")
    for d in a.depths:
        if not 0.0 <= d <= 1.0:
            p.error(f"--depths {d}: a depth is a fraction in [0, 1]")
    t0 = time.time()
    model = load_model(a.model, DTYPES[a.dtype], "sdpa")
    tok = load_tokenizer(a.model)
    name = os.path.basename(os.path.normpath(a.model))
    results = {}
    for filler in a.filler:
        words = haystack_words(a.haystack, filler)
        rows = run_cases(model, tok, cfg["bos_token_id"], words, a.tasks, a.lengths, a.depths, a.cases, a.seed)
        summary = summarize(rows)
        for task, s in summary.items():
            print(f"{name} {a.dtype} {task} filler={filler}: {s['exact']}/{s['n']} = {100 * s['accuracy']:.1f}% "
                  f"(by length {json.dumps({k: round(v, 3) for k, v in s['by_length'].items()})})", flush=True)
        for r in [r for r in rows if not r["exact"]][:3]:
            print(f"  miss: {r['task']} L {r['length']} depth {r['depth']}: expected {r['expected']!r}, "
                  f"got {r['decoded']!r}", flush=True)
        for r in rows:
            r.pop("prompt_ids")
        results[filler] = dict(summary=summary, cases=rows)
    print(f"({time.time() - t0:.1f} s)", flush=True)
    if a.out:
        with open(a.out + ".tmp", "w") as f:
            json.dump(dict(model=name, dtype=a.dtype, haystack=os.path.basename(a.haystack), by_filler=results), f,
                      indent=1)
        os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
