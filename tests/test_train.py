"""train.py end to end on tiny settings: the loss falls, a killed run resumes bit-identically, torchrun + FSDP2
(gloo) runs, real-format inputs train, and every bad input stops with one clear line and no partial checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import data
import llm
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny and fast: random frozen encoder, 8 scenes, 2 turns, no eval
TINY = ["--encoder", "vit", "--pretrain-steps", "0", "--train-images", "8", "--turns", "2", "--batch", "2",
        "--eval-images", "0", "--threads", "1"]


def _log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _cli(args, timeout=240):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_loss_falls(tmp_path):
    run = str(tmp_path / "r")
    train.main(TINY + ["--steps", "25", "--lr", "3e-3", "--out", run, "--ckpt-every", "100"])
    losses = [r["loss"] for r in _log(run)]
    assert len(losses) == 25
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss.png"):
        assert os.path.isfile(os.path.join(run, name)), name
    from connector import load_run
    vlm, tok, cfg = load_run(run)
    assert cfg["encoder"] == "vit" and tok.token_to_id("<s>") is not None
    # the toy LLM's defaults: no system prompt, the question loss, isolated turns; the log keeps the answers' part
    assert (cfg["system_prompt"], cfg["question_loss"], cfg["isolate_turns"]) == ("", 1.0, True)
    assert cfg["coord_tokens"] and tok.encode("[0.12, 0.5, 0.07, 1.0]").tokens.count("0.12") == 1
    assert all(r["answer_loss"] < r["loss"] for r in _log(run))


def test_toy_and_vicuna_defaults_resolve():
    a = train.parse_args([])
    assert (a.system_prompt, a.question_loss, a.isolate_turns, a.coord_tokens) == ("none", 1.0, "on", "on")
    a = train.parse_args(["--llm", "some/dir", "--data", "x.json"])
    assert (a.system_prompt, a.question_loss, a.isolate_turns, a.coord_tokens) == ("vicuna", 0.0, "off", "off")
    a = train.parse_args(["--system-prompt", "vicuna", "--question-loss", "0", "--isolate-turns", "off",
                          "--coord-tokens", "off"])
    assert (a.system_prompt, a.question_loss, a.isolate_turns, a.coord_tokens) == ("vicuna", 0.0, "off", "off")
    with pytest.raises(SystemExit):
        train.parse_args(["--question-loss", "-1"])
    with pytest.raises(SystemExit):  # Vicuna's tokenizer has no coordinate tokens to turn on
        train.parse_args(["--llm", "some/dir", "--coord-tokens", "on"])


def test_kill_and_resume_is_bit_identical(tmp_path):
    args = TINY + ["--steps", "8", "--ckpt-every", "2"]
    ref = str(tmp_path / "ref")
    assert _cli(args + ["--out", ref]).returncode == 0
    run = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--out", run], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = os.path.join(run, "ckpt", "LATEST")
    deadline = time.time() + 200
    while not os.path.exists(latest) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)  # mid-run: right after the first checkpoint appeared
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(run, "model.safetensors"))
    r = _cli(args + ["--out", run, "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    a, b = load_file(os.path.join(ref, "model.safetensors")), load_file(os.path.join(run, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [x["loss"] for x in _log(ref)] == [x["loss"] for x in _log(run)]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    run = str(tmp_path / "r")
    r = _cli(TINY + ["--steps", "8", "--ckpt-every", "2", "--out", run, "--debug-nan-at-step", "3"])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "loss is nan at step 3" in r.stderr and "step_0000002" in r.stderr, r.stderr
    assert open(os.path.join(run, "ckpt", "LATEST")).read() == "step_0000002"
    assert not os.path.exists(os.path.join(run, "model.safetensors"))


def test_resume_with_changed_settings_says_which(tmp_path):
    run = str(tmp_path / "r")
    assert _cli(TINY + ["--steps", "2", "--ckpt-every", "2", "--out", run]).returncode == 0
    # another vocabulary (no coordinate tokens) and another lr: named in one line, before any weight is loaded
    r = _cli(TINY + ["--steps", "2", "--out", run, "--resume", "--coord-tokens", "off", "--lr", "5e-4"])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "lr 0.001 -> 0.0005" in r.stderr and "coord_tokens True -> False" in r.stderr, r.stderr


def test_torchrun_fsdp2_two_processes(tmp_path):
    run = str(tmp_path / "r")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(ROOT, "train.py"), *TINY, "--steps", "3", "--out", run, "--ckpt-every", "2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _log(run)
    assert [x["step"] for x in rows] == [0, 1, 2] and all(x["loss"] > 0 for x in rows)
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["world_size"] == 2
    sd = load_file(os.path.join(run, "model.safetensors"))
    assert "llm.model.layers.0.self_attn.q_proj.weight" in sd or any(k.startswith("llm.model.layers.0") for k in sd)


# ----------------------------------------------------------------------------- real formats and bad inputs


@pytest.fixture(scope="module")
def real_fixtures(tmp_path_factory):
    """A tiny HF Llama directory, a toy ViT checkpoint in the official container ({"model": sd}, .pth), and a small
    LLaVA JSON with generated images (one text-only entry)."""
    d = tmp_path_factory.mktemp("real")
    texts = ["What color is the circle? red green blue", "hello there, how are you?"]
    tok = data.build_tokenizer(data.world_texts() + texts + [llm.SYSTEM_PROMPT, llm.prompt_text("?")])
    cfg = replace(llm.CONFIGS["toy"], vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    llm_dir = d / "llama"
    llm_dir.mkdir()
    torch.manual_seed(0)
    model = llm.Llama(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(llm_dir / "model.safetensors"))
    (llm_dir / "config.json").write_text(json.dumps(cfg.to_hf(style="4.31")))
    tok.save(str(llm_dir / "tokenizer.json"))
    from vit import ViT, CONFIGS
    enc = ViT(CONFIGS["toy"])
    torch.save({"model": enc.state_dict()}, str(d / "vit_toy.pth"))
    entries = []
    for i in range(4):
        scene = data.make_scene(data.CONFIGS["toy"], "val", i)
        scene["image"].save(d / f"img{i}.jpg")
        entries.append({"id": f"s{i}", "image": f"img{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nHow many shapes are there?"},
            {"from": "gpt", "value": str(len(scene["objects"]))},
            {"from": "human", "value": "What color is the circle?"}, {"from": "gpt", "value": "red"}]})
    entries.append({"id": "text", "conversations": [{"from": "human", "value": "hello there"},
                                                    {"from": "gpt", "value": "how are you?"}]})
    (d / "llava.json").write_text(json.dumps(entries))
    return d, entries


def _real_args(d, out, **over):
    a = {"--llm": str(d / "llama"), "--encoder": "vit", "--encoder-ckpt": str(d / "vit_toy.pth"),
         "--data": str(d / "llava.json"), "--steps": "2", "--batch": "2", "--out": str(out), "--threads": "1"}
    a.update(over)
    return [x for kv in a.items() for x in kv]


def test_trains_from_real_formats(real_fixtures, tmp_path):
    d, _ = real_fixtures
    train.main(_real_args(d, tmp_path / "r"))
    from connector import load_run
    vlm, tok, cfg = load_run(str(tmp_path / "r"))
    assert cfg["llm_config"]["hidden_size"] == 64 and len(_log(str(tmp_path / "r"))) == 2
    # a pretrained Vicuna keeps its template and the answers-only loss; LLaVA conversations stay whole
    assert (cfg["system_prompt"], cfg["question_loss"], cfg["isolate_turns"]) == (llm.SYSTEM_PROMPT, 0.0, False)
    assert not cfg["coord_tokens"]


def test_bad_inputs_fail_with_one_clear_line(real_fixtures, tmp_path):
    d, entries = real_fixtures
    cases = []
    (tmp_path / "bad.json").write_text(json.dumps(entries)[:-5])
    cases.append(({"--data": str(tmp_path / "bad.json")}, "malformed JSON at line"))
    no_answer = entries[:2] + [{"id": "q", "image": "img0.jpg",
                                "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}]
    (d / "noans.json").write_text(json.dumps(no_answer))
    cases.append(({"--data": str(d / "noans.json")}, "entry 2 (id 'q'): conversation has no answer"))
    missing = entries + [{"id": "m", "image": "gone.jpg", "conversations": entries[0]["conversations"]}]
    (d / "missing.json").write_text(json.dumps(missing))
    cases.append(({"--data": str(d / "missing.json")}, "image not found: " + str(d / "gone.jpg")))
    from vit import ViT, CONFIGS
    small = ViT(replace(CONFIGS["toy"], depth=5))
    torch.save({"model": small.state_dict()}, str(tmp_path / "wrong.pth"))
    cases.append(({"--encoder-ckpt": str(tmp_path / "wrong.pth")}, "missing: blocks.5."))
    for over, msg in cases:  # in-process: train.py's __main__ prints exactly str(error) (see the NaN test's CLI)
        with pytest.raises((train.TrainError, ValueError, FileNotFoundError)) as e:
            train.main(_real_args(d, tmp_path / "x", **over))
        assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert not os.path.exists(tmp_path / "x" / "model.safetensors")
    # the explicit flag skips and counts the entry with the missing image instead
    out = tmp_path / "skip"
    train.main(_real_args(d, out, **{"--data": str(d / "missing.json")}) + ["--skip-missing-images"])
    assert os.path.isfile(out / "model.safetensors")


@pytest.mark.parametrize("kind", ["vit", "vmamba"])
def test_matched_pretraining_learns_and_saves_the_official_container(tmp_path, kind):
    # 0 steps gives the untrained baseline through the same evaluation; 40 small steps must beat it clearly
    infos = {}
    for steps in (0, 40):
        args = train.parse_args(["--pretrain-steps", str(steps), "--pretrain-batch", "8", "--pretrain-size", "64",
                                 "--pretrain-lr", "3e-3"])
        path = str(tmp_path / f"{kind}-{steps}.pth")
        train.pretrain_encoder(kind, "toy", args, path)
        with open(path + ".json") as f:
            infos[steps] = json.load(f)
        assert set(torch.load(path, weights_only=True)) == {"model"}  # the official {"model": sd} container
        train.load_encoder(kind, "toy", path)                         # and it loads strictly
    assert infos[40]["objective"] == "detect" and infos[40]["image_size"] == 64
    assert infos[40]["val_box_l1"] < 0.6 * infos[0]["val_box_l1"], infos
    assert infos[40]["val_acc"] > infos[0]["val_acc"] + 0.1, infos

