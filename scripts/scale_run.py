#!/usr/bin/env python3
"""Scale test of the whole pipeline at the shapes of real 7-8B models (a test and benchmark tool, not part
of the toolkit): writes a random-weight checkpoint of a named shape in Hugging Face layout (sharded bf16
safetensors + index, config.json, a tokenizer.json of the model's family padded to its vocabulary), then runs
calibrate -> train-codebook -> ppl (fp16, uniform, vq, antkv) and long-window ppl, printing each stage's time,
throughput, peak GPU memory, peak host RSS and file sizes. Random weights say nothing of quality, everything
of scale.

  scale_run.py checkpoint --shape llama3-8b --out DIR --tokenizer-from ref/tokenizer.json [--tiny] [--bin BUILD/apps]
  scale_run.py run --shape llama3-8b --work DIR --bin BUILD/apps --recipe recipes/llama3-8b.yaml \
      --calib-text books-calib.txt --eval-text wikitext-2-raw-test.txt --tokenizer-from ref/tokenizer.json \
      [--calib-tokens 262144] [--eval-windows 16] [--long 32768 131072] [--device cuda] [--tiny] [--set k=v ...]
      [--stages calibrate,train,ppl,needle --needle-lengths 32768]

The shapes (`antkv-eval shapes`: llama3-8b, llama2-7b, mistral-7b, qwen2-7b) are read from BUILD/apps/antkv-eval.
Only the Python standard library is needed (the GPU machine has no package registry). Weights: N(0, 1/fan_in)
matrices (embedding N(0, 1)), norms 1, biases N(0, 0.1), as bf16; to write 16 GB in seconds, each tensor is a
window of a pool of ~1M random values at its scale (a prime-length pool, so rows do not repeat in step).
"""
import argparse
import array
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

def load_shapes(bin_dir):
    """The named shapes, from the one table of the toolkit (lib/model/model_shapes.cpp) through
    `antkv-eval shapes --format json`, in this script's keys."""
    exe = os.path.join(bin_dir, "antkv-eval")
    try:
        p = subprocess.run([exe, "shapes", "--format", "json"], capture_output=True, text=True)
    except OSError as e:
        raise SystemExit(f"{exe}: cannot run it to list the model shapes ({e.strerror}); --bin names the folder of antkv-eval")
    if p.returncode != 0:
        raise SystemExit(f"{exe} shapes: exit {p.returncode}: {p.stderr.strip()}")
    shapes = {}
    for entry in json.loads(p.stdout):
        c = entry["config"]
        s = dict(model_type=c["model_type"], hidden=c["hidden_size"], layers=c["num_hidden_layers"],
                 heads=c["num_attention_heads"], kv_heads=c["num_key_value_heads"], ffn=c["intermediate_size"],
                 vocab=c["vocab_size"], max_pos=c["max_position_embeddings"], rope_theta=c["rope_theta"],
                 rms_eps=c["rms_norm_eps"], tied=c["tie_word_embeddings"], bias=c["attention_bias"],
                 family=entry["tokenizer_family"])
        for key in ("rope_scaling", "sliding_window", "use_sliding_window"):
            if key in c:
                s[key] = c[key]
        shapes[entry["name"]] = s
    return shapes


def tiny(shape, vocab):
    """The same family and features with 2 layers, head_dim 64 and the source tokenizer's vocabulary (CPU tests)."""
    s = dict(shape)
    group = shape["heads"] // shape["kv_heads"]
    s.update(layers=2, kv_heads=2 if group < 8 else 1, head_dim=64, ffn=512, vocab=vocab)
    s["heads"] = s["kv_heads"] * min(group, 4)
    s["hidden"] = s["heads"] * 64
    return s


# ---- safetensors of random bf16 -------------------------------------------------------------------------
POOL_VALUES = 1000003  # prime: a tensor's rows do not line up with the pool's period


class Pools:
    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.pools = {}

    def bytes_for(self, std):
        key = round(std, 9)
        if key not in self.pools:
            f = array.array("f", (self.rng.gauss(0.0, std) for _ in range(POOL_VALUES)))
            if sys.byteorder != "little":
                f.byteswap()
            raw = f.tobytes()
            out = bytearray(2 * POOL_VALUES)
            out[0::2] = raw[2::4]  # bf16 = the high half of the fp32 bits (truncated)
            out[1::2] = raw[3::4]
            self.pools[key] = bytes(out)
        return self.pools[key]


def write_tensor_data(f, pools, std, n, rng):
    """n bf16 values of N(0, std^2) (a window of the pool at a random offset), or ones (std None)."""
    if std is None:
        f.write(b"\x80\x3f" * n)  # bf16 1.0
        return
    pool = pools.bytes_for(std)
    need = 2 * n
    off = 2 * rng.randrange(POOL_VALUES)
    first = pool[off:off + need]
    f.write(first)
    need -= len(first)
    while need >= len(pool):
        f.write(pool)
        need -= len(pool)
    if need:
        f.write(pool[:need])


def tensor_list(s):
    H, F, V, L = s["hidden"], s["ffn"], s["vocab"], s["layers"]
    d = s.get("head_dim", H // s["heads"])
    qd, kvd = s["heads"] * d, s["kv_heads"] * d
    t = [("model.embed_tokens.weight", [V, H], 1.0)]
    for l in range(L):
        p = f"model.layers.{l}."
        t += [(p + "input_layernorm.weight", [H], None),
              (p + "self_attn.q_proj.weight", [qd, H], H ** -0.5),
              (p + "self_attn.k_proj.weight", [kvd, H], H ** -0.5),
              (p + "self_attn.v_proj.weight", [kvd, H], H ** -0.5)]
        if s["bias"]:
            t += [(p + "self_attn.q_proj.bias", [qd], 0.1), (p + "self_attn.k_proj.bias", [kvd], 0.1),
                  (p + "self_attn.v_proj.bias", [kvd], 0.1)]
        t += [(p + "self_attn.o_proj.weight", [H, qd], qd ** -0.5),
              (p + "post_attention_layernorm.weight", [H], None),
              (p + "mlp.gate_proj.weight", [F, H], H ** -0.5),
              (p + "mlp.up_proj.weight", [F, H], H ** -0.5),
              (p + "mlp.down_proj.weight", [H, F], F ** -0.5)]
    t.append(("model.norm.weight", [H], None))
    if not s["tied"]:
        t.append(("lm_head.weight", [V, H], H ** -0.5))
    return t


def numel(shape):
    n = 1
    for x in shape:
        n *= x
    return n


def write_weights(out, s, seed=0, shard_bytes=5 * 10 ** 9):
    tensors = tensor_list(s)
    shards, cur, cur_bytes = [], [], 0
    for t in tensors:
        b = 2 * numel(t[1])
        if cur and cur_bytes + b > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(t)
        cur_bytes += b
    shards.append(cur)
    pools, rng = Pools(seed), random.Random(seed + 1)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for tname, shape, _ in shard:
            b = 2 * numel(shape)
            header[tname] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + b]}
            off += b
            weight_map[tname] = name
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "wb", buffering=16 << 20) as f:
            f.write(len(h).to_bytes(8, "little"))
            f.write(h)
            for tname, shape, std in shard:
                write_tensor_data(f, pools, std, numel(shape), rng)
        os.replace(tmp, os.path.join(out, name))
        total += off
    if len(shards) > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return total


# ---- tokenizer and config ---------------------------------------------------------------------------------
def write_tokenizer(out, source, vocab):
    """The source tokenizer.json (byte-level BPE like antkv-ref-18m's, or SentencePiece-style BPE like
    stories260K's), its vocabulary padded with unreachable entries <|pad_N|> up to the model's vocab size
    (no merge produces them, so encoding is unchanged). Returns (bos_id, eos_id, source vocab size)."""
    with open(source) as f:
        tok = json.load(f)
    model_vocab = tok["model"]["vocab"]
    n0 = max(max(model_vocab.values()), max([a["id"] for a in tok.get("added_tokens", [])] or [0])) + 1
    if vocab < n0:
        raise SystemExit(f"{source}: the tokenizer has {n0} tokens, more than the model's vocab_size {vocab}")
    for i in range(n0, vocab):
        model_vocab[f"<|pad_{i}|>"] = i
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tok, f, ensure_ascii=False)
    cfg_src = os.path.join(os.path.dirname(source), "tokenizer_config.json")
    bos = eos = None
    if os.path.exists(cfg_src):
        shutil.copy(cfg_src, os.path.join(out, "tokenizer_config.json"))
        with open(cfg_src) as f:
            tc = json.load(f)
        ids = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
        bos, eos = ids.get(tc.get("bos_token")), ids.get(tc.get("eos_token"))
    return bos, eos, n0


def write_checkpoint(out, shape, tokenizer_from, use_tiny=False, seed=0):
    s = dict(shape)
    os.makedirs(out, exist_ok=True)
    if use_tiny:
        with open(tokenizer_from) as f:
            t = json.load(f)
        n0 = max(max(t["model"]["vocab"].values()), max([x["id"] for x in t.get("added_tokens", [])] or [0])) + 1
        s = tiny(s, n0)
    t0 = time.time()
    bos, eos, _ = write_tokenizer(out, tokenizer_from, s["vocab"])
    cfg = {"architectures": ["Qwen2ForCausalLM" if s["model_type"] == "qwen2" else
                             "MistralForCausalLM" if s["model_type"] == "mistral" else "LlamaForCausalLM"],
           "model_type": s["model_type"], "hidden_size": s["hidden"], "num_hidden_layers": s["layers"],
           "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
           "head_dim": s.get("head_dim", s["hidden"] // s["heads"]), "intermediate_size": s["ffn"],
           "vocab_size": s["vocab"], "max_position_embeddings": s["max_pos"], "rope_theta": s["rope_theta"],
           "rms_norm_eps": s["rms_eps"], "tie_word_embeddings": s["tied"], "hidden_act": "silu",
           "attention_bias": s["bias"], "torch_dtype": "bfloat16", "bos_token_id": bos, "eos_token_id": eos}
    if "rope_scaling" in s:
        cfg["rope_scaling"] = s["rope_scaling"]
    if "sliding_window" in s:
        cfg["sliding_window"] = s["sliding_window"]
    if "use_sliding_window" in s:
        cfg["use_sliding_window"] = s["use_sliding_window"]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    total = write_weights(out, s, seed)
    return {"seconds": time.time() - t0, "weight_bytes": total, "config": cfg}


# ---- running the stages -----------------------------------------------------------------------------------
class GpuMemPoll:
    """Peak GPU memory in use (nvidia-smi, every 0.2 s) while a stage runs; None without nvidia-smi."""

    def __init__(self):
        self.peak_mib, self.ok = None, shutil.which("nvidia-smi") is not None
        self.stop = threading.Event()

    def __enter__(self):
        if self.ok:
            self.t = threading.Thread(target=self.loop, daemon=True)
            self.t.start()
        return self

    def loop(self):
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                v = max(int(x) for x in out.split())
                self.peak_mib = v if self.peak_mib is None else max(self.peak_mib, v)
            except Exception:
                pass
            self.stop.wait(0.2)

    def __exit__(self, *a):
        self.stop.set()
        if self.ok:
            self.t.join()


def stop_child(p):
    """Interrupts a running stage as Ctrl-C would (the toolkit then leaves no half-written output and releases its
    run lock), and kills it if it has not ended within 20 s: a stage must not outlive this script, or its run lock
    refuses the next run in the same folder."""
    try:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    except OSError:
        pass


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def run_stage(name, cmd, log_dir, results, timeout=None):
    """Runs cmd; returns its record (seconds, rc, peak host RSS of the process, peak GPU memory)."""
    log = os.path.join(log_dir, name + ".log")
    print(f"\n== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log, "w") as lf, GpuMemPoll() as gpu:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT)
        try:
            _, status, ru = os.wait4(p.pid, 0)
            rc = os.waitstatus_to_exitcode(status)
        except BaseException:  # Ctrl-C, or SIGTERM (e.g. `timeout`): the stage stops with this script
            stop_child(p)
            raise
        p.returncode = rc
    rec = {"stage": name, "cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 2),
           "peak_rss_gib": round(ru.ru_maxrss / 1048576, 2),
           "peak_gpu_mib": gpu.peak_mib, "log": log}
    with open(log) as lf:
        tail = lf.read()[-3000:]
    # the progress lines use \r: keep the final state of each line
    lines = [ln.split("\r")[-1] for ln in tail.splitlines()]
    print("\n".join(lines[-12:]))
    print(f"-- {name}: rc {rc}, {rec['seconds']} s, peak RSS {rec['peak_rss_gib']} GiB, peak GPU "
          f"{rec['peak_gpu_mib']} MiB", flush=True)
    results.append(rec)
    return rec


def file_gib(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 2 ** 30
    return os.path.getsize(path) / 2 ** 30 if os.path.exists(path) else None


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception:
        return None


def parse_results(res_dir):
    """ppl per method from antkv-eval's results.json, and its table."""
    out = {"methods": {}}
    rj = load_json(os.path.join(res_dir, "results.json")) or {}
    for r in rj.get("results", []):
        out["methods"][r.get("method")] = {k: r.get(k) for k in ("ppl", "windows", "seq_len", "seconds",
                                                                 "tokens_per_second")}
    txt = os.path.join(res_dir, "results.txt")
    if os.path.exists(txt):
        with open(txt) as f:
            out["table"] = f.read()
    return out


def split_methods(text):
    """Methods separated by ';', or by ',' when no ';' is given and no method has options after a comma
    ("fp16,vq:bits=1"; "antkv:bits=1,promote=off;vq:bits=1" keeps each method's options)."""
    if ";" in text:
        return [m.strip() for m in text.split(";") if m.strip()]
    out = []
    for part in text.split(","):
        if out and ":" not in part and "=" in part:  # an option of the previous method
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def tree_mib(root):
    """Every file under root (relative path -> MiB), the run's dumps, codebooks and results."""
    out = {}
    for r, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(r, f)
            out[os.path.relpath(p, root)] = round(os.path.getsize(p) / 2 ** 20, 3)
    return dict(sorted(out.items()))


def pipeline_args(a, base):
    """The recipe overrides of `antkv-eval run` / `needle` in the pipeline folder (the same everywhere, so that
    each command reuses the dumps and codebooks of the one before)."""
    texts = "eval.texts=[" + json.dumps(os.path.abspath(a.eval_text)) + "]"
    return base + ["--set", "calibration.text=" + os.path.abspath(a.calib_text),
                   "--set", f"calibration.tokens={a.calib_tokens}", "--set", texts,
                   "--set", f"eval.max_windows={a.eval_windows}", "--set", f"eval.seq_len={a.eval_seq_len}",
                   "--set", "eval.device=" + a.device, "--set", "calibration.device=" + a.device,
                   "--set", "kmeans.device=" + a.device]


def cmd_needle(a, base, b, work, logs, results):
    """One passkey case per method at each --needle-length (random weights: time and memory only, the answers are
    noise): `antkv-eval needle` in the pipeline folder. A first short run (needle-prepare) makes the dumps and
    codebooks the methods need, so that each long stage (one method, one case) times decoding alone: its seconds
    per case (prefill of the prompt, chunked past eval.needle.prefill_chunk, and the greedy answer) and peak GPU
    memory."""
    out = os.path.join(work, "pipeline")
    methods = split_methods(a.needle_methods or a.methods)
    mlist = lambda ms: "eval.methods=[" + ",".join(json.dumps(m) for m in ms) + "]"
    needle = ["--set", "eval.tasks=[needle]", "--set", "eval.needle.tasks=[passkey]", "--set", "eval.needle.depths=[0.5]",
              "--set", "eval.needle.cases=1", "--set", "eval.needle.haystack=filler",
              "--set", "eval.needle.agreement_tokens=0"]
    common = pipeline_args(a, base) + needle
    rec = run_stage("needle-prepare", [b("antkv-eval"), "needle"] + common + [
        "--set", mlist(methods), "--set", "eval.needle.lengths=[1024]", "--out", out, "--quiet"], logs, results)
    if rec["rc"] != 0:
        return
    for L in a.needle_lengths:
        for m in methods:
            tag = m.replace(":", "_").replace(",", "_")
            rec = run_stage(f"needle-{tag}-{L}", [b("antkv-eval"), "needle"] + common + [
                "--set", mlist([m]), "--set", f"eval.needle.lengths=[{L}]", "--out", out, "--quiet"], logs, results)
            j = load_json(os.path.join(out, "needle", "results.json")) or {}
            rows = j.get("results") or [{}]
            rec.update({"method": m, "length": L, "seconds_per_case": rows[0].get("seconds_per_case"),
                        "accuracy": rows[0].get("accuracy"), "kv_cache": rows[0].get("kv_cache"),
                        "device": (j.get("hardware") or {}).get("device")})


def cmd_pipeline(a, base, b, work, logs, results, stages):
    """`antkv-eval run` as a user runs it: one command that calibrates (a pre-RoPE dump too when a method asks for
    it, with the metric=task statistics), trains every codebook set the methods need (gain, rotate, metric=task,
    per-layer widths) and evaluates them. anchor-budget: then `antkv-eval diagnose` on calibration text and
    scripts/anchor_budget.py give a per-layer anchor ratio (lratio=) for --budget-method, evaluated by a second
    `antkv-eval run` that reuses the dumps and codebooks."""
    out = os.path.join(work, "pipeline")
    common = pipeline_args(a, base)
    if "pipeline" in stages:
        methods = split_methods(a.methods)
        rec = run_stage("pipeline", [b("antkv-eval"), "run"] + common + [
            "--set", "eval.methods=[" + ",".join(json.dumps(m) for m in methods) + "]", "--out", out],
            logs, results)
        rec.update(parse_results(out))
        rec["files_mib"] = tree_mib(out)
        for name in ("calib-post.h5", "calib-pre.h5"):
            s = load_json(os.path.join(out, name + ".summary.json")) or {}
            if s:
                rec[name] = {k: s.get(k) for k in ("tokens_run", "tokens_per_second", "seconds_split",
                                                   "bytes_stored")}
        print("   files (MiB):", json.dumps(rec["files_mib"]))
    if "anchor-budget" in stages and a.budget_method:
        m = a.budget_method
        opts = m.split(":", 1)[1] + "," if ":" in m else ""
        without = m.split(":")[0] + ":" + opts + "anchors=off"
        diag = os.path.join(work, "diagnose.json")
        rec = run_stage("diagnose", [b("antkv-eval"), "diagnose"] + common + [
            "--out", out, "--text", os.path.abspath(a.calib_text), "--set", "eval.max_windows=1",
            "--set", f"eval.seq_len={a.budget_seq_len}",
            "--set", "eval.methods=[" + json.dumps(m) + "," + json.dumps(without) + "]",
            "--json", diag, "--force", "--quiet"], logs, results)
        if rec["rc"] != 0:
            return
        ratio = a.budget_ratio
        chk = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                           "anchor_budget.py"), diag, "--with", m, "--without",
                              without, "--ratio", str(ratio)], capture_output=True, text=True)
        print(chk.stderr.strip())
        lratio = chk.stdout.strip()
        results.append({"stage": "anchor-budget", "rc": chk.returncode, "seconds": 0, "lratio": lratio,
                        "report": chk.stderr.strip()[-4000:]})
        if chk.returncode != 0 or not lratio:
            return
        budget_m = m + ("," if ":" in m else ":") + lratio
        rec = run_stage("pipeline-lratio", [b("antkv-eval"), "run"] + common + [
            "--set", "eval.methods=[" + json.dumps(m) + "," + json.dumps(budget_m) + "]", "--out", out],
            logs, results)
        rec.update(parse_results(out))


def cmd_run(a):
    work = os.path.abspath(a.work)
    ck = os.path.join(work, "checkpoint")
    logs = os.path.join(a.out or work, "logs")
    os.makedirs(logs, exist_ok=True)
    results, summary = [], {"shape": a.shape, "tiny": a.tiny}
    b = lambda tool: os.path.join(a.bin, tool)
    dev = a.device
    sets = []
    for kv in a.set or []:
        sets += ["--set", kv]
    base = ["--recipe", a.recipe, "--set", "model=" + ck] + sets

    if not os.path.exists(os.path.join(ck, "config.json")) or a.rewrite:
        t0 = time.time()
        info = write_checkpoint(ck, a.shapes[a.shape], a.tokenizer_from, a.tiny, a.seed)
        rec = {"stage": "write-checkpoint", "rc": 0, "seconds": round(time.time() - t0, 2),
               "weight_gib": round(info["weight_bytes"] / 2 ** 30, 2)}
        results.append(rec)
        print(f"-- write-checkpoint: {rec['seconds']} s, {rec['weight_gib']} GiB of bf16 weights in {ck}", flush=True)
    summary["checkpoint_gib"] = round(file_gib(ck), 2)

    stages = set(a.stages.split(","))
    unknown = stages - {"calibrate", "train", "train-antkv", "train-vq", "ppl", "calib-compare", "pipeline",
                        "anchor-budget", "needle", "none"}
    if unknown:
        raise SystemExit(f"--stages: unknown stage(s) {sorted(unknown)}")
    # the calibration text's first ~8 bytes per token asked for (tokenizing all of a long text costs time)
    calib_text = os.path.join(work, "calib-text.txt")
    with open(a.calib_text, "rb") as f:
        head = f.read(max(1 << 16, 8 * a.calib_tokens))
    if len(head) > 4096 and b"\n" in head[-4096:]:
        head = head[:head.rindex(b"\n") + 1]
    with open(calib_text, "wb") as f:
        f.write(head)
    a.calib_text = calib_text
    if "calib-compare" in stages:
        # the device path against the host path on the same windows (h5py + numpy where they exist)
        paths = {}
        for d in ("cpu", "cuda"):
            paths[d] = os.path.join(work, f"calib-{d}.h5")
            run_stage(f"calibrate-{d}", [b("antkv-calibrate")] + base + [
                "--set", "calibration.text=" + os.path.abspath(a.calib_text), "--set", f"calibration.tokens={a.calib_tokens}",
                "--set", "calibration.device=" + d, "--out", paths[d], "--force", "--quiet"], logs, results)
        chk = subprocess.run([sys.executable, "-c", CALIB_COMPARE, paths["cpu"], paths["cuda"]], capture_output=True,
                             text=True)
        print((chk.stdout + chk.stderr).strip())
        results.append({"stage": "calib-compare", "rc": chk.returncode, "seconds": 0,
                        "report": (chk.stdout + chk.stderr).strip()[-3000:]})
    calib = os.path.join(work, "calib-post.h5")
    cbdir = os.path.join(work, "codebooks")
    os.makedirs(cbdir, exist_ok=True)
    if "calibrate" in stages:
        if os.path.exists(calib):
            os.remove(calib)
        rec = run_stage("calibrate", [b("antkv-calibrate")] + base + [
            "--set", "calibration.text=" + os.path.abspath(a.calib_text), "--set", f"calibration.tokens={a.calib_tokens}",
            "--set", "calibration.device=" + dev, "--out", calib, "--quiet"], logs, results)
        s = load_json(calib + ".summary.json") or {}
        rec.update({k: s.get(k) for k in ("tokens_run", "tokens_stored", "tokens_per_second", "seconds_split",
                                           "bytes_stored")})
        rec["dump_gib"] = round(file_gib(calib), 3) if os.path.exists(calib) else None
        print(f"   calibration: {s.get('tokens_per_second')} tokens/s, dump {rec['dump_gib']} GiB, "
              f"split {s.get('seconds_split')}")
    if stages & {"train", "train-antkv", "train-vq"} and os.path.exists(calib):
        for name, extra, fname in [
                ("train-antkv", [], "k-c8b8_v-c8b8_anchor_post.h5"),
                ("train-vq", ["--set", "kmeans.weighting=none", "--set", "kmeans.exclude_anchors=false"],
                 "k-c8b8_v-c8b8_none_all_post.h5")]:
            if "train" not in stages and name not in stages:
                continue
            out = os.path.join(cbdir, fname)
            rec = run_stage(name, [b("antkv-train-codebook")] + base + [
                "--set", "quant.bits=1", "--set", "kmeans.device=" + dev] + extra +
                ["--calib", calib, "--out", out, "--force", "--quiet"], logs, results)
            rep = load_json(out + ".report.json") or {}
            rec["split"] = rep.get("seconds_split")
            rec["codebook_mib"] = round(file_gib(out) * 1024, 2) if os.path.exists(out) else None
            print(f"   codebooks: {rec['codebook_mib']} MiB, split {rec['split']}")
            if a.h5py_check and os.path.exists(out):
                chk = subprocess.run([sys.executable, "-c", H5PY_CHECK, out, calib], capture_output=True, text=True)
                rec["h5py"] = (chk.stdout + chk.stderr).strip()[-500:]
                print("   h5py:", rec["h5py"])
    if "ppl" in stages:
        methods = split_methods(a.methods)
        res_dir = os.path.join(work, "results")
        rec = run_stage("ppl", [b("antkv-eval"), "ppl"] + base + [
            "--set", "eval.texts=[" + json.dumps(os.path.abspath(a.eval_text)) + "]",
            "--set", "eval.methods=[" + ",".join(json.dumps(m) for m in methods) + "]",
            "--set", f"eval.max_windows={a.eval_windows}", "--set", f"eval.seq_len={a.eval_seq_len}",
            "--set", "eval.device=" + dev, "--codebooks", cbdir, "--out", res_dir, "--quiet"], logs, results)
        rec.update(parse_results(res_dir))
    if stages & {"pipeline", "anchor-budget"}:
        cmd_pipeline(a, base, b, work, logs, results, stages)
    if "needle" in stages:
        cmd_needle(a, base, b, work, logs, results)
    for L in a.long or []:
        for m in split_methods(a.long_methods):
            name = f"ppl-{m.split(':')[0]}-{L}"
            if m == "fp16":
                js = os.path.join(logs, name + ".json")
                rec = run_stage(name, [b("antkv-eval"), "ppl", "--model", ck, "--text", os.path.abspath(a.eval_text),
                                       "--seq-len", str(L), "--max-windows", "1", "--device", dev, "--json", js,
                                       "--protocol", a.protocol,
                                       "--quiet"], logs, results)
                j = load_json(js) or {}
                rec.update({"ppl": j.get("ppl"), "ppl_seconds": j.get("seconds"),
                            "tokens_per_second": j.get("tokens_per_second")})
            else:
                rd = os.path.join(work, "results-" + name)
                rec = run_stage(name, [b("antkv-eval"), "ppl"] + base + [
                    "--set", "eval.texts=[" + json.dumps(os.path.abspath(a.eval_text)) + "]",
                    "--set", "eval.methods=[" + json.dumps(m) + "]", "--set", "eval.max_windows=1",
                    "--set", f"eval.seq_len={L}", "--set", "eval.device=" + dev, "--codebooks", cbdir,
                    "--out", rd, "--quiet"], logs, results)
                rec.update(parse_results(rd))
    summary["stages"] = results
    summary["files_gib"] = {"checkpoint": summary["checkpoint_gib"],
                            "calibration_dump": round(file_gib(calib), 3) if os.path.exists(calib) else None,
                            "codebooks": round(file_gib(cbdir), 4)}
    out_json = os.path.join(a.out or work, f"scale-{a.shape}.json")
    with open(out_json, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\n==== {a.shape}{' (tiny)' if a.tiny else ''}: summary ({out_json})")
    print(f"{'stage':<22} {'rc':>3} {'seconds':>8} {'peak RSS GiB':>12} {'peak GPU MiB':>12}  figures")
    for r in results:
        fig = ""
        if r["stage"] == "calibrate":
            fig = f"{r.get('tokens_per_second')} tok/s, dump {r.get('dump_gib')} GiB"
        elif r["stage"].startswith("train"):
            fig = f"codebooks {r.get('codebook_mib')} MiB, split {r.get('split')}"
        elif r["stage"] == "write-checkpoint":
            fig = f"{r.get('weight_gib')} GiB"
        elif r.get("seconds_per_case") is not None:
            fig = f"{r['seconds_per_case']:.2f} s per {r['length']}-token passkey case ({r.get('kv_cache')} cache)"
        elif r.get("ppl") is not None:
            fig = f"ppl {r.get('ppl'):.4f}, {r.get('tokens_per_second'):.0f} tok/s"
        elif r.get("methods"):
            fig = "; ".join(f"{m}: ppl {v['ppl']:.4f} ({v['tokens_per_second']:.0f} tok/s)"
                            for m, v in r["methods"].items())
        print(f"{r['stage']:<22} {r['rc']:>3} {r['seconds']:>8} {str(r.get('peak_rss_gib', '')):>12} "
              f"{str(r.get('peak_gpu_mib', '')):>12}  {fig}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


# h5py check of the files (where h5py exists): every /meta attribute small, the per-codebook datasets there.
H5PY_CHECK = r"""
import sys, h5py
for p in sys.argv[1:]:
    with h5py.File(p, "r") as f:
        big = [(k, getattr(v, 'nbytes', len(str(v)))) for k, v in f["meta"].attrs.items()
               if getattr(v, 'nbytes', len(str(v))) > 16384]
        extra = ""
        if "layer_0/key_objective" in f:
            extra = " key_objective %s" % (f["layer_0/key_objective"].shape,)
        else:
            extra = " keys %s" % (f["layer_0/keys"].shape,)
        print("%s: h5py reads it; %d /meta attributes, %d over 16 KiB%s" % (p.split('/')[-1], len(f["meta"].attrs), len(big), extra))
"""


# The GPU dump against the CPU dump: max |gpu - cpu| / max |cpu| per layer and dataset (bf16 GEMMs on the GPU:
# ~1e-2 expected), and the share of anchors (top 1% per window and head by anchor_score) both select.
CALIB_COMPARE = r"""
import sys, h5py, numpy as np
a, b = h5py.File(sys.argv[1], "r"), h5py.File(sys.argv[2], "r")
assert (a["tokens"][:] == b["tokens"][:]).all(), "tokens differ"
L = int(a["meta"].attrs["num_layers"]); worst = {}
for l in range(L):
    for ds in ("keys", "values", "S_K", "S_V", "anchor_score"):
        x = a[f"layer_{l}/{ds}"][:].astype(np.float64); y = b[f"layer_{l}/{ds}"][:].astype(np.float64)
        e = float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)); worst[ds] = max(worst.get(ds, 0), e)
    s1 = a[f"layer_{l}/anchor_score"][:]; s2 = b[f"layer_{l}/anchor_score"][:]
    k = max(1, s1.shape[0] // 100)
    same = np.mean([len(set(np.argsort(-s1[:, h])[:k]) & set(np.argsort(-s2[:, h])[:k])) / k for h in range(s1.shape[1])])
    print("layer %d: anchors shared %.2f" % (l, same))
print("max relative error gpu vs cpu:", {k: round(v, 5) for k, v in worst.items()})
ok = worst["keys"] < 0.05 and worst["values"] < 0.05 and worst["S_V"] < 0.1
print("calib-compare:", "OK" if ok else "MISMATCH"); sys.exit(0 if ok else 1)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("checkpoint", help="write a random-weight checkpoint of a named shape")
    c.add_argument("--shape", required=True, help="a shape of `antkv-eval shapes`")
    c.add_argument("--out", required=True)
    c.add_argument("--bin", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build", "apps"),
                   help="folder with antkv-eval, whose `shapes` table names the shapes (default: build/apps)")
    c.add_argument("--tokenizer-from", required=True, help="tokenizer.json of the family (byte-level or SentencePiece BPE)")
    c.add_argument("--tiny", action="store_true", help="2 layers, head_dim 64, the source tokenizer's vocab (CPU tests)")
    c.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="checkpoint -> calibrate -> train-codebook -> ppl, timed")
    r.add_argument("--shape", required=True, help="a shape of `antkv-eval shapes`")
    r.add_argument("--work", required=True, help="folder for the checkpoint, dump, codebooks and results")
    r.add_argument("--out", help="folder for logs and the summary JSON (default --work)")
    r.add_argument("--bin", required=True, help="folder with antkv-calibrate, antkv-train-codebook, antkv-eval")
    r.add_argument("--recipe", required=True, help="recipe YAML (overridden with --set; model= is set here)")
    r.add_argument("--tokenizer-from", required=True)
    r.add_argument("--calib-text", required=True)
    r.add_argument("--eval-text", required=True)
    r.add_argument("--calib-tokens", type=int, default=262144)
    r.add_argument("--eval-windows", type=int, default=16)
    r.add_argument("--eval-seq-len", type=int, default=2048)
    r.add_argument("--methods", default="fp16,uniform:bits=2,vq:bits=1,antkv:bits=1",
                   help="eval.methods, separated by ';' (or by ',' where that is unambiguous: a part with '=' and "
                   "no ':' is an option of the method before it)")
    r.add_argument("--protocol", default="single_bos", help="window protocol of the long-window fp16 run "
                   "(the recipe's eval.protocol for the others)")
    r.add_argument("--long", type=int, nargs="*", help="long-window ppl at these --seq-len (one window each)")
    r.add_argument("--long-methods", default="fp16,antkv:bits=1")
    r.add_argument("--stages", default="calibrate,train,ppl",
                   help="comma-separated: calibrate, train (= train-antkv and train-vq), ppl, calib-compare (GPU "
                   "vs CPU dump; use with --tiny), pipeline (antkv-eval run: every dump and codebook set the "
                   "--methods need, then their ppl), anchor-budget (after pipeline: diagnose + anchor_budget.py -> "
                   "lratio, evaluated), needle (antkv-eval needle: one passkey case per method at each "
                   "--needle-lengths, time per case and peak GPU memory; dumps and codebooks in the pipeline folder)")
    r.add_argument("--needle-lengths", type=int, nargs="*", default=[32768],
                   help="needle stage: context lengths of the one passkey case per method")
    r.add_argument("--needle-methods", help="needle stage: methods (as --methods; default --methods)")
    r.add_argument("--budget-method", default="antkv:bits=1",
                   help="anchor-budget stage: the method whose per-layer anchor ratios are derived")
    r.add_argument("--budget-ratio", type=float, default=0.01, help="anchor-budget: the total ratio per layer")
    r.add_argument("--budget-seq-len", type=int, default=512, help="anchor-budget: diagnose window (CPU)")
    r.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    r.add_argument("--set", action="append", help="recipe override key=value (repeatable)")
    r.add_argument("--tiny", action="store_true")
    r.add_argument("--rewrite", action="store_true", help="write the checkpoint even when one exists")
    r.add_argument("--h5py-check", action="store_true", help="open the codebook and dump files with h5py")
    r.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.shapes = load_shapes(a.bin)
    if a.shape not in a.shapes:
        raise SystemExit(f"--shape: unknown shape {a.shape!r} (the shapes: {', '.join(a.shapes)})")
    if a.cmd == "checkpoint":
        info = write_checkpoint(a.out, a.shapes[a.shape], a.tokenizer_from, a.tiny, a.seed)
        print(f"{a.out}: {info['weight_bytes'] / 2 ** 30:.2f} GiB of bf16 weights in {info['seconds']:.1f} s")
        return 0
    return cmd_run(a)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)  # `timeout` and job schedulers stop a run with SIGTERM
    sys.exit(main())
