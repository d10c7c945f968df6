"""connector.py: the api.md connector layouts, the splice right after BOS (labels IGNORE on image positions), and
left-padded batched generation equal to one-by-one generation."""
from dataclasses import replace

import torch
import torch.nn as nn

import connector
import llm
from connector import CONNECTORS, IGNORE_INDEX, VLM, build_encoder


def test_connector_layouts():
    m2 = CONNECTORS["mlp2x_gelu"](48, 64)
    assert [type(m) for m in m2] == [nn.Linear, nn.GELU, nn.Linear]
    assert (m2[0].in_features, m2[0].out_features, m2[2].out_features) == (48, 64, 64)
    m3 = CONNECTORS["mlp3x_gelu"](48, 64)
    assert [type(m) for m in m3] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [(l.in_features, l.out_features) for l in m3[::2]] == [(48, 192), (192, 64), (64, 64)]
    # paper.md §1.4: the init depends only on the vision width (seeded with it), not on the caller's RNG
    torch.manual_seed(1)
    a = connector.build_connector(connector.ConnectorConfig("mlp2x_gelu", 48, 64))
    torch.manual_seed(2)
    b = connector.build_connector(connector.ConnectorConfig("mlp2x_gelu", 48, 64))
    assert torch.equal(a[0].weight, b[0].weight)


def _tiny_vlm(kind="vit"):
    cfg = replace(llm.CONFIGS["toy"], vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    return VLM(build_encoder(kind, "toy"), llm.Llama(cfg), kind).eval()


def test_splice_after_bos_and_labels():
    vlm = _tiny_vlm()
    B, T, P = 2, 7, 16
    px = torch.randn(B, 3, 64, 64)
    ids = torch.randint(4, 50, (B, T))
    ids[:, 0] = 1
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    out = vlm(px, ids, mask, labels, output_hidden_states=True)
    assert out["logits"].shape == (B, T + P, 50) and out["image_slice"] == slice(1, 1 + P)
    emb, m2, lab2, bos = vlm._splice(ids, mask, labels, vlm.encode_images(px), torch.ones(B))
    img = vlm.encode_images(px)
    assert torch.equal(emb[:, 1:1 + P], img) and torch.equal(emb[:, :1], vlm.llm.embed(ids[:, :1]))
    assert torch.equal(emb[:, 1 + P:], vlm.llm.embed(ids[:, 1:]))
    assert (lab2[:, 1:1 + P] == IGNORE_INDEX).all() and torch.equal(lab2[:, 1 + P:], labels[:, 1:])
    assert m2[1, 1 + P:].tolist() == mask[1, 1:].tolist()
    assert out["loss"] is not None and torch.isfinite(out["loss"])
    # the frozen encoder gets no gradient, the connector does
    out["loss"].backward()
    assert all(p.grad is None for p in vlm.encoder.parameters())
    assert vlm.connector[0].weight.grad is not None


def test_left_padded_generate_matches_single():
    vlm = _tiny_vlm("vit")
    torch.manual_seed(0)
    px = torch.randn(2, 3, 64, 64)
    a = torch.tensor([[1, 5, 6, 7, 8, 9]])
    b = torch.tensor([[1, 10, 11]])
    single = [vlm.generate(px[i:i + 1], x, max_new_tokens=5) for i, x in enumerate((a, b))]
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [0, 0, 0, 1, 10, 11]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    both = vlm.generate(px, ids, mask, max_new_tokens=5)
    assert torch.equal(both[0], single[0][0]) and torch.equal(both[1], single[1][0])


def test_isolated_turns_and_question_loss():
    # the toy LLM's training options: each turn of a packed conversation scores as if alone, and the question loss
    # adds w x the questions' mean to the answers' mean
    vlm = _tiny_vlm()
    P = 16
    px = torch.randn(1, 3, 64, 64)
    g = torch.Generator().manual_seed(0)
    pre, t1, t2 = (torch.randint(4, 50, (n,), generator=g) for n in (3, 5, 4))
    pre[0] = 1  # BOS
    ids = torch.cat([pre, t1, t2])[None]                                  # (1, 12)
    turns = torch.tensor([[0] * 3 + [1] * 5 + [2] * 4])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 6:8], labels[0, 10:] = ids[0, 6:8], ids[0, 10:]             # the answers
    user = torch.where((labels == IGNORE_INDEX) & (turns > 0), ids, torch.full_like(ids, IGNORE_INDEX))
    with torch.no_grad():
        packed = vlm(px, ids, labels=labels, turn_ids=turns)["logits"][0]  # (P + 12, V)
        alone = vlm(px, torch.cat([pre, t2])[None])["logits"][0]           # (P + 7, V)
        plain = vlm(px, ids)["logits"][0]
    torch.testing.assert_close(packed[P + 8:], alone[P + 3:], atol=1e-5, rtol=1e-5)
    assert (plain[P + 8:] - alone[P + 3:]).abs().max() > 1e-3
    with torch.no_grad():
        out = vlm(px, ids, labels=labels, user_labels=user, user_loss=0.5)
        ans = vlm(px, ids, labels=labels)["loss"]
        asked = vlm(px, ids, labels=user)["loss"]
    torch.testing.assert_close(out["answer_loss"], ans)
    torch.testing.assert_close(out["user_loss"], asked)
    torch.testing.assert_close(out["loss"], ans + 0.5 * asked)
    with torch.no_grad():  # weight 0 (Vicuna's default) is the plain answer loss
        assert torch.equal(vlm(px, ids, labels=labels, user_labels=user, user_loss=0.0)["loss"], ans)
