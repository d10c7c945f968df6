"""
Data for the VLM: the synthetic "shapes world" (the CPU default), LLaVA-format conversations (the paper's
scale), the image geometry the frozen encoder sees, and a toy tokenizer for the shapes world.

Everything a VLM sample needs to be reproduced is here, without a model:
- `preprocess(image, geometry, size, mean, std)` -> (pixels (3,S,S), frame): the two input geometries of the paper
  (paper.md §1.3). `letterbox` pads the image to a *centered* square with the mean colour, then resizes to S x S
  (what every released model used). `square` resizes to fit S x S and pads right/bottom (the "square input
  geometry" stabilizer, `letterbox-square-S`). On a non-square image the two put the content at different places.
- `project_box(box_px, frame)`: a pixel box -> a normalized [0, 1] box in the frame the model sees (paper.md §3.3,
  the vlm-evaluation fork's fix: boxes live in the padded frame, not in the raw image).
- `format_box(box)`: "[x1, y1, x2, y2]", 2 decimals, Python float repr ("0.4", not "0.40"), LLaVA-v1.5's format.
- The shapes world: Pillow scenes with 1-3 coloured shapes on a low-saturation gradient background, VQA questions
  (colour, shape, count, exists, left/right; one-word answers), RefCOCO-style grounding with the paper's exact
  prompt, and a pretraining split for the matched encoder pretraining: dense per-token object classes and boxes
  (`patch_targets`, the toy stand-in for detection pretraining) or single-object classification (ImageNet-1K's).
  Every scene is a pure function of (world seed, split, index): fixed splits, the test split is never trained on.
- `load_llava(path, image_root)`: LLaVA-v1.5 JSON (e.g. llava_v1_5_mix665k.json) -> validated records.
- `build_tokenizer(texts)`: a small Llama-like BPE (`tokenizers`) with <unk> <s> </s> <pad>, BOS prepended, and
  decode(encode(s)) == s for the world's text (so eval's parse_box can read the boxes). Each of the 101 box values
  "0.0" ... "1.0" is one token (`COORD_TOKENS`); other digits are split one by one, as Llama splits them.

This file imports no model code; train.py turns records into token ids with llm.tokenize_turns.

Glossary
    S       side of the square model input in pixels (128 for the toy, 224 in the paper)
    W H     raw image width and height in pixels
    frame   dict(size=S, scale_x, scale_y, pad_x, pad_y): a raw pixel (x, y) lands at
            (x * scale_x + pad_x, y * scale_y + pad_y) in the S x S input; normalized = that / S
    box     (x1, y1, x2, y2); "px" = raw image pixels, otherwise normalized to the model's frame
"""
import json
import os
import string
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------- image geometry

GEOMETRIES = ("letterbox", "square")


def preprocess(image, geometry="letterbox", size=128, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """PIL image -> (pixels (3, S, S) float32 torch tensor, normalized; frame dict). See paper.md §1.3."""
    import torch  # local import: the world generator above works without torch

    if geometry not in GEOMETRIES:
        raise ValueError(f"preprocess: geometry must be one of {GEOMETRIES}, got {geometry!r}")
    image = image.convert("RGB")
    w, h = image.size
    m = max(w, h)
    fill = tuple(int(c * 255) for c in mean)  # the pad colour is the normalization mean, so it becomes ~0
    if geometry == "letterbox":
        # LetterboxPad: symmetric pad to an m x m square, pad = int((m - side) / 2), then a bicubic resize to S.
        px, py = int((m - w) / 2), int((m - h) / 2)
        canvas = Image.new("RGB", (m, m), fill)
        canvas.paste(image, (px, py))
        out = canvas.resize((size, size), Image.BICUBIC) if m != size else canvas
        s = size / m
        frame = dict(size=size, scale_x=s, scale_y=s, pad_x=px * s, pad_y=py * s)
    else:
        # letterbox-square-S: resize to fit S x S keeping the aspect ratio, pad right and bottom.
        nw, nh = max(1, round(w * size / m)), max(1, round(h * size / m))
        resized = image.resize((nw, nh), Image.BICUBIC) if (nw, nh) != (w, h) else image
        out = Image.new("RGB", (size, size), fill)
        out.paste(resized, (0, 0))
        frame = dict(size=size, scale_x=nw / w, scale_y=nh / h, pad_x=0.0, pad_y=0.0)
    x = torch.from_numpy(np.asarray(out, dtype=np.float32) / 255.0)     # (S, S, 3) in [0, 1]
    x = x.permute(2, 0, 1)                                              # (3, S, S)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.contiguous(), frame


def project_box(box_px, frame):
    """Raw-pixel (x1, y1, x2, y2) -> normalized box in the frame the model sees, clipped to [0, 1]."""
    x1, y1, x2, y2 = box_px
    S = frame["size"]
    nx = lambda x: min(1.0, max(0.0, (x * frame["scale_x"] + frame["pad_x"]) / S))
    ny = lambda y: min(1.0, max(0.0, (y * frame["scale_y"] + frame["pad_y"]) / S))
    return (nx(x1), ny(y1), nx(x2), ny(y2))


def format_box(box):
    """Normalized box -> "[x1, y1, x2, y2]" with 2 decimals in Python float repr (0.4 not 0.40), as LLaVA v1.5."""
    return "[" + ", ".join(repr(round(float(v), 2)) for v in box) + "]"


# ----------------------------------------------------------------------------- the shapes world

COLORS = {  # saturated object colours; backgrounds are low-saturation so the two never get confused
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230),
    "yellow": (240, 210, 40), "purple": (150, 60, 200), "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
COUNT_WORDS = ("zero", "one", "two", "three", "four")  # only for the question text; answers are digits
EXISTS_QUESTION = "Is there a {} {}?"  # colour, shape
GROUND_PROMPT = 'Please provide the bounding box coordinate of the region this sentence describes: "{}"'
QTYPES = ("color", "shape", "count", "exists", "left_right")
SPLITS = {"train": 0, "val": 1, "test": 2, "cls_train": 3, "cls_val": 4}  # split name -> stream id of the RNG
NUM_CLASSES = len(COLORS) * len(SHAPES)  # the classification set's label = color index * len(SHAPES) + shape index


@dataclass
class WorldConfig:
    seed: int = 1234                      # world seed: fixes every split (independent of the training seed)
    canvases: tuple = ((128, 128), (160, 128), (128, 160), (192, 128), (128, 192), (144, 112))  # (W, H) choices
    min_objects: int = 1
    max_objects: int = 3
    min_size: float = 0.32                # object side as a fraction of min(W, H)
    max_size: float = 0.5
    n_train: int = 2400                   # scenes per split (the frozen features of the train split are cached)
    n_val: int = 100
    n_test: int = 200
    n_cls_train: int = 4000               # classification images for encoder pretraining
    n_cls_val: int = 300

    def split_size(self, split):
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test,
                "cls_train": self.n_cls_train, "cls_val": self.n_cls_val}[split]


class _Presets(dict):
    def __missing__(self, key):
        raise KeyError(f"unknown world preset {key!r}; valid: {sorted(self)}")


CONFIGS = _Presets(toy=WorldConfig())


def _rng(world, split, index, salt=0):
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; valid: {sorted(SPLITS)}")
    return np.random.default_rng([world.seed, SPLITS[split], index, salt])


def _background(rng, W, H, draw=True):
    """A low-saturation two-colour linear gradient (horizontal, vertical or diagonal); None if not `draw` (the
    random draws are the same either way, so the scene's layout does not depend on whether pixels are made)."""
    def muted():
        g = rng.uniform(40, 225)
        return np.clip(g + rng.uniform(-22, 22, size=3), 0, 255)
    a, b = muted(), muted()
    direction = rng.integers(3)
    if not draw:
        return None
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    t = xs / max(1, W - 1) if direction == 0 else ys / max(1, H - 1) if direction == 1 else (xs + ys) / (W + H - 2)
    img = a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]   # (H, W, 3)
    return Image.fromarray(img.astype(np.uint8), "RGB")


def _draw(draw, shape, box, rgb):
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    # PIL's bounding boxes are inclusive, so x2 - 1 makes the drawn extent exactly [x1, x2).
    if shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=rgb)
    elif shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), (cx, y1)], fill=rgb)
    else:  # diamond
        draw.polygon([(cx, y1), (x2 - 1, cy), (cx, y2 - 1), (x1, cy)], fill=rgb)


def make_scene(world, split, index, n_objects=None, draw=True):
    """Scene `index` of `split` -> dict(image PIL, objects [dict(color, shape, box px)], size (W, H), id).
    draw=False skips the pixels (image None) and returns the same objects: what a conversation needs."""
    rng = _rng(world, split, index)
    W, H = world.canvases[rng.integers(len(world.canvases))]
    image = _background(rng, W, H, draw)
    painter = ImageDraw.Draw(image) if draw else None
    n = n_objects or int(rng.integers(world.min_objects, world.max_objects + 1))
    combos = [(c, s) for c in COLORS for s in SHAPES]
    chosen = [combos[i] for i in rng.permutation(len(combos))[:n]]   # unique (colour, shape): expressions are unique
    objects, boxes = [], []
    for color, shape in chosen:
        for _ in range(100):  # rejection-sample a spot that does not touch the other objects
            side = int(rng.uniform(world.min_size, world.max_size) * min(W, H))
            x1, y1 = int(rng.integers(0, W - side + 1)), int(rng.integers(0, H - side + 1))
            box = (x1, y1, x1 + side, y1 + side)
            if all(box[2] + 4 <= b[0] or b[2] + 4 <= box[0] or box[3] + 4 <= b[1] or b[3] + 4 <= box[1]
                   for b in boxes):
                break
        else:
            continue  # no room: the scene simply has fewer objects (the count question stays truthful)
        boxes.append(box)
        if draw:
            _draw(painter, shape, box, COLORS[color])
        objects.append(dict(color=color, shape=shape, box=tuple(float(v) for v in box)))
    return dict(image=image, objects=objects, size=(W, H), id=f"{split}-{index}")


def vqa_questions(scene, rng):
    """All well-posed one-word questions about a scene -> list of (qtype, question, answer)."""
    objs = scene["objects"]
    W = scene["size"][0]
    out = [("count", "How many shapes are there?", str(len(objs)))]
    present = {(o["color"], o["shape"]) for o in objs}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    c, s = objs[rng.integers(len(objs))]["color"], objs[rng.integers(len(objs))]["shape"]
    if rng.random() < 0.5 or not absent:  # yes/no balanced
        o = objs[rng.integers(len(objs))]
        out.append(("exists", EXISTS_QUESTION.format(o["color"], o["shape"]), "yes"))
    else:
        c, s = absent[rng.integers(len(absent))]
        out.append(("exists", EXISTS_QUESTION.format(c, s), "no"))
    for o in objs:
        if sum(p["shape"] == o["shape"] for p in objs) == 1:
            out.append(("color", f"What color is the {o['shape']}?", o["color"]))
        if sum(p["color"] == o["color"] for p in objs) == 1:
            out.append(("shape", f"What shape is the {o['color']} object?", o["shape"]))
    for a in objs:
        for b in objs:
            ca, cb = (a["box"][0] + a["box"][2]) / 2, (b["box"][0] + b["box"][2]) / 2
            if a is not b and abs(ca - cb) >= 0.1 * W:  # only clearly separated pairs: the answer is not a guess
                q = f"Is the {a['color']} {a['shape']} to the left of the {b['color']} {b['shape']}?"
                out.append(("left_right", q, "yes" if ca < cb else "no"))
    return out


def ground_questions(scene):
    """RefCOCO-style referring expressions -> list of (expression, question, box px)."""
    return [(f"the {o['color']} {o['shape']}", GROUND_PROMPT.format(f"the {o['color']} {o['shape']}"), o["box"])
            for o in scene["objects"]]


def shapes_examples(split="test", n=None, world=None, geometry="letterbox", image_size=128):
    """Held-out examples of a split: per scene one VQA question (question types cycle) and one grounding query.

    Each example is a dict(image, task "vqa"|"ground", question, answers list[str], qtype, n_objects (in the scene),
    id; for ground also expression, box (raw pixel xyxy) and others (the raw pixel boxes of the scene's other
    objects, so eval can tell a box on the wrong object from a miss)). VQA answers are the one answer repeated 10
    times (the VQAv2 format with 10 human answers, so the soft accuracy of a correct answer is 1). A ground
    example's answers hold the box string in the frame of `geometry` / `image_size`.
    """
    world = world or CONFIGS["toy"]
    n = world.split_size(split) if n is None else n
    out = []
    for i in range(n):
        scene = make_scene(world, split, i)
        rng = _rng(world, split, i, salt=1)
        qs = vqa_questions(scene, rng)
        want = QTYPES[i % len(QTYPES)]
        pool = [q for q in qs if q[0] == want] or qs
        qtype, q, a = pool[rng.integers(len(pool))]
        n_obj = len(scene["objects"])
        out.append(dict(image=scene["image"], task="vqa", question=q, answers=[a] * 10, qtype=qtype,
                        n_objects=n_obj, id=f"{scene['id']}-vqa"))
        k = rng.integers(n_obj)
        expr, q, box = ground_questions(scene)[k]
        others = [o["box"] for j, o in enumerate(scene["objects"]) if j != k]  # to tell a wrong object from a miss
        frame = preprocess_frame(scene["size"], geometry, image_size)
        out.append(dict(image=scene["image"], task="ground", question=q, expression=expr, box=box, others=others,
                        answers=[format_box(project_box(box, frame))], qtype="ground", n_objects=n_obj,
                        id=f"{scene['id']}-ground"))
    return out


def preprocess_frame(size_wh, geometry, image_size):
    """The frame preprocess() would return for an image of size (W, H), without touching pixels."""
    w, h = size_wh
    m = max(w, h)
    if geometry == "letterbox":
        s = image_size / m
        return dict(size=image_size, scale_x=s, scale_y=s, pad_x=int((m - w) / 2) * s, pad_y=int((m - h) / 2) * s)
    if geometry == "square":
        nw, nh = max(1, round(w * image_size / m)), max(1, round(h * image_size / m))
        return dict(size=image_size, scale_x=nw / w, scale_y=nh / h, pad_x=0.0, pad_y=0.0)
    raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")


def train_conversation(world, split, index, epoch, geometry="letterbox", image_size=128, n_turns=4):
    """A multi-turn training conversation for scene `index`, re-drawn every epoch (the image stays the same).

    Several questions per image amortise the image tokens over more supervised answers, as LLaVA's multi-turn
    instruct data does (train.py's default --isolate-turns then hides the turns from each other, so each one is
    learned as a single-turn sample that shares the image). Roughly two turns in five are grounding queries. No
    question is asked twice in one conversation: a repeated question could be answered by copying the earlier
    answer from the context instead of reading the image, so a scene with few distinct questions gets a shorter
    conversation.
    Returns (scene without its pixels (image None), turns [(question, answer), ...]).
    """
    scene = make_scene(world, split, index, draw=False)
    rng = _rng(world, split, index, salt=100 + epoch)
    frame = preprocess_frame(scene["size"], geometry, image_size)
    pools = {}
    for t, q, a in vqa_questions(scene, rng):
        if t != "exists":
            pools.setdefault(t, []).append((q, a))
    # existence: every object ("yes") and as many absent (colour, shape) pairs ("no"), so yes/no stay balanced
    objs = scene["objects"]
    present = {(o["color"], o["shape"]) for o in objs}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    pools["exists"] = [(EXISTS_QUESTION.format(c, s), "yes") for c, s in sorted(present)]
    pools["exists"] += [(EXISTS_QUESTION.format(c, s), "no") for c, s in
                        (absent[i] for i in rng.permutation(len(absent))[: len(objs)])]
    ground = [(q, format_box(project_box(box, frame))) for _, q, box in ground_questions(scene)]
    turns = []
    while len(turns) < n_turns:
        types = sorted(t for t, pool in pools.items() if pool)
        if ground and (rng.random() < 0.4 or not types):
            pool = ground
        elif types:
            pool = pools[types[rng.integers(len(types))]]  # type first: rare types are not drowned by left/right
        else:
            break  # every distinct question of this scene has been asked
        turns.append(pool.pop(int(rng.integers(len(pool)))))
    return scene, turns


def classification_example(world, split, index):
    """One object on a background -> (PIL image, label = color index * len(SHAPES) + shape index)."""
    scene = make_scene(world, split, index, n_objects=1)
    return scene["image"], object_class(scene["objects"][0])


def object_class(obj):
    """The classification label of an object: colour index * len(SHAPES) + shape index (NUM_CLASSES of them)."""
    return list(COLORS).index(obj["color"]) * len(SHAPES) + SHAPES.index(obj["shape"])


def patch_targets(scene, frame, grid):
    """Dense targets for encoder pretraining on a grid x grid token map of the model's input (row-major like the
    encoders' tokens): for each cell, the class of the object whose box holds the cell's centre, else NUM_CLASSES
    (background), and that object's normalized box (x1, y1, x2, y2) in the model's frame (zeros on background).
    Returns (labels: grid*grid ints, boxes: grid*grid 4-tuples)."""
    objs = [(project_box(o["box"], frame), object_class(o)) for o in scene["objects"]]
    labels, boxes = [], []
    for r in range(grid):
        for c in range(grid):
            x, y = (c + 0.5) / grid, (r + 0.5) / grid
            hit = next(((b, k) for b, k in objs if b[0] <= x < b[2] and b[1] <= y < b[3]), None)
            labels.append(NUM_CLASSES if hit is None else hit[1])
            boxes.append((0.0, 0.0, 0.0, 0.0) if hit is None else hit[0])
    return labels, boxes


def world_texts():
    """Every word and symbol the shapes world can produce (the toy tokenizer's training corpus)."""
    texts = [GROUND_PROMPT.format(f"the {c} {s}") for c in COLORS for s in SHAPES]
    texts += [f"What color is the {s}? What shape is the {c} object? Is there a {c} {s}? "
              f"Is the {c} {s} to the left of the {c} {s}?" for c in COLORS for s in SHAPES]
    texts += ["How many shapes are there? yes no " + " ".join(COUNT_WORDS) + " " + " ".join(COLORS)]
    texts += [format_box((i / 100, (i + 7) % 100 / 100, 0.5, 1.0)) for i in range(100)]
    return texts


# ----------------------------------------------------------------------------- toy tokenizer

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, Llama's order for the first three
COORD_TOKENS = tuple(repr(round(i / 100, 2)) for i in range(101))  # "0.0", "0.01", ..., "0.99", "1.0": format_box's


def build_tokenizer(texts, vocab_size=400, coord_tokens=True):
    """A Llama-like BPE trained on `texts`: '▁' marks word starts, digits are single tokens, <s> prepended.

    coord_tokens=True adds the 101 values a box coordinate can take ("0.0" ... "1.0", COORD_TOKENS) as whole
    tokens, so the toy LLM writes a box as 4 choices among 101 values instead of 4 chains of digits (the location
    tokens of Pix2Seq / OFA / Kosmos-2, but spelled as the same text, so the answer string stays LLaVA's). The toy
    Llama grounds among several objects much better that way (README, "train"); Llama's own tokenizer (`--llm`)
    has no such tokens and writes "0.37" digit by digit.
    Deterministic for a given corpus. The alphabet is all printable ASCII, so any English prompt round-trips
    (decode(encode(s)) == s for text with single spaces); unseen words just split into more pieces.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Metaspace splits at spaces and marks word starts like sentencepiece. Punctuation then cuts "circle?" and
    # "circle\"" into "▁circle" + the mark, so a word is one token whatever follows it, as in Llama's vocabulary
    # (this tiny corpus would otherwise learn three unrelated tokens for one shape, and what the model learns about
    # "circle" in grounding would not carry over to existence questions). Digits isolates each digit (Llama splits
    # numbers into single digits, which is what lets a small model write "0.37" digit by digit).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = sorted(set(string.printable) - set(" \t\r\x0b\x0c") | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if coord_tokens:  # matched in the raw text before the pre-tokenizer, longest first, only as a whole word
        tok.add_tokens([AddedToken(t, single_word=True) for t in COORD_TOKENS])  # (so "10.5" stays 1 0 . 5)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok


# ----------------------------------------------------------------------------- LLaVA-format data


def load_llava(path, image_root=None, skip_missing_images=False):
    """LLaVA-v1.5 JSON -> (records, n_skipped). A record is dict(id, image: path | None, turns [(q, a), ...]).

    Validation fails with one line naming the file and the entry index: malformed JSON, an entry that is not an
    object, a turn with a wrong role or a non-string value, a conversation without an answer, and a missing image
    (or, with skip_missing_images=True, such entries are skipped and counted). "<image>" is removed from the
    questions and they are stripped (paper.md §1.6); text-only entries (no "image") are kept.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path}: no such file")
    with open(path) as f:
        try:
            entries = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--data {path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(entries, list):
        raise ValueError(f"--data {path}: expected a JSON list of entries, got {type(entries).__name__}")
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    records, skipped = [], 0
    for i, e in enumerate(entries):
        where = f"--data {path}: entry {i}" + (f" (id {e.get('id')!r})" if isinstance(e, dict) and "id" in e else "")
        if not isinstance(e, dict):
            raise ValueError(f"{where}: expected an object, got {type(e).__name__}")
        conv = e.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise ValueError(f"{where}: 'conversations' must be a non-empty list, got {conv!r:.60}")
        turns, question = [], None
        for j, t in enumerate(conv):
            if not isinstance(t, dict) or t.get("from") not in ("human", "gpt") or not isinstance(t.get("value"), str):
                raise ValueError(f"{where}: turn {j} must be {{'from': 'human'|'gpt', 'value': str}}, got {t!r:.80}")
            if t["from"] == "human":
                if question is not None:
                    raise ValueError(f"{where}: turn {j}: two human turns in a row (turn {j - 1} has no answer)")
                question = t["value"].replace("<image>", "").strip()
            else:
                if question is None:
                    raise ValueError(f"{where}: turn {j}: an answer ('gpt') without a question before it")
                turns.append((question, t["value"]))
                question = None
        if question is not None or not turns:
            raise ValueError(f"{where}: conversation has no answer (the last human turn is never answered)")
        image = None
        if e.get("image") is not None:
            if not isinstance(e["image"], str):
                raise ValueError(f"{where}: 'image' must be a path string, got {e['image']!r:.60}")
            image = os.path.join(root, e["image"])
            if not os.path.isfile(image):
                if skip_missing_images:
                    skipped += 1
                    continue
                raise FileNotFoundError(f"{where}: image not found: {image} (pass --skip-missing-images to skip "
                                        f"and count such entries)")
        records.append(dict(id=e.get("id", i), image=image, turns=turns))
    return records, skipped
