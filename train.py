"""
Train the VLM: frozen encoder (ViT or VMamba) -> MLP connector -> Llama, the paper's single-stage "no-align" recipe.

    python train.py --encoder vmamba          # CPU default: shapes world, toy models, minutes (see README)
    python train.py --encoder vit             # the same with the matched ViT
    python train.py --encoder vmamba --resume # continue runs/vmamba from its last checkpoint, bit-exactly
    # paper scale, 8 GPUs (bf16 autocast, FSDP2 fully_shard, activation checkpointing on the LLM layers):
    torchrun --nproc_per_node=8 train.py --encoder vmamba --encoder-preset vmambav2_small_224 \
        --encoder-ckpt vssm_small_0229_ckpt_epoch_222.pth --llm vicuna-7b-v1.5/ --image-size 224 \
        --data llava_v1_5_mix665k.json --image-root data/ --epochs 1 --batch 16 --global-batch 128 --lr 2e-5

What happens, in order (one straight-line `main`):
1. the tokenizer and the LLM: `--llm DIR` (HF format) or the toy Llama with a BPE fitted to the shapes world (each
   box value "0.0" ... "1.0" one token, --coord-tokens);
2. the frozen encoder: `--encoder-ckpt FILE` (official container) or the matched pretraining on the shapes world's
   pretraining split (dense classification + box regression by default, see pretrain_encoder; same recipe and
   step budget for both encoders; cached under runs/encoders/);
3. the data: `--data FILE` (LLaVA JSON) or the shapes world's fixed train split (multi-turn conversations);
4. frozen-encoder features cached in memory when every image is seen more than once (epochs > 1) and they fit;
5. AdamW (wd 0.1, none on <=1-D params), linear warmup 3% + cosine decay, clip 1.0, grad accumulation, bf16
   autocast on GPU; FSDP2 under torchrun; checkpoints every --ckpt-every steps, written atomically;
6. model.safetensors + config.json + tokenizer.json + log.jsonl + loss.png, then the held-out test-split table.

Recipe (paper.md §2): lr 2e-5, global batch 128, 1 epoch for Vicuna-7B. The toy LLM starts from random weights,
so its defaults (lr 1e-3, batch 16, 18 epochs of the 2400 train scenes, up to 6 questions per conversation) are
tuned for that scale and a 10-minute CPU budget, and it trains without Vicuna's system prompt, with a loss on the
questions too, with the turns hidden from each other and with one token per box value (--system-prompt,
--question-loss, --isolate-turns, --coord-tokens; their auto defaults keep Vicuna's recipe and tokenizer whenever
--llm is given); everything else is the paper's.

Glossary: B micro-batch, T text tokens, P image tokens, C encoder width, D LLM width, G global batch (samples per
optimizer step) = B * accum * world_size.
"""
import argparse
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from connector import (DEFAULT_TAP, IGNORE_INDEX, VLM, build_encoder, check_state_dict)

MEANS = {"vmamba": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet mean/std (VMamba-cls)
         "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}                  # AugReg ViT (paper.md §1.3: believed 0.5/0.5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--encoder", choices=("vit", "vmamba"), default="vmamba")
    a("--encoder-preset", default="toy", help="a key of vit.CONFIGS / vmamba.CONFIGS")
    a("--encoder-ckpt", default=None, help="official encoder checkpoint (.pth {'model': sd} / .safetensors)")
    a("--tap", type=int, default=None, help="ViT block (default -2) / VMamba stage (default 3)")
    a("--connector", choices=("mlp2x_gelu", "mlp3x_gelu"), default="mlp2x_gelu")
    a("--geometry", choices=data.GEOMETRIES, default="letterbox")
    a("--image-size", type=int, default=128)
    a("--llm", default=None, help="HF-format Llama/Vicuna directory (default: the toy Llama, random init)")
    a("--data", default=None, help="LLaVA-format JSON (default: the shapes world)")
    a("--image-root", default=None, help="folder the JSON's image paths are relative to (default: its folder)")
    a("--skip-missing-images", action="store_true", help="skip (and count) entries whose image is missing")
    a("--out", default=None, help="run directory (default runs/<encoder>)")
    a("--seed", type=int, default=0)
    a("--epochs", type=float, default=18.0)
    a("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    a("--batch", type=int, default=16, help="micro-batch per process")
    a("--accum", type=int, default=1, help="gradient accumulation steps")
    a("--global-batch", type=int, default=None, help="derive --accum from this (= batch * accum * world)")
    a("--lr", type=float, default=1e-3)
    a("--weight-decay", type=float, default=0.1)
    a("--warmup", type=float, default=0.03, help="warmup fraction of the steps")
    a("--clip", type=float, default=1.0)
    a("--max-len", type=int, default=2048, help="text tokens per sample (image tokens come on top)")
    a("--turns", type=int, default=6, help="shapes world: at most this many questions per training conversation")
    a("--system-prompt", choices=("auto", "vicuna", "none"), default="auto",
      help="vicuna: v1.5's system prompt before the first USER; auto = vicuna with --llm, none for the toy LLM")
    a("--question-loss", type=float, default=None, metavar="W",
      help="add W x the mean next-token loss on the user turns to the answers' mean (default: 1 for the toy LLM, "
           "0 with --llm)")
    a("--isolate-turns", choices=("auto", "on", "off"), default="auto",
      help="on: each turn sees the image (and system prompt) but not the other turns, i.e. single-turn samples "
           "sharing an image; auto = on for the shapes world, off for --data")
    a("--coord-tokens", choices=("auto", "on", "off"), default="auto",
      help="toy tokenizer: on = each box value 0.0 ... 1.0 is one token; off = digit by digit, as Llama's tokenizer "
           "writes them; auto = on for the toy LLM, off with --llm (its own tokenizer)")
    a("--train-images", type=int, default=None, help="shapes world: train scenes (default: the world's)")
    a("--eval-images", type=int, default=100, help="shapes world: test scenes scored at the end (0 = no eval)")
    a("--pretrain-steps", type=int, default=600, help="matched encoder pretraining steps (0 = random frozen)")
    a("--pretrain-batch", type=int, default=16)
    a("--pretrain-size", type=int, default=None, help="pretraining image size (default --image-size)")
    a("--pretrain-lr", type=float, default=2e-3)
    a("--pretrain-objective", choices=("detect", "patch", "image"), default="detect",
      help="dense class + box, dense class, or image-level class (see pretrain_encoder)")
    a("--cache-features", choices=("auto", "on", "off"), default="auto")
    a("--ckpt-every", type=int, default=50)
    a("--resume", action="store_true")
    a("--act-ckpt", choices=("auto", "on", "off"), default="auto", help="activation checkpointing of LLM layers")
    a("--device", default=None)
    a("--threads", type=int, default=None, help="torch CPU threads")
    a("--debug-nan-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests the NaN guard
    args = p.parse_args(argv)
    args.pretrain_size = args.pretrain_size or args.image_size  # resolved once: pretraining and its cache name
    # The toy LLM starts from random weights, and four things set it apart from Vicuna (README, "train"): no system
    # prompt (30 constant tokens before each question delay learning to find the named object), a language-model
    # loss on the questions too, isolated turns (no earlier turn to copy from or to confuse with the current one),
    # and coordinate tokens in its tokenizer (a box is four choices of a value, not four chains of digits).
    toy = args.llm is None
    if args.system_prompt == "auto":
        args.system_prompt = "none" if toy else "vicuna"
    if args.question_loss is None:
        args.question_loss = 1.0 if toy else 0.0
    if args.question_loss < 0:
        p.error(f"--question-loss must be >= 0, got {args.question_loss}")
    if args.isolate_turns == "auto":
        args.isolate_turns = "off" if args.data else "on"
    if args.coord_tokens == "auto":
        args.coord_tokens = "on" if toy else "off"
    if not toy and args.coord_tokens == "on":
        p.error("--coord-tokens on: --llm uses the model's own tokenizer, which has no coordinate tokens")
    return args


class TrainError(Exception):
    """A bad input or a failed run: main() prints the one-line message and exits with status 1."""


# ----------------------------------------------------------------------------- small helpers


def print0(*a, **k):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, **k, flush=True)


def lr_factor(step, total, warmup):
    """HF get_cosine_schedule_with_warmup: linear 0 -> 1 over `warmup` steps, then cosine 1 -> 0."""
    if step < warmup:
        return step / max(1, warmup)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def atomic_write(path, write):
    """write(tmp_path) then os.replace: readers see the old file or the new one, never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_safetensors(sd, path):
    from safetensors.torch import save_file
    # clone: safetensors refuses tensors that share storage (tied embeddings), and we want plain CPU copies
    atomic_write(path, lambda t: save_file({k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}, t))


def save_json(obj, path):
    def w(t):
        with open(t, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, w)


def draw_loss_png(losses, path, title):
    """A loss curve with Pillow (matplotlib is not a dependency): raw loss in grey, a running mean in blue."""
    from PIL import Image, ImageDraw
    W, H, m = 640, 360, 48
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    if len(losses) >= 2:
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1.0
        sx = lambda i: m + (W - 2 * m) * i / (len(losses) - 1)
        sy = lambda v: H - m - (H - 2 * m) * (v - lo) / (hi - lo)
        d.line([(sx(i), sy(v)) for i, v in enumerate(losses)], fill=(190, 190, 190), width=1)
        ema, sm = losses[0], []
        for v in losses:
            ema = 0.9 * ema + 0.1 * v
            sm.append(ema)
        d.line([(sx(i), sy(v)) for i, v in enumerate(sm)], fill=(30, 80, 200), width=2)
        for v in (lo, (lo + hi) / 2, hi):
            d.text((4, sy(v) - 6), f"{v:.3g}", fill="black")
        d.text((W - m - 60, H - m + 8), f"step {len(losses)}", fill="black")
    d.rectangle([m, m, W - m, H - m], outline="black")
    d.text((m, 16), title, fill="black")
    atomic_write(path, lambda t: img.save(t, format="PNG"))


# ----------------------------------------------------------------------------- matched encoder pretraining


def pretrain_encoder(kind, preset, args, path):
    """The toy stand-in for the encoders' own pretraining, on the shapes world's pretraining split (scenes disjoint
    from the VLM's train/val/test). ViT and VMamba get the same data, objective, steps, batch, image size,
    optimizer and seed, so the VLM comparison stays controlled. Saved in the official container {"model": sd}.

    objective "detect" (default): at every token of the VLM's tap, classify the object under it (or background)
    and regress that object's box (L1, normalized x1 y1 x2 y2), with a linear head thrown away afterwards: the toy
    counterpart of the paper's detection-pretrained encoders (IN1K -> COCO, paper.md §4.2), dense supervision that
    leaves features saying what is where. "patch": the classification half alone. "image": classify the one
    object of a single-object image (colour x shape) with the model's own head, the ImageNet-1K analogue.
    Why dense is the default: at this budget (a VMamba step costs about a second on a 2-core CPU) the image-level
    objective stays near chance and leaves the tap features almost uninformative (a frozen random encoder, in
    effect), while dense supervision gives 64 labels per image. The box half is what lets a VLM answer where:
    without it, shape, left/right and grounding stay near chance in the toy VLM (README, "train")."""
    world = data.CONFIGS["toy"]
    mean, std = MEANS[kind]
    torch.manual_seed(args.seed)
    enc = build_encoder(kind, preset)
    tap = DEFAULT_TAP[kind] if args.tap is None else args.tap
    n, bs, lr = args.pretrain_steps, args.pretrain_batch, args.pretrain_lr
    size = args.pretrain_size
    grid = size // 16  # both toy encoders tap at stride 16
    dense = args.pretrain_objective in ("patch", "detect")
    K = data.NUM_CLASSES
    if dense:
        from connector import encoder_width
        head = torch.nn.Linear(encoder_width(kind, enc, tap), K + 1 + 4)  # class logits (K objects + bg), box

        def predict(x):  # the tap (and VMamba's outnorm) exactly as the VLM will read it, but with gradients
            f = enc.forward_features(x, layer=tap) if kind == "vit" else enc.forward_features(x, stage=tap)
            f = F.layer_norm(f, (f.shape[-1],)) if kind == "vmamba" else f  # (B, P, C)
            return head(f)                                                   # (B, P, K+1+4)
        params = list(enc.parameters()) + list(head.parameters())
    else:
        if enc.config.num_classes < K:
            raise TrainError(f"encoder preset {preset!r} has {enc.config.num_classes} classes < {K}")
        predict = enc
        params = list(enc.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    t0 = time.time()

    def batch(split, start, count):
        xs, ys, box_rows = [], [], []
        for i in range(start, start + count):
            i = i % world.split_size(split)
            if dense:
                scene = data.make_scene(world, split, i)
                x, frame = data.preprocess(scene["image"], args.geometry, size, mean, std)
                y, boxes = data.patch_targets(scene, frame, grid)
                box_rows.append(boxes)
            else:
                im, y = data.classification_example(world, split, i)
                x = data.preprocess(im, args.geometry, size, mean, std)[0]
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.tensor(ys), torch.tensor(box_rows) if dense else None  # (B,3,S,S) (B[,P]) (B,P,4)

    # background is most tokens: weigh it down so the objects, not the prior, drive the features
    w = torch.ones(K + 1)
    if dense:
        w[K] = 0.2

    def class_logits(out):  # dense heads put the K+1 class logits first, then the 4 box numbers
        return out[..., : K + 1] if dense else out

    def losses(out, y, boxes):
        logits = class_logits(out)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), weight=w)
        if args.pretrain_objective != "detect":
            return ce, torch.zeros(())
        obj = y != K                                                  # (B, P) tokens on an object
        l1 = (out[..., K + 1:][obj] - boxes[obj]).abs().mean() if obj.any() else out.sum() * 0
        return ce, l1

    enc.train()
    bar = tqdm(range(n), desc=f"pretrain {kind}", disable=int(os.environ.get("RANK", "0")) != 0,
               dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, n, max(1, round(0.1 * n)))
        x, y, boxes = batch("cls_train", step * bs, bs)
        ce, l1 = losses(predict(x), y, boxes)
        loss = ce + 10.0 * l1  # an L1 of 0.05 (a few pixels) weighs like a CE of 0.5
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(ce=f"{ce.item():.3f}", l1=f"{l1.item():.3f}")
    enc.eval()
    with torch.no_grad():
        x, y, boxes = batch("cls_val", 0, 64)
        out = predict(x)
        pred = class_logits(out).argmax(-1)
        acc = (pred == y).float().mean().item()
        obj = y != K  # dense objectives: accuracy on object tokens too (background is most tokens)
        obj_acc = (pred[obj] == y[obj]).float().mean().item() if dense else acc
        p, t = (pred[obj], y[obj]) if dense else (pred, y)  # colour and shape halves of the class
        nS = len(data.SHAPES)
        color_acc = ((p // nS == t // nS) & (p < K)).float().mean().item()
        shape_acc = ((p % nS == t % nS) & (p < K)).float().mean().item()
        box_l1 = losses(out, y, boxes)[1].item()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda t: torch.save({"model": enc.state_dict()}, t))
    info = dict(kind=kind, preset=preset, objective=args.pretrain_objective, steps=n, batch=bs, image_size=size,
                lr=lr, seed=args.seed, val_acc=acc, val_acc_object_tokens=obj_acc,
                val_color_acc=color_acc, val_shape_acc=shape_acc, val_box_l1=box_l1,
                seconds=round(time.time() - t0, 1))
    save_json(info, path + ".json")
    print0(f"pretrained {kind} encoder ({args.pretrain_objective}): {n} steps, val acc {100 * acc:.1f}% (object "
           f"tokens {100 * obj_acc:.1f}%: colour {100 * color_acc:.1f}%, shape {100 * shape_acc:.1f}%), "
           f"box L1 {box_l1:.3f}, in {info['seconds']}s -> {path}")


def load_encoder(kind, preset, path):
    mod = __import__(kind)
    enc = build_encoder(kind, preset)
    try:
        sd = mod.load_checkpoint(path)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise TrainError(f"--encoder-ckpt {path}: {e}") from None
    try:  # the encoder's own strict load: renames legacy keys first, then raises the readable key diff
        enc.load_state_dict(sd)
    except ValueError as e:
        raise TrainError(f"--encoder-ckpt {path} (preset {kind} {preset!r}): {e}") from None
    return enc


# ----------------------------------------------------------------------------- samples and batches


class Samples:
    """Sample i of epoch e -> dict(image PIL | None, ids, labels). Shapes world: scene i with a conversation
    re-drawn each epoch; LLaVA: record i as is."""

    def __init__(self, args, tok, tokenize):
        self.args, self.tok, self.tokenize = args, tok, tokenize
        self.world = data.CONFIGS["toy"]
        if args.data:
            self.records, skipped = data.load_llava(args.data, args.image_root, args.skip_missing_images)
            if skipped:
                print0(f"--skip-missing-images: skipped {skipped} entries whose image file is missing")
            if not self.records:
                raise TrainError(f"--data {args.data}: no usable entries")
            self.n = len(self.records)
        else:
            self.records = None
            self.n = args.train_images or self.world.n_train

    def image(self, i):
        from PIL import Image
        if self.records is None:
            return data.make_scene(self.world, "train", i)["image"]
        path = self.records[i]["image"]
        if path is None:
            return None
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as e:
            raise TrainError(f"--data entry {i}: cannot read image {path}: {e}") from None

    def text(self, i, epoch):
        """-> (input_ids, labels, user_labels, turn_ids), lists cut to --max-len (llm.tokenize_turns)."""
        if self.records is None:
            _, turns = data.train_conversation(self.world, "train", i, epoch, self.args.geometry,
                                               self.args.image_size, self.args.turns)
        else:
            turns = self.records[i]["turns"]
        return tuple(t[: self.args.max_len] for t in self.tokenize(self.tok, turns))


@functools.lru_cache(maxsize=2)  # one permutation per epoch, not one per sample (665K entries at paper scale)
def sample_order(n, epoch, seed):
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def indices_for_step(step, n, G, seed):
    """The G (epoch, index) pairs of optimizer step `step`: a pure function of the step, which is what makes
    resuming exact (the data position is just the step counter)."""
    out, pos = [], step * G
    for p in range(pos, pos + G):
        epoch, k = divmod(p, n)
        out.append((epoch, sample_order(n, epoch, seed)[k]))
    return out


def collate(samples, pad_id, device):
    """[(ids, labels, user_labels, turn_ids), ...] -> right-padded (B, T) tensors ids, labels, user_labels,
    turn_ids (padding continues its row's last turn) and the attention mask."""
    B, T = len(samples), max(len(s[0]) for s in samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    user_labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    turns = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for r, (i, l, u, t) in enumerate(samples):  # right padding, as in LLaVA training
        n = len(i)
        ids[r, :n], labels[r, :n], user_labels[r, :n] = torch.tensor(i), torch.tensor(l), torch.tensor(u)
        turns[r, :n], turns[r, n:], mask[r, :n] = torch.tensor(t), t[-1], 1
    return tuple(x.to(device) for x in (ids, labels, user_labels, turns, mask))


# ----------------------------------------------------------------------------- checkpoints


def latest_checkpoint(run_dir):
    ck = os.path.join(run_dir, "ckpt")
    try:
        with open(os.path.join(ck, "LATEST")) as f:
            return os.path.join(ck, f.read().strip())
    except FileNotFoundError:
        return None


def save_checkpoint(run_dir, vlm, opt, step, cfg, is_main, dist_on):
    """ckpt/step_NNNNNNN/{model.safetensors, trainer.pt, state.json} written into a temp folder and renamed into
    place, then ckpt/LATEST is swapped atomically to point at it; older step folders are removed only after.
    A crash at any moment leaves LATEST pointing at a complete checkpoint."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(vlm, options=opts) if dist_on else vlm.state_dict()
    osd = get_optimizer_state_dict(vlm, opt, options=opts)  # keyed by parameter names, the same on any world size
    if not is_main:
        return
    ck = os.path.join(run_dir, "ckpt")
    os.makedirs(ck, exist_ok=True)
    name = f"step_{step:07d}"
    final = os.path.join(ck, name)
    if os.path.isdir(final):
        return
    tmp = os.path.join(ck, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_safetensors(msd, os.path.join(tmp, "model.safetensors"))
    torch.save({"optimizer": osd, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               os.path.join(tmp, "trainer.pt"))
    save_json(dict(step=step, python_rng=list(random.getstate()[1]), config=cfg), os.path.join(tmp, "state.json"))
    os.replace(tmp, final)
    atomic_write(os.path.join(ck, "LATEST"), lambda t: open(t, "w").write(name))
    for d in os.listdir(ck):
        if d.startswith("step_") and d != name:
            shutil.rmtree(os.path.join(ck, d), ignore_errors=True)


def load_checkpoint(path, vlm, opt, dist_on):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    sd = load_file(os.path.join(path, "model.safetensors"))
    check_state_dict(vlm.state_dict(), sd, f"{path}/model.safetensors")  # DTensors report their global shape
    tr = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=True)
    opts = StateDictOptions(full_state_dict=True)
    if dist_on:
        set_model_state_dict(vlm, sd, options=opts)
    else:
        vlm.load_state_dict(sd)
    set_optimizer_state_dict(vlm, opt, optim_state_dict=tr["optimizer"], options=opts)
    torch.set_rng_state(tr["torch_rng"])
    if tr["cuda_rng"]:
        torch.cuda.set_rng_state_all(tr["cuda_rng"])
    with open(os.path.join(path, "state.json")) as f:
        st = json.load(f)
    random.setstate((3, tuple(st["python_rng"]), None))
    return st["step"], st["config"]


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    import llm as llm_lib

    # ---- processes and devices. torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; otherwise a single process.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dist_on = world_size > 1
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist_on:
        import torch.distributed as dist
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.threads:
        torch.set_num_threads(args.threads)
    is_main = rank == 0
    run_dir = args.out or os.path.join("runs", args.encoder)
    os.makedirs(run_dir, exist_ok=True)
    tap = DEFAULT_TAP[args.encoder] if args.tap is None else args.tap
    mean, std = MEANS[args.encoder]
    if args.global_batch:
        if args.global_batch % (args.batch * world_size):
            raise TrainError(f"--global-batch {args.global_batch} is not a multiple of --batch {args.batch} x "
                             f"{world_size} processes")
        args.accum = args.global_batch // (args.batch * world_size)
    G = args.batch * args.accum * world_size  # samples per optimizer step
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    # ---- 1. tokenizer + LLM
    if args.llm:
        tok = llm_lib.load_tokenizer(args.llm)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = llm_lib.Llama.from_pretrained(args.llm, dtype=torch.float32 if not dist_on else dtype)
        model.train()
    else:
        tok = data.build_tokenizer(data.world_texts() + [llm_lib.SYSTEM_PROMPT, llm_lib.prompt_text("?")],
                                   coord_tokens=args.coord_tokens == "on")
        model = llm_lib.Llama(replace(llm_lib.CONFIGS["toy"], vocab_size=tok.get_vocab_size(),
                                      bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"),
                                      pad_token_id=tok.token_to_id("<pad>")))
    eos_id = tok.token_to_id("</s>")
    pad_id = tok.token_to_id("<pad>") if tok.token_to_id("<pad>") is not None else eos_id

    # ---- 2. frozen encoder
    if args.encoder_ckpt:
        encoder = load_encoder(args.encoder, args.encoder_preset, args.encoder_ckpt)
        enc_source = args.encoder_ckpt
    else:
        # the matched pretraining, cached by everything it depends on (the second run of a pair reuses it)
        enc_source = os.path.join("runs", "encoders", f"{args.encoder}-{args.encoder_preset}-{args.geometry}-"
                                  f"{args.pretrain_objective}-tap{tap}-s{args.pretrain_steps}x{args.pretrain_batch}"
                                  f"@{args.pretrain_size}-lr{args.pretrain_lr:g}"
                                  f"-seed{args.seed}.pth")
        if args.pretrain_steps > 0 and not os.path.isfile(enc_source):
            if is_main:
                pretrain_encoder(args.encoder, args.encoder_preset, args, enc_source)
            if dist_on:
                torch.distributed.barrier()
        if args.pretrain_steps > 0:
            encoder = load_encoder(args.encoder, args.encoder_preset, enc_source)
        else:
            torch.manual_seed(args.seed)
            encoder, enc_source = build_encoder(args.encoder, args.encoder_preset), "random init (frozen)"
    torch.manual_seed(args.seed)  # the same VLM init whatever happened above
    vlm = VLM(encoder, model, args.encoder, tap, args.connector).to(device)

    cfg = dict(encoder=args.encoder, encoder_preset=args.encoder_preset, encoder_config=asdict(encoder.config),
               encoder_source=enc_source, tap=tap, connector=args.connector,
               llm_config=asdict(model.config), llm=args.llm, geometry=args.geometry, image_size=args.image_size,
               mean=list(mean), std=list(std), seed=args.seed, batch=args.batch, accum=args.accum,
               world_size=world_size, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
               clip=args.clip, turns=args.turns, data=args.data, isolate_turns=args.isolate_turns == "on",
               question_loss=args.question_loss, coord_tokens=args.coord_tokens == "on",
               system_prompt=llm_lib.SYSTEM_PROMPT if args.system_prompt == "vicuna" else "")

    # ---- 3. data
    samples = Samples(args, tok, functools.partial(llm_lib.tokenize_turns, system=cfg["system_prompt"]))
    total = args.steps or max(1, math.ceil(samples.n * args.epochs / G))
    warmup = math.ceil(args.warmup * total)
    cfg["steps"] = total

    # ---- 4. frozen-encoder feature cache: each image once, instead of once per epoch
    P_C = (args.image_size // 16) ** 2 * vlm.connector_config.d_v
    cache_gb = samples.n * P_C * 4 / 1e9
    use_cache = args.cache_features == "on" or (args.cache_features == "auto" and total * G > samples.n
                                                and cache_gb < 4)
    feats, has_img = None, None
    # The shapes world's features are also kept on disk (runs/features/), keyed by everything they depend on, so a
    # rerun skips the encoder entirely; LLaVA data (real scale) is only cached in memory.
    disk = None
    if use_cache and not args.data and not args.encoder_ckpt and args.pretrain_steps > 0:
        disk = os.path.join("runs", "features", os.path.basename(enc_source).removesuffix(".pth") +
                            f"-tap{tap}-{args.image_size}px-n{samples.n}-w{samples.world.seed}.pt")
        if os.path.isfile(disk):
            feats, has_img = torch.load(disk, weights_only=True).values()
            print0(f"loaded cached frozen {args.encoder} features of {samples.n} images from {disk}")
    if use_cache and feats is None:
        t0 = time.time()
        chunks, has_img = [], torch.ones(samples.n, dtype=torch.long)
        for s in range(0, samples.n, 32):
            px = []
            for i in range(s, min(samples.n, s + 32)):
                im = samples.image(i)
                if im is None:  # text-only: zero patches, masked out
                    has_img[i] = 0
                    px.append(torch.zeros(3, args.image_size, args.image_size))
                else:
                    px.append(data.preprocess(im, args.geometry, args.image_size, mean, std)[0])
            chunks.append(vlm.encoder_features(torch.stack(px).to(device)).cpu())
        feats = torch.cat(chunks)  # (N, P, C)
        if disk and is_main:
            os.makedirs(os.path.dirname(disk), exist_ok=True)
            atomic_write(disk, lambda t: torch.save({"feats": feats, "has_img": has_img}, t))
        print0(f"cached frozen {args.encoder} features of {samples.n} images ({cache_gb:.2f} GB) in "
               f"{time.time() - t0:.1f}s")

    # ---- 5. distributed wrapping, optimizer
    act_ckpt = args.act_ckpt == "on" or (args.act_ckpt == "auto" and (dist_on or device.type == "cuda"))
    if act_ckpt:
        # Recompute each decoder layer in backward instead of storing its activations. Wrapping `forward` (rather
        # than torch's checkpoint_wrapper module) keeps the HF parameter names unchanged in every checkpoint.
        from functools import partial

        from torch.utils.checkpoint import checkpoint
        for layer in vlm.llm.model.layers:
            layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)
    if dist_on:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()
        # Shard every decoder layer (one all-gather per layer), then the embedding, the rest of the LLM, the rest.
        for layer in vlm.llm.model.layers:
            fully_shard(layer, mp_policy=mp)
        # the VLM calls llm.embed() itself (to splice the image in), bypassing llm's own forward hooks, so the
        # embedding table is its own FSDP unit that gathers when *it* is called
        fully_shard(vlm.llm.model.embed_tokens, mp_policy=mp)
        fully_shard(vlm.llm, mp_policy=mp)
        # the root unit: the connector and the frozen encoder (FSDP2 shards per parameter; the frozen ones simply
        # never get gradients). FSDP2 wants one root, run first, and the VLM's forward is that.
        fully_shard(vlm, mp_policy=mp)
    params = [(n, p) for n, p in vlm.named_parameters() if p.requires_grad]
    groups = [dict(params=[p for n, p in params if p.ndim >= 2], weight_decay=args.weight_decay),
              dict(params=[p for n, p in params if p.ndim < 2], weight_decay=0.0)]  # no decay on biases/norms
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=device.type == "cuda")

    # ---- resume
    step = 0
    log_path = os.path.join(run_dir, "log.jsonl")
    if args.resume:
        ck = latest_checkpoint(run_dir)
        if ck is None:
            raise TrainError(f"--resume: no checkpoint in {run_dir}/ckpt (nothing to resume)")
        with open(os.path.join(ck, "state.json")) as f:  # the settings first: a changed vocabulary (coord_tokens)
            old = json.load(f)["config"]                   # would otherwise surface as mis-shaped weights
        changed = [k for k in ("encoder", "connector", "geometry", "image_size", "seed", "batch", "accum",
                               "world_size", "steps", "lr", "system_prompt", "question_loss", "isolate_turns",
                               "coord_tokens")
                   if old.get(k) != cfg.get(k)]
        if changed:
            raise TrainError(f"--resume: {ck} was written with different settings: "
                             + ", ".join(f"{k} {old.get(k)!r} -> {cfg.get(k)!r}" for k in changed))
        step, _ = load_checkpoint(ck, vlm, opt, dist_on)
        print0(f"resumed from {ck} at step {step}/{total}")
        losses = []
        if os.path.isfile(log_path):  # keep the log of the steps before the checkpoint, drop the rest
            with open(log_path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            rows = [r for r in rows if r.get("step", 0) < step]
            if is_main:
                atomic_write(log_path, lambda t: open(t, "w").write("".join(json.dumps(r) + "\n" for r in rows)))
            losses = [r["loss"] for r in rows]
    else:
        losses = []
        if is_main:
            open(log_path, "w").close()
            shutil.rmtree(os.path.join(run_dir, "ckpt"), ignore_errors=True)  # a fresh run starts a fresh ckpt/
    if is_main:
        tok.save(os.path.join(run_dir, "tokenizer.json"))
        save_json(cfg, os.path.join(run_dir, "config.json"))

    # ---- 6. the loop
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    fsdp_modules = [vlm] if dist_on else []  # recurses into every FSDP unit
    vlm.train()
    bar = tqdm(total=total, initial=step, disable=not is_main, desc=f"train {args.encoder}", dynamic_ncols=True)
    t0 = time.time()
    while step < total:
        lr = args.lr * lr_factor(step, total, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        picks = indices_for_step(step, samples.n, G, args.seed)
        loss_sum, answer_sum = 0.0, 0.0
        for micro in range(args.accum):
            start = (micro * world_size + rank) * args.batch
            mine = picks[start: start + args.batch]
            texts = [samples.text(i, e) for e, i in mine]
            ids, labels, user_labels, turn_ids, mask = collate(texts, pad_id, device)
            idx = [i for _, i in mine]
            if feats is not None:
                kw = dict(features=feats[idx].to(device), image_mask=has_img[idx].to(device))
            else:
                ims = [samples.image(i) for i in idx]
                px = torch.stack([data.preprocess(im, args.geometry, args.image_size, mean, std)[0] if im else
                                  torch.zeros(3, args.image_size, args.image_size) for im in ims]).to(device)
                kw = dict(pixel_values=px, image_mask=torch.tensor([im is not None for im in ims]).long().to(device))
            for m in fsdp_modules:  # reduce-scatter gradients only on the last micro-step
                m.set_requires_gradient_sync(micro == args.accum - 1)
            with amp:
                out = vlm(input_ids=ids, attention_mask=mask, labels=labels,
                          user_labels=user_labels if args.question_loss > 0 else None, user_loss=args.question_loss,
                          turn_ids=turn_ids if cfg["isolate_turns"] else None, **kw)
            loss = out["loss"]
            if args.debug_nan_at_step == step:
                loss = loss * float("nan")
            if not torch.isfinite(loss):
                ck = latest_checkpoint(run_dir)
                raise TrainError(f"loss is {loss.item()} at step {step} (micro-step {micro}); stopping without "
                                 f"saving. Last good checkpoint: {ck or 'none'}"
                                 + (" (continue with --resume, e.g. at a lower --lr)" if ck else ""))
            (loss / args.accum).backward()
            loss_sum += loss.item() / args.accum
            answer_sum += out.get("answer_loss", loss).item() / args.accum  # the answers' part alone
        gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in params], args.clip)
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
        if not torch.isfinite(gnorm):
            ck = latest_checkpoint(run_dir)
            raise TrainError(f"gradient norm is {gnorm.item()} at step {step}; stopping without saving. Last good "
                             f"checkpoint: {ck or 'none'}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dist_on:  # the logged loss is the mean over ranks
            t = torch.tensor([loss_sum, answer_sum], device=device)
            torch.distributed.all_reduce(t)
            loss_sum, answer_sum = (t / world_size).tolist()
        step += 1
        losses.append(loss_sum)
        if is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(dict(step=step - 1, loss=round(loss_sum, 5), answer_loss=round(answer_sum, 5),
                                        lr=lr, grad_norm=round(gnorm.item(), 4),
                                        seconds=round(time.time() - t0, 2))) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}")
        if step % args.ckpt_every == 0 or step == total:
            save_checkpoint(run_dir, vlm, opt, step, cfg, is_main, dist_on)
    bar.close()
    train_s = time.time() - t0

    # ---- final weights (atomic), loss curve, held-out evaluation
    if dist_on:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        final_sd = get_model_state_dict(vlm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        final_sd = vlm.state_dict()
    if is_main:
        save_safetensors(final_sd, os.path.join(run_dir, "model.safetensors"))
        draw_loss_png(losses, os.path.join(run_dir, "loss.png"), f"{args.encoder} / {args.connector} / "
                      f"{args.geometry}: training loss")
        print0(f"trained {total} steps in {train_s:.0f}s; final loss {losses[-1] if losses else float('nan'):.4f}"
               f" -> {run_dir}/model.safetensors")
    if is_main and args.eval_images > 0 and not args.data:
        import eval as eval_lib
        vlm_eval = vlm
        if dist_on:  # evaluate an unsharded copy on rank 0
            from connector import build_vlm
            vlm_eval = build_vlm(cfg).to(device)
            vlm_eval.load_state_dict(final_sd)
        examples = data.shapes_examples("test", args.eval_images, geometry=args.geometry, image_size=args.image_size)
        t1 = time.time()
        res = eval_lib.evaluate(vlm_eval, tok, cfg, examples, batch_size=32, progress=False)
        res.update(train_seconds=round(train_s, 1), eval_seconds=round(time.time() - t1, 1), split="test",
                   n_test_images=args.eval_images)
        save_json(res, os.path.join(run_dir, "results.json"))
        rows = [dict(encoder=args.encoder, connector=args.connector, geometry=args.geometry,
                     **{"VQA acc": res["vqa_acc"], "Acc@0.5": res.get("acc@0.5")})]
        rows += [dict(encoder="", connector=t["task"], geometry=f"n={t['n']}", **{"VQA acc": t["acc"]})
                 for t in res["tasks"]]
        print0(eval_lib.format_table(rows))
        print0(f"by the number of objects in the scene (n examples):\n{eval_lib.objects_table(res)}")
    if dist_on:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (TrainError, ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"train.py: error: {msg}", file=sys.stderr)
        sys.exit(1)
