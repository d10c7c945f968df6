"""data.py: the shapes world is deterministic and its splits disjoint, the two geometries put boxes where the
pixels are, box strings have LLaVA's format, the toy tokenizer round-trips, and bad LLaVA JSON fails clearly."""
import json

import numpy as np
import pytest
from PIL import Image

import data

W0 = data.CONFIGS["toy"]


def test_scenes_are_deterministic_and_splits_differ():
    a, b = data.make_scene(W0, "train", 7), data.make_scene(W0, "train", 7)
    assert a["objects"] == b["objects"] and a["image"].tobytes() == b["image"].tobytes()
    train = {data.make_scene(W0, "train", i)["image"].tobytes() for i in range(40)}
    test = {data.make_scene(W0, "test", i)["image"].tobytes() for i in range(40)}
    assert not train & test
    sizes = {data.make_scene(W0, "train", i)["size"] for i in range(40)}
    assert any(w != h for w, h in sizes), "the world must contain non-square images"
    for i in range(40):  # the pixel-free layout (what training conversations use) is the drawn scene's layout
        lay = data.make_scene(W0, "train", i, draw=False)
        full = data.make_scene(W0, "train", i)
        assert lay["image"] is None and (lay["objects"], lay["size"]) == (full["objects"], full["size"])


def test_examples_have_the_contract_keys():
    ex = data.shapes_examples("test", 6)
    assert {e["task"] for e in ex} == {"vqa", "ground"}
    for e in ex:
        assert isinstance(e["image"], Image.Image) and e["question"] and e["answers"]
        assert 1 <= e["n_objects"] <= data.CONFIGS["toy"].max_objects
        if e["task"] == "ground":
            assert e["question"] == ('Please provide the bounding box coordinate of the region this sentence '
                                     f'describes: "{e["expression"]}"')
            assert len(e["box"]) == 4 and len(e["others"]) == e["n_objects"] - 1
        else:
            assert len(e["answers"]) == 10 and len(e["answers"][0].split()) == 1


def test_format_box_is_python_repr_with_two_decimals():
    assert data.format_box((0.28, 0.34, 0.40, 0.7149)) == "[0.28, 0.34, 0.4, 0.71]"
    assert data.format_box((0, 0.5, 1, 0.999)) == "[0.0, 0.5, 1.0, 1.0]"


@pytest.mark.parametrize("geometry", data.GEOMETRIES)
def test_projected_box_lands_on_the_object_pixels(geometry):
    # a 200x100 image with a red square at x 150..190, y 20..60: the projected box must cover red pixels
    im = Image.new("RGB", (200, 100), (128, 128, 128))
    im.paste((255, 0, 0), (150, 20, 190, 60))
    x, frame = data.preprocess(im, geometry, 64, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert x.shape == (3, 64, 64)
    assert frame == data.preprocess_frame((200, 100), geometry, 64)
    x1, y1, x2, y2 = (v * 64 for v in data.project_box((150, 20, 190, 60), frame))
    red = (x[0] > 0.8) & (x[1] < -0.8)                         # (S, S) pixels that are clearly red
    ys, xs = np.nonzero(red.numpy())
    assert abs(xs.min() - x1) <= 1.5 and abs(xs.max() + 1 - x2) <= 1.5
    assert abs(ys.min() - y1) <= 1.5 and abs(ys.max() + 1 - y2) <= 1.5
    if geometry == "letterbox":
        assert frame["pad_y"] > 0 and frame["pad_x"] == 0      # centered vertically
    else:
        assert frame["pad_x"] == frame["pad_y"] == 0           # top-left anchored


@pytest.mark.parametrize("coord_tokens", [True, False])
def test_tokenizer_round_trips_and_splits_digits(coord_tokens):
    tok = data.build_tokenizer(data.world_texts() + ["A chat. USER: ASSISTANT:"], coord_tokens=coord_tokens)
    for name in data.SPECIAL_TOKENS:
        assert tok.token_to_id(name) is not None
    for s in ["[0.28, 0.34, 0.4, 0.71]", data.GROUND_PROMPT.format("the red circle"), "yes", "3",
              "Is the blue square to the left of the green triangle?", "Something never seen: xyz 42!",
              "[0.0, 0.1, 0.05, 1.0]", "1.05 10.5 x0.5 0.10"]:
        enc = tok.encode(s)
        assert enc.ids[0] == tok.token_to_id("<s>")
        assert tok.decode(enc.ids) == s
    toks = tok.encode("[0.28, 0.4, 0.05, 1.0]").tokens
    coords = [t for t in toks if any(c.isdigit() for c in t)]
    # a box value is one token with coord_tokens, else one token per digit (the point is its own token)
    assert coords == (["0.28", "0.4", "0.05", "1.0"] if coord_tokens else list("0280400510")), toks
    # anything that is not a whole 2-decimal box value is split into digits either way
    toks = tok.encode("0.1234 10.5 x0.5 0.10").tokens
    assert all(len(t) == 1 for t in toks if any(c.isdigit() for c in t)), toks
    # a word is one token whatever punctuation follows it: "circle?" and 'circle"' both hold the token "▁circle"
    for s in ("Is there a red circle?", data.GROUND_PROMPT.format("the red circle"), "the red circle to the left"):
        assert "▁circle" in tok.encode(s).tokens, tok.encode(s).tokens


def _write(tmp_path, obj, name="d.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def test_load_llava_valid_and_bad_inputs(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    ok = [{"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]},
        {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    recs, skipped = data.load_llava(_write(tmp_path, ok))
    assert skipped == 0 and recs[0]["turns"] == [("What?", "red")] and recs[1]["image"] is None

    with pytest.raises(ValueError, match="malformed JSON at line"):
        data.load_llava(_write(tmp_path, '[{"id": 1,}'))
    with pytest.raises(ValueError, match="entry 1 .*no answer"):
        data.load_llava(_write(tmp_path, ok[:1] + [{"id": "q", "conversations": [{"from": "human", "value": "?"}]}]))
    with pytest.raises(ValueError, match="entry 2: expected an object"):
        data.load_llava(_write(tmp_path, ok + [3]))
    missing = ok + [{"id": "m", "image": "nope.png", "conversations": ok[0]["conversations"]}]
    with pytest.raises(FileNotFoundError, match="entry 2 .*nope.png"):
        data.load_llava(_write(tmp_path, missing))
    recs, skipped = data.load_llava(_write(tmp_path, missing), skip_missing_images=True)
    assert skipped == 1 and len(recs) == 2


def test_training_conversations_never_repeat_a_question():
    # a repeated question could be answered by copying the earlier answer from the context, not from the image
    for i in range(30):
        scene, turns = data.train_conversation(W0, "train", i, epoch=0, n_turns=12)
        qs = [q for q, _ in turns]
        assert len(qs) == len(set(qs)) and 1 <= len(qs) <= 12
        names = {f"{o['color']} {o['shape']}" for o in scene["objects"]}
        for q, a in turns:
            if q.startswith("Is there a "):  # existence answers are true of the scene
                assert a == ("yes" if q[len("Is there a "):-1] in names else "no"), (q, a)
    lens = [len(data.train_conversation(W0, "train", i, 0, n_turns=12)[1]) for i in range(30)]
    assert max(lens) == 12 and min(lens) < 12, "one-object scenes have fewer distinct questions than 12"
    a = data.train_conversation(W0, "train", 3, epoch=0, n_turns=6)[1]
    assert a == data.train_conversation(W0, "train", 3, epoch=0, n_turns=6)[1]   # deterministic
    assert a != data.train_conversation(W0, "train", 3, epoch=1, n_turns=6)[1]   # re-drawn each epoch


def test_patch_targets_label_cells_by_the_object_box():
    scene = dict(objects=[dict(color="blue", shape="circle", box=(32.0, 0.0, 96.0, 64.0))], size=(128, 128))
    frame = data.preprocess_frame((128, 128), "letterbox", 128)
    labels, boxes = data.patch_targets(scene, frame, 4)  # cells of 32 px, centres at 16, 48, 80, 112
    k = data.object_class(scene["objects"][0])
    assert labels == [data.NUM_CLASSES, k, k, data.NUM_CLASSES] * 2 + [data.NUM_CLASSES] * 8
    assert boxes[1] == (0.25, 0.0, 0.75, 0.5) and boxes[0] == (0.0, 0.0, 0.0, 0.0)
