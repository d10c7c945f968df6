"""
eval.py: what the paper measures. VQA and grounding metrics, localization-collapse diagnostics, token-region
similarity maps, the weighted VQA / Loc / Overall scores and the ViT-vs-VMamba comparison table.

    python eval.py runs/vit runs/vmamba                      # shapes-world test split, one markdown table
    python eval.py runs/vit runs/vmamba --save-maps maps/    # + similarity-map PNGs, ViT and VMamba side by side
    python eval.py runs/vmamba --bench vqav2=vqav2.jsonl --bench refcoco=refcoco.jsonl --image-root data/

What each part implements (paper.md is ../shared/reference/paper.md)
- `parse_box`: the scorer's box parser (paper.md §3.3): the *whole* answer must be one Python list of 4 numbers,
  all in [0, 1], x1 < x2, y1 < y2; anything else is a miss. The original scorer calls `ast.literal_eval`; we never
  evaluate anything and accept exactly the subset of literal_eval's language that spells a list of 4 decimal
  int/float literals (see `_BOX_RE`), with a length cap so a 10 MB answer costs microseconds.
- Grounding accuracy: Acc@0.5 IoU (RefCOCO family) and Acc@0.25 (OCID-Ref), IoU on normalized xyxy boxes, with
  the ground truth projected into the frame the model actually saw (letterbox = centered square pad, square =
  naive x/W, y/H) by data.py's `project_box`: normalizing by the raw image size is the known bug of the upstream
  scorer (TRI-ML/vlm-evaluation#16, paper.md §3.3).
- `vqa_accuracy`: the official VQAv2 soft accuracy (Antol et al. 2015; Goyal et al. 2017; the Cloud-CV
  `vqaEval.py` scorer): min(#matching humans / 3, 1) averaged over the 10 leave-one-out subsets of the 10 human
  answers, with the official answer normalization (punctuation, number words, articles, contractions).
  `exact_match` for GQA-style single-answer sets, `yes_no` + accuracy for POPE-style sets.
- `weighted_scores`: Weighted VQA / Loc / Overall = accuracy averaged over benchmarks weighted by example counts.
  paper.md §3.4 derives this fit from the released numbers (w = 288,750 / 333,580 = 0.8656 for VQA); it is not a
  quote from the paper.
- Diagnostics (paper.md §4.4, "localization collapse"): parse-failure rate, degenerate boxes, the share of the
  single most common box, and the spread of predicted box centres relative to the ground truth's.
- Similarity maps (paper.md §5, method not published, so ours is defined in `similarity_map`): cosine similarity
  between the mean LLM hidden state of the referring expression's tokens and each visual token's hidden state,
  at one LLM layer, drawn over the image; sharpness = share of the above-mean similarity mass inside the GT box.

Glossary (shape letters used in the comments)
    B   batch size (examples per generate call)
    S   side of the square image the encoder sees (128 for the toy presets)
    P   number of visual tokens, P = h * w
    h w visual token grid (S / 16 for both toy encoders)
    T   token positions in the spliced LLM sequence: [BOS] [P image tokens] [prompt text ...]
    D   LLM hidden width
    N   number of examples scored
"""
import argparse
import json
import math
import os
import re
import sys
from collections import Counter

import torch

# ----------------------------------------------------------------------------- boxes

# The answer has to be ONE Python list of four int/float literals. This regex is the subset of the language
# `ast.literal_eval` accepts for that (checked against literal_eval by a fuzz test):
#   - whitespace that Python allows inside brackets: space, \t, \n, \r, \f (not \v, not unicode spaces)
#   - at most ONE unary sign per number, optionally followed by whitespace (literal_eval refuses "--1")
#   - decimal ints "0", "00", "7" (not "07": Python 3 refuses leading zeros, checked after the match) and floats
#     "1.", ".5", "0.25", "1e-3", "2.5E+2"; an optional trailing comma ("[a, b, c, d,]" is a valid list)
# Deliberately refused although literal_eval would take them, because no model writes them and refusing is the
# safe side: tuples, parenthesised numbers, hex/octal/binary, "_" digit separators, comments, backslash
# continuations, complex numbers. True/False are refused too: literal_eval would turn them into 1/0.
# Every piece is unambiguous (no nested quantifiers), so matching is linear time; the length cap bounds it anyway.
_WS = r"[ \t\n\r\f]*"
_NUM = r"([+-]?" + _WS + r"(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?))"
_BOX_RE = re.compile(r"\[" + _WS + (_WS + "," + _WS).join([_NUM] * 4) + _WS + r"(?:," + _WS + r")?\]", re.ASCII)
_PY_WS = " \t\n\r\f"
MAX_BOX_CHARS = 512  # a 4-number list with 17 significant digits each is < 120 chars; longer is not a box answer


def _literal_to_float(tok):
    """One matched number token -> float, or None where Python itself would refuse it (leading-zero ints)."""
    digits = tok.lstrip("+-").lstrip(_PY_WS)
    is_int = not any(c in digits for c in ".eE")
    if is_int and len(digits) > 1 and digits[0] == "0" and digits.strip("0"):
        return None  # "07" is a SyntaxError in Python 3 ("00" is fine: it is 0)
    sign = -1.0 if tok.startswith("-") else 1.0
    return sign * float(digits)  # float("1e999") = inf, rejected by the range check below


def parse_box(text):
    """The grounding answer -> (x1, y1, x2, y2) floats, or None when it is not exactly one valid box.

    Valid = the whole text (surrounding whitespace aside) is one list of 4 numbers, every value finite and in
    [0, 1], x1 < x2 and y1 < y2 (paper.md §3.3). Ints count ("[0, 0, 1, 1]" is the full image). Never evaluates
    the text; non-str input returns None.
    """
    if not isinstance(text, str) or len(text) > MAX_BOX_CHARS:
        return None
    m = _BOX_RE.fullmatch(text.strip(_PY_WS))
    if m is None:
        return None
    vals = [_literal_to_float(t) for t in m.groups()]
    if any(v is None or not math.isfinite(v) or not 0.0 <= v <= 1.0 for v in vals):
        return None
    x1, y1, x2, y2 = vals
    if not (x1 < x2 and y1 < y2):
        return None
    return (x1, y1, x2, y2)


def box_iou(a, b):
    """Intersection over union of two xyxy boxes (any units, same for both); 0.0 when the union is empty."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def grounding_scores(predictions, gt_boxes, thresholds=(0.5, 0.25)):
    """Score grounding answers. predictions: N strings; gt_boxes: N normalized xyxy boxes in the model's frame.

    Returns a dict (rates in percent): acc@0.5, acc@0.25 (a miss = unparsable or IoU below the threshold, like
    the paper's scorer), mean_iou (unparsable = 0), and the collapse diagnostics of `collapse_diagnostics`.
    """
    if len(predictions) != len(gt_boxes):
        raise ValueError(f"grounding_scores: {len(predictions)} predictions but {len(gt_boxes)} ground-truth boxes")
    boxes = [parse_box(p) for p in predictions]
    ious = [box_iou(b, g) if b is not None else 0.0 for b, g in zip(boxes, gt_boxes)]
    n = max(len(ious), 1)
    out = {f"acc@{t:g}": 100.0 * sum(i >= t for i in ious) / n for t in thresholds}
    out["mean_iou"] = 100.0 * sum(ious) / n
    out.update(collapse_diagnostics(boxes, gt_boxes))
    return out


def _centre_spread(boxes):
    """sqrt(var(cx) + var(cy)) of box centres: 0 when every box sits at the same place."""
    if len(boxes) < 2:
        return 0.0
    cx = [(b[0] + b[2]) / 2 for b in boxes]
    cy = [(b[1] + b[3]) / 2 for b in boxes]
    def var(v):
        mu = sum(v) / len(v)
        return sum((x - mu) ** 2 for x in v) / len(v)
    return math.sqrt(var(cx) + var(cy))


def collapse_diagnostics(boxes, gt_boxes):
    """Localization-collapse indicators (paper.md §4.4), all computed on the parsed boxes (None = parse failure).

    parse_fail    % of answers that are not a valid box
    degenerate    % of parsed boxes that are slivers (width or height < 0.02) or cover >= 90% of the image
    top_box_share % of parsed boxes equal (to 2 decimals) to the single most common box: ~100 = constant output
    centre_spread sqrt(var(cx) + var(cy)) of predicted centres divided by the same for the ground truth:
                  ~1 = predictions move around as much as the targets, ~0 = one fixed spot
    collapsed     1.0 if parse_fail > 50, top_box_share > 50 or centre_spread < 0.25 (with >= 4 parsed boxes),
                  else 0.0: a heuristic flag so a collapsed model is visible at a glance, not a paper metric
    """
    n = max(len(boxes), 1)
    ok = [b for b in boxes if b is not None]
    parse_fail = 100.0 * (len(boxes) - len(ok)) / n
    if ok:
        w_h = [(b[2] - b[0], b[3] - b[1]) for b in ok]
        degenerate = 100.0 * sum(w < 0.02 or h < 0.02 or w * h >= 0.9 for w, h in w_h) / len(ok)
        top = Counter(tuple(round(v, 2) for v in b) for b in ok).most_common(1)[0][1]
        top_share = 100.0 * top / len(ok)
    else:
        degenerate, top_share = 0.0, 0.0
    gt_spread = _centre_spread(list(gt_boxes))
    spread = _centre_spread(ok) / gt_spread if gt_spread > 0 else 0.0
    collapsed = parse_fail > 50 or (len(ok) >= 4 and (top_share > 50 or spread < 0.25))
    return {"parse_fail": parse_fail, "degenerate": degenerate, "top_box_share": top_share,
            "centre_spread": spread, "collapsed": float(collapsed)}


# ----------------------------------------------------------------------------- VQA answers

# The official VQA answer normalization (Cloud-CV VQA-Challenge `vqaEval.py`), tables written out from its spec.
# Common misspellings without the apostrophe -> the spelling the annotations use. Two quirks are kept on purpose
# so scores match the official ones: "somebody'd" maps to "somebodyd", and the capitalised keys (Im, Ive, Id've)
# can never fire because the text is lowercased before the lookup.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": a typo for a look-BEHIND, so in effect it strips every "." that
# is not followed by a digit ("3.5" keeps its point, "dog." loses it). We write that effective behaviour.
_PERIOD = re.compile(r"\.(?!\d)")


def _vqa_punctuation(text):
    """Official processPunctuation: drop punctuation that touches a space (or anywhere if the text holds a
    "1,000"-style number), replace it by a space otherwise; then strip periods not followed by a digit."""
    out = text
    drop_all = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCT:
        if drop_all or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the official call passes re.UNICODE (= 32) as the `count` argument by mistake: at most 32 periods go
    return _PERIOD.sub("", out, count=32)


def _vqa_digits_articles(text):
    """Official processDigitArticle: lowercase, number words -> digits, drop articles, fix contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text):
    """The official normalization applied to a model's answer (newlines/tabs -> spaces, strip, punctuation,
    digits/articles/contractions)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def vqa_accuracy(prediction, answers):
    """VQAv2 soft accuracy of one answer against the human answers (10 for VQAv2), in [0, 1].

    acc = mean over the leave-one-out subsets i of min(#{j != i : answers[j] == pred} / 3, 1), exactly as the
    official scorer: the prediction is always normalized; the human answers (already normalized in the VQAv2
    release) get only the punctuation step, and only when they disagree with each other.
    """
    if isinstance(answers, str) or len(answers) < 2:
        raise ValueError(f"vqa_accuracy: answers must be a list of >= 2 human answers (VQAv2 has 10), got "
                         f"{answers!r}; use exact_match for single-answer sets")
    pred = normalize_vqa_answer(str(prediction))
    gts = [str(a).replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [_vqa_punctuation(a) for a in gts]
    matches = sum(a == pred for a in gts)
    # leaving out answer i removes one match iff answers[i] itself matches
    return sum(min((matches - (a == pred)) / 3.0, 1.0) for a in gts) / len(gts)


def _light_normalize(text):
    """GQA-style answer cleanup (what LLaVA does before the official GQA exact match): lowercase, collapse
    whitespace, drop a trailing period."""
    return " ".join(str(text).lower().split()).rstrip(".").strip()


def exact_match(prediction, answer):
    """GQA-style accuracy of one answer: 1.0 if the cleaned strings are equal, else 0.0."""
    return float(_light_normalize(prediction) == _light_normalize(answer))


def yes_no(text):
    """POPE-style reading of a generated answer (LLaVA's eval_pope rule): 'no' if the first sentence contains
    the word "no" or "not", else 'yes'. (The paper's harness compares Yes/No first-token probabilities instead.)"""
    first = str(text).split(".")[0].replace(",", " ").lower()
    return "no" if {"no", "not"} & set(first.split()) else "yes"


def yes_no_accuracy(prediction, answer):
    """1.0 if yes_no(prediction) equals the yes/no ground truth, else 0.0."""
    gt = _light_normalize(answer)
    if gt not in ("yes", "no"):
        raise ValueError(f"yes_no_accuracy: the ground truth must be 'yes' or 'no', got {answer!r}")
    return float(yes_no(prediction) == gt)


# ----------------------------------------------------------------------------- weighted scores and tables


def weighted_scores(tasks):
    """Weighted VQA / Loc / Overall (paper.md §3.4): the per-benchmark accuracies averaged with the benchmarks'
    example counts as weights. tasks: list of dicts with "kind" ("vqa" or "loc"), "n" (examples) and "acc".
    A group with no examples is None (printed as "-")."""
    def wmean(rows):
        n = sum(r["n"] for r in rows)
        return sum(r["n"] * r["acc"] for r in rows) / n if n else None
    for r in tasks:
        if r["kind"] not in ("vqa", "loc"):
            raise ValueError(f"weighted_scores: task kind must be 'vqa' or 'loc', got {r['kind']!r}")
    return {"w_vqa": wmean([r for r in tasks if r["kind"] == "vqa"]),
            "w_loc": wmean([r for r in tasks if r["kind"] == "loc"]),
            "w_overall": wmean(list(tasks))}


def format_table(rows, columns=None):
    """List of dicts -> a GitHub-markdown table. Columns default to the keys in order of first appearance;
    floats print with 2 decimals, None/missing as "-"."""
    if not rows:
        return ""
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.2f}"
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running a VLM on examples
#
# An "example" is the dict data.shapes_examples() yields, which the real-benchmark loaders below also produce:
#   image     PIL image (or a path, opened lazily)
#   task      "vqa" or "ground"
#   question  the full user message (the grounding prompt already holds the expression)
#   answers   list[str]: VQAv2's 10 human answers, or one answer
#   box       ground only: the ground-truth box in RAW image pixels (x1, y1, x2, y2); we project it into the
#             frame the model saw here, never trust a pre-normalized box
#   expression ground only: the referring expression (for similarity maps)
#   qtype     the per-task group in the shapes world (color, shape, count, exists, left_right, ground)
# optional:
#   bench     the group name (the benchmark) that the per-task table and the weights use; default qtype/task
#   metric    "vqa" (soft accuracy), "exact", "yes_no", "iou@0.5", "iou@0.25"; default: ground -> iou@0.5,
#             vqa -> the VQAv2 soft accuracy when there are >= 2 answers, else exact match

METRICS = ("vqa", "exact", "yes_no", "iou@0.5", "iou@0.25")


def _example_metric(ex):
    m = ex.get("metric")
    if m is None:
        m = "iou@0.5" if ex["task"] == "ground" else ("vqa" if len(ex["answers"]) >= 2 else "exact")
    if m not in METRICS:
        raise ValueError(f"example {ex.get('id')!r}: metric must be one of {METRICS}, got {m!r}")
    return m


def _score_answer(metric, prediction, ex, gt_box):
    if metric == "vqa":
        return vqa_accuracy(prediction, ex["answers"])
    if metric == "exact":
        return exact_match(prediction, ex["answers"][0])
    if metric == "yes_no":
        return yes_no_accuracy(prediction, ex["answers"][0])
    box = parse_box(prediction)
    return float(box is not None and box_iou(box, gt_box) >= float(metric.split("@")[1]))


# ----------------------------------------------------------------------------- similarity maps
#
# The paper shows "token-region similarity maps" (paper.md §5) but never says how they are computed, so this is
# our definition, fixed here so ViT and VMamba runs are compared by the same rule:
#   1. Run the VLM once (teacher forcing, no generation) on [BOS] [P image tokens] [prompt text] with the
#      grounding question, output_hidden_states=True.
#   2. Take ONE LLM layer's hidden states: hidden_states[(n_layers + 1) // 2] by default, the middle of the
#      stack (hidden_states has n_layers + 1 entries, HF-style). Index 0 would be the raw embeddings, where the
#      text tokens have not yet read the image; the last layers specialise in predicting the next token. Both
#      the text and the visual tokens come from that one layer.
#   3. Expression vector = the MEAN of the hidden states of the tokens whose characters overlap the referring
#      expression inside the prompt (found by character offsets; a token that also holds the surrounding quote,
#      like BPE's '"t', counts, since it carries part of the expression).
#   4. Map = cosine similarity between the expression vector and each of the P visual tokens, reshaped to the
#      encoder's h x w grid (row-major, like both encoders emit their tokens).
# Sharpness = the share of the map's mass ABOVE ITS OWN MEAN that falls inside the ground-truth box (each cell
# weighted by the fraction of its area inside the box). Measuring against the map's mean, not against 0, keeps
# the number defined when every cosine is negative (common in a small LLM, where the expression and the patches
# live in different directions): what matters is where the map is relatively high. A map that ignores the image
# scores about the box's area fraction, which we report beside it as the chance level.


def _token_positions(tokenizer, prompt, substring):
    """Indices (in the tokenized prompt) of the tokens overlapping the LAST occurrence of `substring`."""
    start = prompt.rfind(substring)
    if start < 0:
        raise ValueError(f"similarity map: expression {substring!r} not found in the prompt {prompt!r:.120}")
    end = start + len(substring)
    enc = tokenizer.encode(prompt)
    ids, offsets, special = list(enc.ids), list(enc.offsets), list(enc.special_tokens_mask)
    bos = tokenizer.token_to_id("<s>")
    if not ids or ids[0] != bos:  # a tokenizer without Llama's BOS post-processor: add it, as prompt_ids does
        ids, offsets, special = [bos] + ids, [(0, 0)] + offsets, [1] + special
    pos = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start and special[i] == 0]
    if not pos:
        raise ValueError(f"similarity map: no token of the prompt covers {substring!r}")
    return ids, pos


@torch.no_grad()
def similarity_map(vlm, tokenizer, pixel_values, question, expression, layer=None, system=None):
    """Cosine-similarity map (h, w) between the expression and every visual token (definition above).

    pixel_values: (3, S, S) as the model sees it; system: the run's system prompt (system_prompt(cfg)). Returns a
    float32 CPU tensor (h, w) in [-1, 1].
    """
    import llm as llm_lib
    prompt = llm_lib.prompt_text(question, llm_lib.SYSTEM_PROMPT if system is None else system)
    ids, pos = _token_positions(tokenizer, prompt, expression)
    dev = next(vlm.parameters()).device
    x = pixel_values[None].to(dev)                                             # (1, 3, S, S)
    out = vlm(x, torch.tensor([ids], device=dev), output_hidden_states=True)
    hs = out["hidden_states"]
    layer = len(hs) // 2 if layer is None else layer
    if not -len(hs) <= layer < len(hs):
        raise ValueError(f"similarity map: layer {layer} out of range for {len(hs)} hidden states")
    h_all = hs[layer][0].float()                                               # (T, D)
    sl = out["image_slice"]
    img = h_all[sl]                                                            # (P, D)
    P = img.shape[0]
    # text token i of the prompt sits at i in the spliced sequence if it comes before the image (only BOS),
    # else at i + P: the P image tokens were inserted right after BOS (paper.md §1.7)
    text_pos = [i if i < sl.start else i + P for i in pos]
    expr = h_all[text_pos].mean(0)                                             # (D,)
    sim = torch.nn.functional.cosine_similarity(img, expr[None], dim=-1)      # (P,)
    S_h, S_w = pixel_values.shape[-2:]
    stride = math.sqrt(S_h * S_w / P)
    h, w = round(S_h / stride), round(S_w / stride)
    if h * w != P:
        raise ValueError(f"similarity map: {P} visual tokens do not form a grid for a {S_h}x{S_w} image")
    return sim.view(h, w).cpu()                                                # (h, w)


def mass_in_box(sim, box):
    """Share of an (h, w) map's mass above its mean that lies inside a normalized xyxy box (0 for a flat map)."""
    h, w = sim.shape
    pos = (sim.double() - sim.double().mean()).clamp(min=0)                   # (h, w) excess over the mean
    ys = torch.arange(h, dtype=torch.float64)
    xs = torch.arange(w, dtype=torch.float64)
    # fraction of each cell's extent inside the box, per axis; the cell (i, j) covers [j/w, (j+1)/w] x [i/h, ...]
    fx = ((torch.clamp(xs + 1, max=box[2] * w) - torch.clamp(xs, min=box[0] * w)).clamp(min=0, max=1))  # (w,)
    fy = ((torch.clamp(ys + 1, max=box[3] * h) - torch.clamp(ys, min=box[1] * h)).clamp(min=0, max=1))  # (h,)
    total = pos.sum()
    return float((pos * fy[:, None] * fx[None, :]).sum() / total) if total > 0 else 0.0


# A perceptually ordered dark -> bright colour ramp (anchor colours, linearly interpolated), so that "more
# similar" always reads as "brighter" without matplotlib.
_RAMP = [(0, 0, 4), (60, 15, 110), (150, 40, 120), (230, 90, 80), (252, 180, 60), (252, 253, 191)]


def _colorize(v):
    """(h, w) values in [0, 1] -> (h, w, 3) uint8 through _RAMP."""
    import numpy as np
    ramp = np.array(_RAMP, dtype=np.float32)                                   # (K, 3)
    t = np.clip(v, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_RAMP) - 2)
    f = (t - lo)[..., None]
    return (ramp[lo] * (1 - f) + ramp[lo + 1] * f).astype(np.uint8)


def to_pil(pixel_values, mean, std):
    """Undo the normalization of a (3, S, S) tensor -> PIL RGB image of what the encoder saw."""
    import numpy as np
    from PIL import Image
    x = pixel_values.float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    x = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()          # (S, S, 3)
    return Image.fromarray(np.ascontiguousarray(x), "RGB")


def draw_map_panel(image, sim=None, gt_box=None, pred_box=None, title="", size=256):
    """One panel: the model-frame image, the similarity map blended over it (if given, min-max scaled per map),
    the ground-truth box in green and the predicted box in red, a title line on top."""
    import numpy as np
    from PIL import Image, ImageDraw
    base = image.convert("RGB").resize((size, size), Image.BICUBIC)
    if sim is not None:
        s = sim.float().numpy()
        v = (s - s.min()) / (s.max() - s.min() + 1e-8)
        heat = Image.fromarray(_colorize(v), "RGB").resize((size, size), Image.NEAREST)  # one block per token
        base = Image.blend(base, heat, 0.55)
    panel = Image.new("RGB", (size, size + 16), (255, 255, 255))
    panel.paste(base, (0, 16))
    d = ImageDraw.Draw(panel)
    d.text((3, 2), title[:42], fill=(0, 0, 0))
    for box, colour in ((gt_box, (0, 220, 0)), (pred_box, (255, 30, 30))):
        if box is not None:
            x1, y1, x2, y2 = (float(c) * size for c in box)
            d.rectangle([x1, y1 + 16, x2, y2 + 16], outline=colour, width=2)
    return panel


def side_by_side(panels):
    """Concatenate panels horizontally with a 4-pixel white gap."""
    from PIL import Image
    W = sum(p.width for p in panels) + 4 * (len(panels) - 1)
    out = Image.new("RGB", (W, max(p.height for p in panels)), (255, 255, 255))
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + 4
    return out


# ----------------------------------------------------------------------------- evaluate

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_settings(cfg):
    """A run's config dict -> (geometry, image_size, mean, std): how that run's encoder saw its images."""
    geometry = cfg.get("geometry", "letterbox")
    size = int(cfg.get("image_size", 128))
    mean = tuple(cfg.get("image_mean", cfg.get("mean", IMAGENET_MEAN)))
    std = tuple(cfg.get("image_std", cfg.get("std", IMAGENET_STD)))
    return geometry, size, mean, std


def _open_image(img):
    from PIL import Image
    if isinstance(img, str):
        with Image.open(img) as im:
            return im.convert("RGB")
    return img


def system_prompt(cfg):
    """The system prompt a run was trained with (config.json; runs from before the key: Vicuna's)."""
    import llm as llm_lib
    return cfg.get("system_prompt", llm_lib.SYSTEM_PROMPT)


def prompt_ids(tokenizer, question, system=None):
    """The single-turn Vicuna prompt for `question` -> token ids with exactly one BOS first. system: the run's
    system prompt (system_prompt(cfg)); None = Vicuna v1.5's."""
    import llm as llm_lib
    ids = list(tokenizer.encode(llm_lib.prompt_text(question, llm_lib.SYSTEM_PROMPT if system is None
                                                    else system)).ids)
    bos = tokenizer.token_to_id("<s>")
    if bos is None:
        raise ValueError("the tokenizer has no '<s>' token")
    return ids if ids and ids[0] == bos else [bos] + ids


@torch.no_grad()
def generate_answers(vlm, tokenizer, cfg, examples, batch_size=16, max_new_tokens=48, progress=True, desc="eval"):
    """Greedy answers (strings) for the examples, in order, plus each example's preprocessing frame.

    Prompts are sorted by length and LEFT-padded per batch (connector.VLM.generate splices the image after each
    row's first real token, so padding does not change the answer)."""
    import data
    from tqdm import tqdm
    geometry, size, mean, std = image_settings(cfg)
    dev = next(vlm.parameters()).device
    eos = tokenizer.token_to_id("</s>")
    pad = tokenizer.token_to_id("<pad>")
    pad = eos if pad is None else pad
    system = system_prompt(cfg)
    ids = [prompt_ids(tokenizer, ex["question"], system) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(ids[i]))
    answers, frames = [None] * len(examples), [None] * len(examples)
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, leave=False)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        pix = []
        for i in idx:
            x, frames[i] = data.preprocess(_open_image(examples[i]["image"]), geometry, size, mean, std)
            pix.append(x)
        T = max(len(ids[i]) for i in idx)
        inp = torch.full((len(idx), T), pad, dtype=torch.long)                 # (B, T) left-padded
        mask = torch.zeros((len(idx), T), dtype=torch.long)                    # (B, T)
        for r, i in enumerate(idx):
            inp[r, T - len(ids[i]):] = torch.tensor(ids[i])
            mask[r, T - len(ids[i]):] = 1
        new = vlm.generate(torch.stack(pix).to(dev), inp.to(dev), mask.to(dev),
                           max_new_tokens=max_new_tokens, eos_token_id=eos)   # (B, T_new)
        for r, i in enumerate(idx):
            row = new[r].tolist()
            row = row[:row.index(eos)] if eos in row else row
            answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    return answers, frames


def _group(ex):
    return ex.get("bench") or ex.get("qtype") or ex["task"]


def evaluate(vlm, tokenizer, cfg, examples, batch_size=16, max_new_tokens=48, progress=True,
             return_predictions=False):
    """Generate an answer for every example and score it. Returns a JSON-able dict (rates in percent):

    w_vqa, w_loc, w_overall   weighted VQA / Loc / Overall (weights = example counts per task, paper.md §3.4)
    vqa_acc                   = w_vqa (the mean over all VQA examples)
    acc@0.5, acc@0.25, mean_iou  over all grounding examples, GT projected into the frame the model saw
    parse_fail, degenerate, top_box_share, centre_spread, collapsed   localization-collapse diagnostics
    n_vqa, n_ground           example counts
    tasks                     [{task, kind, metric, n, acc}] one row per task (benchmark or shapes qtype)
    by_objects                (shapes world) [{task, n_objects, n, acc}]: each task split by the number of objects
                              in the scene; a lookup that fails only with 2-3 objects is a binding failure
    wrong_object              (shapes world) % of grounding answers in scenes of 2+ objects that box ANOTHER object
                              of the scene (IoU >= 0.5 with it, < 0.5 with the target): found an object, not the one
                              named. The rest of the misses box nothing.
    predictions               (with return_predictions) [{id, task, question, prediction, answers|gt_box, score}]
    """
    import data
    if not examples:
        raise ValueError("evaluate: no examples")
    vlm.eval()
    answers, frames = generate_answers(vlm, tokenizer, cfg, examples, batch_size, max_new_tokens, progress)
    groups, preds, g_pred, g_gt = {}, [], [], []
    by_n, wrong, multi = {}, 0, 0  # (task, n_objects) -> [n, sum]; grounding answers on another object
    for ex, ans, frame in zip(examples, answers, frames):
        metric = _example_metric(ex)
        gt_box = data.project_box(ex["box"], frame) if ex["task"] == "ground" else None
        score = _score_answer(metric, ans, ex, gt_box)
        g = groups.setdefault(_group(ex), {"task": _group(ex), "kind": "loc" if ex["task"] == "ground" else "vqa",
                                           "metric": metric, "n": 0, "sum": 0.0})
        g["n"] += 1
        g["sum"] += score
        if "n_objects" in ex:
            b = by_n.setdefault((_group(ex), ex["n_objects"]), [0, 0.0])
            b[0] += 1
            b[1] += score
        if ex.get("others"):
            multi += 1
            box = parse_box(ans) if score == 0 else None  # only a miss can be on the wrong object
            wrong += box is not None and any(box_iou(box, data.project_box(o, frame)) >= 0.5 for o in ex["others"])
        if ex["task"] == "ground":
            g_pred.append(ans)
            g_gt.append(gt_box)
        if return_predictions:
            rec = dict(id=ex.get("id"), task=_group(ex), question=ex["question"], prediction=ans, score=score)
            if gt_box is not None:
                rec["gt_box"] = [round(v, 4) for v in gt_box]
            else:
                rec["answers"] = ex["answers"]
            preds.append(rec)
    tasks = [dict(task=g["task"], kind=g["kind"], metric=g["metric"], n=g["n"], acc=100.0 * g["sum"] / g["n"])
             for g in groups.values()]
    out = weighted_scores(tasks)
    out["vqa_acc"] = out["w_vqa"]
    out["n_vqa"] = sum(t["n"] for t in tasks if t["kind"] == "vqa")
    out["n_ground"] = len(g_gt)
    if g_gt:
        out.update(grounding_scores(g_pred, g_gt))
    out["tasks"] = tasks
    if by_n:
        out["by_objects"] = [dict(task=t, n_objects=k, n=n, acc=100.0 * v / n)
                             for (t, k), (n, v) in sorted(by_n.items())]
    if multi:
        out["wrong_object"] = 100.0 * wrong / multi
    if return_predictions:
        out["predictions"] = preds
    return out


def objects_table(res):
    """evaluate()'s by_objects -> a markdown table: one row per task, one column per number of objects in the
    scene, cells "accuracy (n)"; grounding's row ends with the wrong-object rate. "" without by_objects."""
    if not res.get("by_objects"):
        return ""
    counts = sorted({r["n_objects"] for r in res["by_objects"]})
    rows = {}
    for r in res["by_objects"]:
        row = rows.setdefault(r["task"], {"task": r["task"]})
        row[f"{r['n_objects']} obj"] = f"{r['acc']:.1f} ({r['n']})"
    if "ground" in rows and "wrong_object" in res:
        rows["ground"]["wrong object"] = f"{res['wrong_object']:.1f}"
    return format_table(list(rows.values()), ["task"] + [f"{k} obj" for k in counts] +
                        (["wrong object"] if "wrong_object" in res else []))


# ----------------------------------------------------------------------------- real benchmarks
#
# `--bench NAME=FILE` (repeatable). NAME is a key of BENCHMARKS, optionally with a split label after a slash
# ("pope/adversarial", "refcoco/val"): the key picks the metric, the full name labels the row. FILE is a JSON
# list or a JSONL file (one object per line) of records; image paths are relative to --image-root (default: the
# file's folder). Accepted records:
#
#   VQA-style (vqav2, gqa, pope)
#     {"image": "COCO_val2014_000000000042.jpg", "question": "What is on the table?",   ("text" also accepted)
#      "answers": ["cup", "cup", "mug", ...]}      VQAv2: the 10 human answers (strings, or VQAv2's
#                                                   [{"answer": "cup", ...}, ...] dicts); vqav2 requires >= 2
#     {"image": ..., "question": ..., "answer": "yes"}   GQA / POPE: one answer
#   RefCOCO-style (refcoco, refcoco+, refcocog, ocidref)
#     {"image": ..., "expression": "the man in red",  ("sentence" also accepted)
#      "bbox": [x, y, w, h]}                        COCO pixel xywh of the RAW image ("box": [x1, y1, x2, y2] also)
#   LLaVA format, for any benchmark
#     {"image": ..., "conversations": [{"from": "human", "value": "<image>\nQUESTION"},
#                                      {"from": "gpt", "value": "ANSWER"}]}
#     The first human/gpt pair is used ("<image>" removed). For grounding without "bbox"/"box", the gpt answer
#     is read as LLaVA v1.5 writes boxes: normalized to the raw image padded to a CENTERED square (paper.md §3.3,
#     LLaVA #606), converted back to pixels and then projected into the evaluated model's own frame.
#
# VQA questions get the paper's suffix "\nAnswer the question using a single word or phrase." unless they
# already end with it; grounding expressions go into the paper's box prompt (data.GROUND_PROMPT).

VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
BENCHMARKS = {  # key -> (task, metric)     paper.md §3.2
    "vqav2": ("vqa", "vqa"),
    "gqa": ("vqa", "exact"),
    "pope": ("vqa", "yes_no"),
    "refcoco": ("ground", "iou@0.5"),
    "refcoco+": ("ground", "iou@0.5"),
    "refcocog": ("ground", "iou@0.5"),
    "ocidref": ("ground", "iou@0.25"),
}


def _read_records(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--bench {path}: no such file")
    with open(path) as f:
        text = f.read()
    if path.endswith(".jsonl"):
        records = []
        for ln, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"--bench {path}: line {ln}: malformed JSON ({e.msg})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--bench {path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(records, list):
        raise ValueError(f"--bench {path}: expected a JSON list of records (or a .jsonl file), got "
                         f"{type(records).__name__}")
    return records


def _pixel_box(v, where, xywh):
    if not (isinstance(v, (list, tuple)) and len(v) == 4
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in v)):
        raise ValueError(f"{where}: box must be 4 numbers, got {v!r:.80}")
    x1, y1, a, b = (float(c) for c in v)
    x2, y2 = (x1 + a, y1 + b) if xywh else (a, b)
    if not all(math.isfinite(c) for c in (x1, y1, x2, y2)) or not (x2 > x1 and y2 > y1):
        raise ValueError(f"{where}: box {v!r} is empty or not finite")
    return (x1, y1, x2, y2)


def load_benchmark(name, path, image_root=None):
    """One benchmark file -> list of examples (the dict evaluate() takes). See the formats above."""
    from PIL import Image
    import data
    key = name.split("/")[0]
    if key not in BENCHMARKS:
        raise KeyError(f"--bench {name}: unknown benchmark {key!r}; valid: {sorted(BENCHMARKS)}")
    task, metric = BENCHMARKS[key]
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    out = []
    for i, r in enumerate(_read_records(path)):
        where = f"--bench {name}={path}: record {i}"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected an object, got {type(r).__name__}")
        if not isinstance(r.get("image"), str):
            raise ValueError(f"{where}: 'image' must be a path string, got {r.get('image')!r:.60}")
        image = os.path.join(root, r["image"])
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{where}: image not found: {image}")
        question, answer = r.get("question", r.get("text")), None
        if "conversations" in r:
            conv = r["conversations"]
            if not (isinstance(conv, list) and len(conv) >= 2 and all(isinstance(t, dict) for t in conv[:2])
                    and conv[0].get("from") == "human" and conv[1].get("from") == "gpt"
                    and isinstance(conv[0].get("value"), str) and isinstance(conv[1].get("value"), str)):
                raise ValueError(f"{where}: 'conversations' must start with a human turn and a gpt turn, "
                                 f"each {{'from': ..., 'value': str}}")
            question, answer = conv[0]["value"].replace("<image>", "").strip(), conv[1]["value"].strip()
        ex = dict(image=image, task=task, metric=metric, bench=name, id=r.get("question_id", r.get("id", i)))
        if task == "vqa":
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{where}: needs a 'question' (or 'text' or 'conversations') string")
            answers = r.get("answers", [r["answer"]] if "answer" in r else [answer] if answer is not None else None)
            if isinstance(answers, list):
                answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"{where}: needs 'answers' (list of strings) or 'answer' (string)")
            if metric == "vqa" and len(answers) < 2:
                raise ValueError(f"{where}: {key} is scored with the VQAv2 soft accuracy and needs the human "
                                 f"answers in 'answers' (10 in VQAv2), got {len(answers)}")
            ex.update(question=question if question.endswith(VQA_SUFFIX) else question.rstrip() + VQA_SUFFIX,
                      answers=answers, qtype=key)
        else:
            expr = r.get("expression", r.get("sentence"))
            if "bbox" in r or "box" in r:
                box = _pixel_box(r.get("bbox", r.get("box")), where, xywh="bbox" in r)
            elif answer is not None:
                nb = parse_box(answer)
                if nb is None:
                    raise ValueError(f"{where}: no 'bbox' and the gpt answer {answer!r:.60} is not a valid box")
                with Image.open(image) as im:
                    W, H = im.size
                m = max(W, H)
                px, py = int((m - W) / 2), int((m - H) / 2)       # LLaVA's centered-square padding
                box = (nb[0] * m - px, nb[1] * m - py, nb[2] * m - px, nb[3] * m - py)
            else:
                raise ValueError(f"{where}: needs 'bbox' [x, y, w, h] or 'box' [x1, y1, x2, y2] in pixels, or a "
                                 f"LLaVA 'conversations' answer")
            if question is None:
                if not isinstance(expr, str) or not expr.strip():
                    raise ValueError(f"{where}: needs an 'expression' (or 'sentence') string")
                question = data.GROUND_PROMPT.format(expr.strip())
            if expr is None:  # for similarity maps only: the quoted expression, else what follows the last ":"
                q = re.findall(r'"([^"]+)"', question)
                expr = q[-1] if q else (question.rsplit(":", 1)[-1].strip() or None if ":" in question else None)
            ex.update(question=question, answers=[], box=box, expression=expr, qtype=key)
        out.append(ex)
    if not out:
        raise ValueError(f"--bench {name}={path}: no records")
    return out


# ----------------------------------------------------------------------------- maps over a set of examples


def map_sharpness(vlm, tokenizer, cfg, examples, layer=None, keep=0):
    """Similarity maps for the grounding examples that name an expression. Returns (mean mass_in_box in %,
    mean GT-box area in % (the chance level), list of the first `keep` (example, image PIL, sim, gt_box))."""
    import data
    geometry, size, mean, std = image_settings(cfg)
    masses, areas, kept = [], [], []
    system = system_prompt(cfg)
    for ex in examples:
        if ex["task"] != "ground" or not ex.get("expression"):
            continue
        x, frame = data.preprocess(_open_image(ex["image"]), geometry, size, mean, std)
        gt = data.project_box(ex["box"], frame)
        sim = similarity_map(vlm, tokenizer, x, ex["question"], ex["expression"], layer, system)
        masses.append(mass_in_box(sim, gt))
        areas.append((gt[2] - gt[0]) * (gt[3] - gt[1]))
        if len(kept) < keep:
            kept.append((ex, to_pil(x, mean, std), sim, gt))
    if not masses:
        return None, None, kept
    return 100.0 * sum(masses) / len(masses), 100.0 * sum(areas) / len(areas), kept


def save_maps(out_dir, per_run):
    """per_run: [(run name, kept list from map_sharpness, {example id: predicted answer})]. Writes one PNG per
    example: the plain image with its GT box, then each run's similarity map side by side (same examples)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    n = min(len(k) for _, k, _ in per_run) if per_run else 0
    for j in range(n):
        ex, img0, _, gt0 = per_run[0][1][j]
        panels = [draw_map_panel(img0, None, gt0, None, title=ex["expression"])]
        for name, kept, preds in per_run:
            _, img, sim, gt = kept[j]
            title = f"{name}: in-box {mass_in_box(sim, gt):.2f}"
            panels.append(draw_map_panel(img, sim, gt, parse_box(preds.get(str(ex.get("id")), "")), title=title))
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{j:03d}_{ex.get('id', j)}")[:80]
        path = os.path.join(out_dir, slug + ".png")
        side_by_side(panels).save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- command line

SUMMARY_COLUMNS = ["run", "encoder", "geometry", "connector", "w_vqa", "w_loc", "w_overall", "acc@0.5",
                   "acc@0.25", "mean_iou", "parse_fail", "degenerate", "top_box_share", "centre_spread",
                   "collapsed", "map_in_box", "map_chance"]


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate trained runs (train.py run directories) and print one "
                                            "markdown comparison table.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by train.py")
    p.add_argument("--split", default="test", help="shapes-world split (default: test, never trained on)")
    p.add_argument("--n", type=int, default=None, help="number of shapes-world scenes (2 examples each; default all)")
    p.add_argument("--bench", action="append", default=[], metavar="NAME=FILE",
                   help=f"real-benchmark file instead of the shapes world; NAME in {sorted(BENCHMARKS)} "
                        "(optionally NAME/split); repeatable")
    p.add_argument("--image-root", default=None, help="folder the benchmark image paths are relative to")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48, help="the paper's harness uses 128")
    p.add_argument("--device", default="cpu")
    p.add_argument("--save-maps", default=None, metavar="DIR", help="write similarity-map PNGs here")
    p.add_argument("--n-maps", type=int, default=8, help="PNGs to write with --save-maps")
    p.add_argument("--map-examples", type=int, default=50, help="grounding examples the map sharpness averages")
    p.add_argument("--map-layer", type=int, default=None,
                   help="LLM hidden-state index for the maps (default: the middle, (n_layers + 1) // 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest for the toy models "
                                                              "on a busy machine)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every number (and answers) as JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        sys.exit(f"eval.py: error: {msg}")


def _run(args):
    import connector
    import data
    if args.threads:
        torch.set_num_threads(args.threads)
    for d in args.runs:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"run directory {d} not found")
    if args.bench:
        examples = []
        for spec in args.bench:
            if "=" not in spec:
                raise ValueError(f"--bench {spec}: expected NAME=FILE")
            name, path = spec.split("=", 1)
            examples += load_benchmark(name, path, args.image_root)
    else:
        examples = data.shapes_examples(args.split, n=args.n)
    rows, task_rows, per_run, dump = [], {}, [], {}
    for d in args.runs:
        name = os.path.basename(os.path.normpath(d))
        vlm, tok, cfg = connector.load_run(d, device=args.device)
        res = evaluate(vlm, tok, cfg, examples, args.batch_size, args.max_new_tokens,
                       progress=not args.no_progress, return_predictions=True)
        keep = args.n_maps if args.save_maps else 0
        ground = [e for e in examples if e["task"] == "ground"][:max(args.map_examples, keep)]
        res["map_in_box"], res["map_chance"], kept = map_sharpness(vlm, tok, cfg, ground, args.map_layer, keep)
        geometry = image_settings(cfg)[0]
        rows.append(dict(run=name, encoder=cfg.get("encoder"), geometry=geometry, connector=cfg.get("connector"),
                         **{k: res.get(k) for k in SUMMARY_COLUMNS[4:]}))
        for t in res["tasks"]:
            task_rows.setdefault(t["task"], {"task": t["task"], "kind": t["kind"], "metric": t["metric"],
                                             "n": t["n"]})[name] = t["acc"]
        per_run.append((name, kept, {str(p["id"]): p["prediction"] for p in res["predictions"]}))
        dump[name] = res
        del vlm
    print(format_table(rows, SUMMARY_COLUMNS))
    print()
    print(format_table(sorted(task_rows.values(), key=lambda r: r["kind"] != "vqa")))  # VQA tasks first
    for name, res in dump.items():
        if res.get("by_objects"):
            print(f"\n{name}: accuracy by the number of objects in the scene (n examples)\n{objects_table(res)}")
    if args.save_maps:
        paths = save_maps(args.save_maps, per_run)
        print(f"\nwrote {len(paths)} similarity-map PNGs to {args.save_maps}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
