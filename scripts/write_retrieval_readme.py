#!/usr/bin/env python3
"""Writes MODEL/README.md for data/models/antkv-retrieval-2m from what the scripts recorded (Python standard
library only): MODEL/config.json, MODEL/train_log.json (train_retrieval_model.py) and MODEL/reference/*.json
(make_retrieval_reference.py): how it was made, the FP16 retrieval accuracy, the perplexity and the file sizes.

  write_retrieval_readme.py MODEL
"""
import json
import os
import sys


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise SystemExit(f"{path}: cannot read it ({e.strerror}); run train_retrieval_model.py and "
                         "make_retrieval_reference.py first")
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not valid JSON ({e})")


def pct(x):
    return f"{100 * x:.1f}%"


def main():
    if len(sys.argv) != 2:
        raise SystemExit("usage: write_retrieval_readme.py MODEL_DIR")
    m = sys.argv[1]
    cfg = load(os.path.join(m, "config.json"))
    log = load(os.path.join(m, "train_log.json"))
    ref = load(os.path.join(m, "reference", "reference.json"))
    needle = load(os.path.join(m, "reference", "needle_reference.json"))
    ppl = load(os.path.join(m, "reference", "ppl_books-test_txt.json"))
    acc = needle["accuracy"]
    base = log.get("base_log") or log            # a fine-tuned model: the first training's log
    a = base["args"]
    finetune = ""
    if log.get("base_log"):
        fa = log["args"]
        sel = log.get("selection") or []
        picked = next((r for r in sel if r["step"] == log.get("selected_step")), None)
        finetune = f"""
Then fine-tuned: `scripts/train_retrieval_model.py --init-from <that model> --steps auto --budget-s {fa['budget_s']:g}
--lr {fa['lr']:g} --warmup {fa['warmup']} --seed {fa['seed']} --task-mix {fa.get('task_mix') or 'default'}
--select-cases {fa['select_cases']} --select-from {fa['select_from']:g} --select-evals {fa['select_evals']}` on
{log['device']}: {log['steps']} steps ({log['tokens_seen'] / 1e6:.0f}M tokens) in {log['train_seconds']:.0f} s, no short-window
phase. Passkey and single-needle accuracy on the selection cases (seed {fa['select_seed']}, not the reference's),
by step: {'; '.join(f"{r['step']}: {pct(r['passkey'])} / {pct(r['niah_single'])}" for r in sel)}; the weights of step
{log.get('selected_step')} are the ones kept{'' if picked is None else f" ({pct(picked['passkey'])} / {pct(picked['niah_single'])})"}.
"""
    rows = []
    for task, s in acc["by_task"].items():
        by_len = ", ".join(f"{L}: {pct(v)}" for L, v in s["by_length"].items())
        rows.append(f"| {task} | {s['n']} | {pct(s['accuracy'])} | {by_len} |")
    noise = acc["passkey_noise_filler"]["passkey"]
    rows.append(f"| passkey, noise filler | {noise['n']} | {pct(noise['accuracy'])} | "
                + ", ".join(f"{L}: {pct(v)}" for L, v in noise["by_length"].items()) + " |")
    sizes = []
    total = 0
    for root, _, files in os.walk(m):
        for f in sorted(files):
            if f == "README.md":
                continue
            p = os.path.join(root, f)
            sizes.append((os.path.relpath(p, m), os.path.getsize(p)))
            total += os.path.getsize(p)
    exact_ref = sum(c["exact"] for c in needle["cases"])
    text = f"""# antkv-retrieval-2m

A small LLaMA-architecture model that is a language model of English book text AND retrieves from long contexts
(passkey and needle-in-a-haystack tasks), so that the toolkit's retrieval evaluation (`antkv-eval needle`) measures
something on the CPU. Made for this project from scratch; a test tool, not a useful language model.

| params | layers | heads / KV heads | head_dim | hidden / ffn | vocab | weights | rope_theta | max pos |
|---|---|---|---|---|---|---|---|---|
| {log['params']:,} | {cfg['num_hidden_layers']} | {cfg['num_attention_heads']} / {cfg['num_key_value_heads']} (GQA) | {cfg['head_dim']} | {cfg['hidden_size']} / {cfg['intermediate_size']} | {cfg['vocab_size']} | bf16, tied embeddings | {cfg['rope_theta']:g} | {cfg['max_position_embeddings']} |

Tokenizer: stories260K's 512-piece SentencePiece-style BPE with byte fallback (`tokenizer.json` copied from
`../shared/models/stories260K`), BOS `<s>` (id {cfg['bos_token_id']}), EOS `</s>` (id {cfg['eos_token_id']}); digits
are single tokens, so values are copied digit by digit.

## How it was made
`scripts/train_retrieval_model.py --text books-calib.txt --tokenizer-from stories260K --steps auto --budget-s
{a['budget_s']:g} --seed {a['seed']}` on {base['device']} (torch {base['torch']}, transformers {base['transformers']}):
{base['steps']} steps of {a['tokens_per_step']} tokens ({base['tokens_seen'] / 1e6:.0f}M tokens) in {base['train_seconds']:.0f} s,
AdamW (lr {a['lr']:g}, warmup {a['warmup']}, cosine to 10%), bf16 autocast, SDPA. Repeat it with `--steps {base['steps']}`
instead of `--steps auto` (the batches depend only on the seed and the step; GPU kernels are not bitwise
deterministic). Training text: `../shared/data/books-calib.txt` only ({base['text_tokens']:,} tokens; the test texts
are held out), mixed with generated retrieval windows (`scripts/retrieval_tasks.py`: passkey, single needle with a
number or UUID-like value, multi-key with distractors, multi-value, multi-query; haystack of book text or the
repeated RULER noise sentence; depths uniform in [0, 1]; lengths 256 to 4096), copy windows, and plain text; every
window starts with BOS. The loss is the LM loss on every non-answer token plus {a.get('answer_weight', 1.0):g} x the
mean loss on the answer tokens. `scripts/make_retrieval_reference.py` wrote `reference/` and measured the accuracy
below; this file is written by `scripts/write_retrieval_readme.py`.
{finetune}
Prompt format (plain text, BOS first): `{{intro}}\\n{{haystack with the needle}}\\n{{question}}`, answer ` {{value}}`;
the exact templates are in `scripts/retrieval_tasks.py` and in `reference/needle_reference.json` (`templates`).

## FP16 retrieval accuracy (transformers, sdpa, greedy; haystack from held-out `books-test.txt`)
{acc['cases_per_cell']} cases per length x depth; depths {', '.join(f'{d:g}' for d in acc['depths'])}.

| task | cases | exact | by length |
|---|---|---|---|
{chr(10).join(rows)}

## reference/
- `reference.safetensors`, `reference.json`: as the shared models' (`../shared/models/README.md`): prompt_ids,
  logits [T, {cfg['vocab_size']}] fp32, `layer{{0,{cfg['num_hidden_layers'] - 1}}}.k_pre_rope` / `.v_pre_rope`
  [T, kv_heads*head_dim], `.k_post_rope` [kv_heads, T, head_dim], greedy_ids (prompt + 48 tokens); transformers
  fp32, eager attention, on the stored weights.
- `ppl_books-test_txt.json`: `../data/books-test.txt` tokenized once ({ppl['tokens']:,} tokens), windows of
  {ppl['seq_len']}: bos_window ppl {ppl['bos_window']['ppl']:.3f}, single_bos {ppl['single_bos']['ppl']:.3f}
  (per-window NLL sums for exact prefix checks).
- `needle_reference.json`: {len(needle['cases'])} cases (prompt_ids with BOS, answer_ids = transformers fp32 greedy
  ids for `answer_budget` tokens, no stop at EOS; {exact_ref}/{len(needle['cases'])} exact) and the accuracy above.

Files ({total / 1e6:.2f} MB without this README): {', '.join(f'{p} {s / 1e3:.0f} kB' for p, s in sizes)}.
"""
    tmp = os.path.join(m, "README.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, os.path.join(m, "README.md"))
    print(f"wrote {os.path.join(m, 'README.md')}")


if __name__ == "__main__":
    main()
