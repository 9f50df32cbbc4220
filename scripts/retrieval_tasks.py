"""Synthetic long-context retrieval tasks (RULER-style NIAH family) for training and checking the small reference
model data/models/antkv-retrieval-2m (a test tool, not part of the toolkit). Used by train_retrieval_model.py
(token-level windows, fast) and make_retrieval_reference.py / needle_accuracy.py (text-level prompts, any tokenizer).

Prompt layout (plain text, no chat template; the model's BOS first):
    {intro}\\n{haystack with the needles inserted at word boundaries}\\n{question}
and the model greedily continues with " {answer}". Values are listed in the order the question asks for them
(multi-value: in the order the needles appear in the text), separated by ", ". The haystack is book text or the
repeated RULER noise sentence. Depth d in [0, 1]: the asked needle starts at the first word boundary at or after
fraction d of the haystack (d = 1: right after it); other needles (distractors, further values) go to random word
boundaries.
"""
import numpy as np

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

NIAH_INTRO = ("Some special magic {kind}s are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the {kind}s afterwards.")
NIAH_NEEDLE = "One of the special magic {kind}s for {key} is: {value}."
NIAH_QUESTION_ONE = ("What is the special magic {kind} for {key} mentioned in the provided text? "
                     "The special magic {kind} for {key} mentioned in the provided text is")
NIAH_QUESTION_MANY = ("What are all the special magic {kind}s for {key} mentioned in the provided text? "
                      "The special magic {kind}s for {key} mentioned in the provided text are")

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")

ADJECTIVES = ("ancient", "bitter", "brave", "bright", "broken", "calm", "clever", "cold", "crimson", "curious",
              "damp", "dark", "eager", "early", "empty", "faint", "fierce", "fresh", "gentle", "giant", "golden",
              "green", "grumpy", "hidden", "hollow", "humble", "icy", "jolly", "kind", "lazy", "little", "loud",
              "lucky", "mighty", "narrow", "noisy", "odd", "pale", "proud", "quiet", "rapid", "rough", "round",
              "rusty", "shy", "silent", "silver", "sleepy", "smooth", "steady", "sticky", "strange", "sweet",
              "tall", "tiny", "wet", "wicked", "wild", "wise", "young")
NOUNS = ("anchor", "apple", "arrow", "badger", "basket", "beacon", "bell", "bridge", "candle", "canyon", "castle",
         "cloud", "comet", "copper", "crow", "desert", "dragon", "drum", "eagle", "engine", "falcon", "feather",
         "forest", "garden", "glacier", "goat", "harbor", "hammer", "island", "jacket", "kettle", "ladder", "lantern",
         "lemon", "meadow", "mirror", "monkey", "needle", "orchard", "otter", "parrot", "pepper", "pillow", "planet",
         "puzzle", "rabbit", "river", "rocket", "saddle", "shadow", "spider", "storm", "teapot", "thunder", "tiger",
         "tower", "valley", "violin", "wagon", "whale", "window", "wizard")


def random_number(rng, digits):
    """A decimal number of exactly `digits` digits (no leading zero)."""
    first = str(int(rng.integers(1, 10)))
    rest = "".join(str(int(d)) for d in rng.integers(0, 10, size=digits - 1))
    return first + rest


def random_uuid(rng):
    """A UUID-like value: 32 random hex digits as 8-4-4-4-12."""
    h = "".join("0123456789abcdef"[int(d)] for d in rng.integers(0, 16, size=32))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def random_keys(rng, count):
    """`count` distinct adjective-noun keys."""
    keys = []
    while len(keys) < count:
        k = f"{ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]}-{NOUNS[int(rng.integers(len(NOUNS)))]}"
        if k not in keys:
            keys.append(k)
    return keys


def join_keys(keys):
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def make_task(task, rng, kind="number", digits=7, count=4):
    """One task instance: {"task", "kind", "intro", "needles": [texts], "asked": index of the needle placed at the
    asked depth, "question", "values": [in answer order], "answer": text the model should continue with, with
    its leading space, "order_by_position": whether the answer order follows the needles' positions}.
    count: needles in all for multikey (1 asked + distractors) and multivalue, keys asked for multiquery."""
    value = (lambda: random_uuid(rng)) if kind == "uuid" else (lambda: random_number(rng, digits))
    if task == "passkey":
        v = random_number(rng, digits)
        return dict(task=task, kind="number", intro=PASSKEY_INTRO, needles=[PASSKEY_NEEDLE.format(value=v)],
                    asked=0, question=PASSKEY_QUESTION, values=[v], answer=" " + v, order_by_position=False)
    intro = NIAH_INTRO.format(kind=kind)
    if task in ("niah_single", "niah_multikey"):
        n = 1 if task == "niah_single" else count
        keys = random_keys(rng, n)
        vals = [value() for _ in keys]
        needles = [NIAH_NEEDLE.format(kind=kind, key=k, value=v) for k, v in zip(keys, vals)]
        return dict(task=task, kind=kind, intro=intro, needles=needles, asked=0,
                    question=NIAH_QUESTION_ONE.format(kind=kind, key=keys[0]), values=[vals[0]],
                    answer=" " + vals[0], order_by_position=False)
    if task == "niah_multivalue":
        key = random_keys(rng, 1)[0]
        vals = [value() for _ in range(count)]
        needles = [NIAH_NEEDLE.format(kind=kind, key=key, value=v) for v in vals]
        return dict(task=task, kind=kind, intro=intro, needles=needles, asked=0,
                    question=NIAH_QUESTION_MANY.format(kind=kind, key=key), values=vals, answer=None,
                    order_by_position=True)
    if task == "niah_multiquery":
        keys = random_keys(rng, count)
        vals = [value() for _ in keys]
        needles = [NIAH_NEEDLE.format(kind=kind, key=k, value=v) for k, v in zip(keys, vals)]
        return dict(task=task, kind=kind, intro=intro, needles=needles, asked=0,
                    question=NIAH_QUESTION_MANY.format(kind=kind, key=join_keys(keys)), values=vals,
                    answer=" " + ", ".join(vals), order_by_position=False)
    raise ValueError(f"unknown task '{task}' (known: {', '.join(TASKS)})")


def place_needles(spec, n_slots, depth, rng):
    """Slot index (0..n_slots) before which each needle goes: the asked one at fraction `depth`, the others at
    random slots. Returns the list of (slot, needle index) sorted by slot."""
    slots = []
    for i in range(len(spec["needles"])):
        if i == spec["asked"]:
            slots.append((min(n_slots, int(np.ceil(depth * n_slots - 1e-9))), i))
        else:
            slots.append((int(rng.integers(0, n_slots + 1)), i))
    slots.sort()
    return slots


def answer_text(spec, order):
    """The answer continuation: for multi-value tasks the values in the order the needles appear."""
    if not spec["order_by_position"]:
        return spec["answer"]
    return " " + ", ".join(spec["values"][i] for i in order)


# ---- text level (any tokenizer): prompts for evaluation and references ----

def build_prompt_text(spec, hay_words, depth, rng_slots):
    """The prompt text with the needles inserted between the words of the haystack (a list of words)."""
    slots = place_needles(spec, len(hay_words), depth, rng_slots)
    out, w = [], 0
    for slot, i in slots:
        out.extend(hay_words[w:slot])
        out.append(spec["needles"][i])
        w = slot
    out.extend(hay_words[w:])
    order = [i for _, i in slots]
    return spec["intro"] + "\n" + " ".join(out) + "\n" + spec["question"], answer_text(spec, order)


def fit_prompt(encode, spec, words, start, prompt_tokens, depth, seed):
    """The longest prompt (BOS included) of at most `prompt_tokens` tokens whose haystack is words[start:start+n]:
    binary search on n. encode(text) -> ids with BOS. Returns (ids, text, answer)."""
    lo, hi = 0, min(len(words) - start, prompt_tokens * 2)
    best = None
    while lo <= hi:
        n = (lo + hi) // 2
        text, ans = build_prompt_text(spec, words[start:start + n], depth, np.random.default_rng(seed))
        ids = encode(text)
        if len(ids) <= prompt_tokens:
            best = (ids, text, ans)
            lo = n + 1
        else:
            hi = n - 1
    if best is None:
        raise ValueError(f"the task's fixed text alone exceeds {prompt_tokens} tokens")
    return best


# ---- token level (the stories260K-style Metaspace tokenizer): training windows ----

class TokenWindows:
    """Builds training windows of exactly L tokens from token pieces. With a tokenizer whose normalizer prepends
    '▁' and maps ' ' to '▁' (and no merge puts '▁' inside a piece), tokenizing pieces separately and concatenating
    equals tokenizing them joined by spaces; a piece after '\\n' is tokenized with the newline and its leading
    standalone '▁' dropped, so windows match the text-level prompts token for token."""

    def __init__(self, tok, stream, bos, eos):
        self.tok, self.bos, self.eos = tok, bos, eos
        self.space = tok.token_to_id("▁")
        self.newline = tok.token_to_id("<0x0A>")
        assert self.space is not None and self.newline is not None, "tokenizer lacks '▁' or <0x0A>"
        self.stream = stream                                     # np.int32 token ids of the training text
        starts = np.array([tok.id_to_token(i).startswith("▁") for i in range(tok.get_vocab_size())])
        self.word_start = starts[stream]                         # stream position begins a word
        self.word_start_idx = np.flatnonzero(self.word_start)
        noise = self.enc(" ".join([NOISE] * 200))
        self.noise = np.array(noise, dtype=np.int32)
        self.noise_word_start = starts[self.noise]
        self.cache = {}

    def enc(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def enc_after_newline(self, text):
        ids = self.tok.encode("\n" + text, add_special_tokens=False).ids
        assert ids[0] == self.space and ids[1] == self.newline, "unexpected tokenization after a newline"
        return ids[1:]                                           # the newline itself, then the text

    def enc_answer(self, answer):
        """The answer ' v' right after the question: its leading space is the '▁' the tokenizer prepends."""
        assert answer.startswith(" ")
        return self.enc(answer[1:])

    def cached(self, key, fn, text):
        if key not in self.cache:
            self.cache[key] = fn(text)
        return self.cache[key]

    def lm_window(self, L, rng):
        s = int(self.word_start_idx[rng.integers(0, len(self.word_start_idx))])
        s = min(s, len(self.stream) - (L - 1))
        return np.concatenate([[self.bos], self.stream[s:s + L - 1]]).astype(np.int64), None

    def copy_window(self, L, rng):
        """BOS, then book spans of 16-256 tokens each followed by its repeat: the repeats can only be predicted
        by copying, which trains the induction heads retrieval is built on."""
        parts, n = [np.array([self.bos])], 1
        while n < L:
            k = int(rng.integers(16, 257))
            s = int(rng.integers(0, len(self.stream) - k))
            span = self.stream[s:s + k]
            parts += [span, span]
            n += 2 * k
        return np.concatenate(parts)[:L].astype(np.int64), None

    def task_window(self, spec, L, depth, rng, noise_filler):
        """(ids [L], (answer_begin, answer_end)) or None when the task does not fit in L."""
        intro = self.cached(("i", spec["intro"]), self.enc, spec["intro"])
        needles = [self.enc(n) for n in spec["needles"]]
        q_after_hay = self.enc_after_newline(spec["question"])
        fixed = 1 + len(intro) + 1 + sum(map(len, needles)) + len(q_after_hay)
        # the answer is tokenized after the slots are known (multi-value order); budget its length first
        ans_guess = len(self.enc_answer(answer_text(spec, list(range(len(needles))))))
        n = L - fixed - ans_guess - 1
        if n < 32:
            return None
        if noise_filler:
            s = int(rng.integers(0, len(self.noise) - n - 1))
            while s > 0 and not self.noise_word_start[s]:
                s -= 1
            hay, hay_ws = self.noise[s:s + n], self.noise_word_start[s:s + n]
        else:
            s = int(self.word_start_idx[rng.integers(0, len(self.word_start_idx))])
            s = min(s, len(self.stream) - n)
            hay, hay_ws = self.stream[s:s + n], self.word_start[s:s + n]
        bounds = np.flatnonzero(hay_ws)                           # word boundaries inside the haystack
        bounds = np.append(bounds, n)
        slots = place_needles(spec, len(bounds) - 1, depth, rng)
        order = [i for _, i in slots]
        ans = self.enc_answer(answer_text(spec, order)) + [self.eos]
        parts, segs, w = [[self.bos], intro, [self.newline]], [], 0
        for k, (slot, i) in enumerate(slots):
            pos = int(bounds[slot])
            segs.append(len(parts))
            parts.append(hay[w:pos])
            if k == 0 and pos == 0:                              # needle right after the newline
                parts.append(self.enc_after_newline(spec["needles"][i])[1:])
            else:
                parts.append(needles[i])
            w = pos
        segs.append(len(parts))
        parts.append(hay[w:])
        parts.append(q_after_hay)
        parts.append(ans)
        # the answer's token count can differ from the budget (multi-value order): trim the longest haystack
        # segment, or add book text after the intro's newline, so that the window is exactly L
        diff = L - sum(len(p) for p in parts)
        if diff < 0:
            longest = max(segs, key=lambda j: len(parts[j]))
            if len(parts[longest]) < -diff:
                return None
            parts[longest] = parts[longest][:len(parts[longest]) + diff]
        elif diff > 0:
            parts.insert(3, self.stream_pad(diff, rng))
        ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
        assert len(ids) == L, (len(ids), L)
        return ids, (L - len(ans), L)

    def stream_pad(self, k, rng):
        """k tokens of book text (fills a window whose answer came out shorter than budgeted)."""
        s = int(rng.integers(0, len(self.stream) - k))
        return self.stream[s:s + k]
