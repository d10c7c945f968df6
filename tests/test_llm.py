"""Tests for llm.py: checkpoint layouts + strict loading, numerics, KV-cache generation, padding, the tokenizer built
from a sentencepiece file (written here with our own protobuf writer), and the Vicuna template's label mask.
Everything is tiny (hidden 32, 2 layers) so the file runs in seconds on 2 CPU cores."""
import dataclasses
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

import llm
from llm import CONFIGS, IGNORE_INDEX, SYSTEM_PROMPT, LLMConfig, Llama, load_tokenizer, prompt_text, \
    tokenize_conversation

# GQA on purpose (4 query heads share 2 kv heads); vocab > 32 so id checks mean something
TINY = LLMConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    m = Llama(TINY).eval()
    with torch.no_grad():  # non-trivial norm weights so a wrong RMSNorm order would show
        for n, p in m.named_parameters():
            if n.endswith("layernorm.weight") or n == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    return m


def ids_batch(B=2, T=7, V=TINY.vocab_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (B, T), generator=g)


# ----------------------------------------------------------------------------- writers for every weight layout

def write_config(d, cfg, style="5", dtype=torch.float32):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg.to_hf(style, dtype), f, indent=2)


def state(model, dtype=None):
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return {k: v.to(dtype) for k, v in sd.items()} if dtype else sd


def split(sd, n):
    keys = list(sd)
    return [{k: sd[k] for k in keys[i::n]} for i in range(n)]


def write_index(d, name, shards, fmt):
    weight_map = {k: fmt.format(i + 1, len(shards)) for i, s in enumerate(shards) for k in s}
    total = sum(v.numel() * v.element_size() for s in shards for v in s.values())
    with open(os.path.join(d, name), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def write_layout(d, model, layout):
    """Write `model` in one of the layouts a user meets; returns the model whose logits the loaded one must match."""
    cfg = model.config
    if layout == "safetensors":
        write_config(d, cfg, "5")
        save_file(state(model), os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    elif layout == "sharded_safetensors":
        write_config(d, cfg, "5")
        shards = split(state(model), 3)
        fmt = "model-{:05d}-of-{:05d}.safetensors"
        for i, s in enumerate(shards):
            save_file(s, os.path.join(d, fmt.format(i + 1, 3)), metadata={"format": "pt"})
        write_index(d, "model.safetensors.index.json", shards, fmt)
    elif layout in ("vicuna_bin", "single_bin"):
        # Vicuna's real layout: 4.31 config, fp16 pickles with the fp32 legacy rotary_emb.inv_freq buffers
        write_config(d, cfg, "4.31", torch.float16)
        sd = state(model, torch.float16)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        for i in range(cfg.num_hidden_layers):
            sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
        if layout == "single_bin":
            torch.save(sd, os.path.join(d, "pytorch_model.bin"))
        else:
            shards = split(sd, 2)
            fmt = "pytorch_model-{:05d}-of-{:05d}.bin"
            for i, s in enumerate(shards):
                torch.save(s, os.path.join(d, fmt.format(i + 1, 2)))
            write_index(d, "pytorch_model.bin.index.json", shards, fmt)
        model = Llama(cfg).eval()
        model.load_state_dict({k: v.float() for k, v in sd.items() if "inv_freq" not in k})  # fp16-rounded
    else:
        raise ValueError(layout)
    return model


LAYOUTS = ["safetensors", "sharded_safetensors", "vicuna_bin", "single_bin"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_with_same_logits(tmp_path, tiny, layout):
    ref = write_layout(str(tmp_path), tiny, layout)
    loaded = Llama.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert loaded.config == TINY
    assert not any(p.is_meta for p in loaded.parameters()), "a parameter was left on the meta device"
    assert all(p.requires_grad for p in loaded.parameters())
    x = ids_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x), atol=0, rtol=0)


def test_bf16_load_and_auto_dtype(tmp_path, tiny):
    write_layout(str(tmp_path), tiny, "vicuna_bin")
    assert all(p.dtype == torch.bfloat16 for p in Llama.from_pretrained(str(tmp_path), torch.bfloat16).parameters())
    assert all(p.dtype == torch.float16 for p in Llama.from_pretrained(str(tmp_path), "auto").parameters())


def test_tied_checkpoint_without_lm_head(tmp_path):
    cfg = dataclasses.replace(TINY, tie_word_embeddings=True)
    m = Llama(cfg).eval()
    sd = {k: v for k, v in state(m).items() if k != "lm_head.weight"}  # HF leaves the tied head out
    write_config(str(tmp_path), cfg)
    save_file(sd, str(tmp_path / "model.safetensors"))
    loaded = Llama.from_pretrained(str(tmp_path))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = ids_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), atol=0, rtol=0)


# ----------------------------------------------------------------------------- strict loading and bad input

def _raises(exc, match, fn, *a):
    with pytest.raises(exc) as e:
        fn(*a)
    assert match in str(e.value), f"{match!r} not in error: {e.value}"
    assert "\n" not in str(e.value).strip(), "errors should be one line"
    return str(e.value)


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny):
    write_config(str(tmp_path), TINY)
    sd = state(tiny)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    _raises(ValueError, "1 missing: model.layers.1.mlp.up_proj.weight", Llama.from_pretrained, str(tmp_path))
    sd = state(tiny)
    sd["model.layers.2.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"].clone()  # a third layer we lack
    save_file(sd, str(tmp_path / "model.safetensors"))
    _raises(ValueError, "1 unexpected: model.layers.2.mlp.up_proj.weight (in model.safetensors)",
            Llama.from_pretrained, str(tmp_path))


def test_wrong_shape_is_named(tmp_path, tiny):
    write_config(str(tmp_path), TINY)
    sd = state(tiny)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)  # MHA-shaped k_proj; config says GQA (16, 32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    msg = _raises(ValueError, "model.layers.0.self_attn.k_proj.weight: checkpoint [32, 32]", Llama.from_pretrained,
                  str(tmp_path))
    assert "model [16, 32]" in msg


def test_truncated_shard_is_named(tmp_path, tiny):
    write_layout(str(tmp_path), tiny, "sharded_safetensors")
    shard = tmp_path / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    _raises(ValueError, "model-00002-of-00003.safetensors", Llama.from_pretrained, str(tmp_path))


def test_truncated_bin_is_named(tmp_path, tiny):
    write_layout(str(tmp_path), tiny, "vicuna_bin")
    shard = tmp_path / "pytorch_model-00001-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-300])
    _raises(ValueError, "pytorch_model-00001-of-00002.bin", Llama.from_pretrained, str(tmp_path))


def test_index_naming_missing_file(tmp_path, tiny):
    write_layout(str(tmp_path), tiny, "vicuna_bin")
    os.remove(tmp_path / "pytorch_model-00002-of-00002.bin")
    _raises(FileNotFoundError, "pytorch_model-00002-of-00002.bin", Llama.from_pretrained, str(tmp_path))


def test_index_disagreeing_with_shards(tmp_path, tiny):
    write_layout(str(tmp_path), tiny, "sharded_safetensors")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    key = next(k for k, v in index["weight_map"].items() if v.startswith("model-00001"))
    index["weight_map"][key] = "model-00002-of-00003.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises(ValueError, repr(key), Llama.from_pretrained, str(tmp_path))


def test_dir_without_config_or_weights(tmp_path, tiny):
    _raises(FileNotFoundError, "no config.json", Llama.from_pretrained, str(tmp_path))
    write_config(str(tmp_path), TINY)
    _raises(FileNotFoundError, "no weights found", Llama.from_pretrained, str(tmp_path))
    _raises(FileNotFoundError, "not a directory", Llama.from_pretrained, str(tmp_path / "nope"))


def test_bad_inputs(tiny):
    _raises(ValueError, "exactly one of", tiny)
    _raises(ValueError, "must lie in [0, 96)", tiny, torch.tensor([[1, 96]]))
    _raises(ValueError, "inputs_embeds must be (B, T, 32)", tiny, None, torch.zeros(1, 3, 8))
    _raises(ValueError, "attention_mask must be (B, T)", tiny, ids_batch(), None, torch.ones(2, 3))
    right_padded = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7])
    _raises(ValueError, "LEFT padding", tiny.generate, ids_batch(), None, right_padded)


# ----------------------------------------------------------------------------- config

VICUNA_CONFIG_JSON = {  # lmsys/vicuna-7b-v1.5 config.json (transformers 4.31), verbatim
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.31.0", "use_cache": True,
    "vocab_size": 32000}


def test_configs():
    assert LLMConfig.from_hf(VICUNA_CONFIG_JSON) == CONFIGS["vicuna_7b"]
    with torch.device("meta"):
        n = sum(p.numel() for p in Llama(CONFIGS["vicuna_7b"]).parameters())
    assert n == 6_738_415_616  # Vicuna-7B's parameter count
    hf5 = dict(CONFIGS["toy"].to_hf("5"), rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
    assert LLMConfig.from_hf(hf5) == dataclasses.replace(CONFIGS["toy"], rope_theta=500000.0)
    assert LLMConfig.from_hf(CONFIGS["toy"].to_hf("4.31")) == CONFIGS["toy"]
    with pytest.raises(ValueError, match="linear"):
        LLMConfig.from_hf(dict(VICUNA_CONFIG_JSON, rope_scaling={"type": "linear", "factor": 2.0}))
    with pytest.raises(KeyError, match="toy, vicuna_7b"):
        CONFIGS["vicuna_13b"]


# ----------------------------------------------------------------------------- numerics

def test_rmsnorm_order_in_fp16():
    """HF casts the fp32-normalised x back to fp16 *before* the weight multiply; doing the multiply in fp32 differs."""
    torch.manual_seed(0)
    norm = llm.RMSNorm(64, 1e-5).half()
    norm.weight.data = torch.rand(64).half() * 3
    x = torch.randn(4, 64).half() * 5
    x32 = x.float()
    want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).half()
    assert torch.equal(norm(x), want)


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = llm.rope_cos_sin(torch.tensor([[pq]]), 16, 10000.0, torch.float32)
        ck, sk = llm.rope_cos_sin(torch.tensor([[pk]]), 16, 10000.0, torch.float32)
        return (llm.apply_rope(q, cq, sq) * llm.apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(103, 100))
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_eager_reference_equals_sdpa(tiny):
    eager = Llama(dataclasses.replace(TINY, attn_impl="eager")).eval()
    eager.load_state_dict(tiny.state_dict())
    x = ids_batch()
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        torch.testing.assert_close(eager(x), tiny(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eager(x, attention_mask=mask), tiny(x, attention_mask=mask), atol=1e-5, rtol=1e-5)


def test_inputs_embeds_equals_input_ids_and_hidden_states(tiny):
    x = ids_batch()
    with torch.no_grad():
        logits, hs = tiny(x, output_hidden_states=True)
        assert torch.equal(tiny(inputs_embeds=tiny.embed(x)), logits)
    assert len(hs) == TINY.num_hidden_layers + 1 and all(h.shape == (2, 7, 32) for h in hs)
    assert torch.equal(hs[0], tiny.embed(x))
    torch.testing.assert_close(tiny.lm_head(hs[-1]), logits)


def test_right_padded_batch_equals_singles(tiny):
    lens = [7, 4, 2]
    x = ids_batch(B=3)
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lens])
    x = x.masked_fill(mask == 0, 0)
    with torch.no_grad():
        batched = tiny(x, attention_mask=mask)
        for b, n in enumerate(lens):
            torch.testing.assert_close(batched[b, :n], tiny(x[b:b + 1, :n])[0], atol=1e-5, rtol=1e-5)


def test_turn_isolation_gives_each_turn_its_logits_alone(tiny):
    # one row [prefix | turn 1 | turn 2 | padding] under llm.turn_isolation = two rows [prefix | turn k]
    g = torch.Generator().manual_seed(3)
    prefix, t1, t2 = (torch.randint(4, TINY.vocab_size, (n,), generator=g) for n in (5, 4, 6))
    row = torch.cat([prefix, t1, t2, torch.zeros(2, dtype=torch.long)])[None]  # (1, 17), 2 pads
    turn = torch.tensor([[0] * 5 + [1] * 4 + [2] * 8])  # padding continues the last turn
    mask, pos = llm.turn_isolation(turn)
    assert mask.shape == (1, 1, 17, 17) and pos[0].tolist() == list(range(9)) + list(range(5, 13))
    with torch.no_grad():
        packed = tiny(row, attention_mask=mask, position_ids=pos)[0]  # (17, V)
        alone1 = tiny(torch.cat([prefix, t1])[None])[0]
        alone2 = tiny(torch.cat([prefix, t2])[None])[0]
        plain = tiny(row)[0]
    torch.testing.assert_close(packed[:9], alone1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[9:15], alone2[5:], atol=1e-5, rtol=1e-5)
    assert (plain[9:15] - alone2[5:]).abs().max() > 1e-3  # without the mask turn 2 sees turn 1
    eager = Llama(dataclasses.replace(TINY, attn_impl="eager")).eval()  # the reference attention takes the mask too
    eager.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(eager(row, attention_mask=mask, position_ids=pos)[0], packed, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="4-D attention_mask must be bool"):
        tiny(row, attention_mask=mask.float(), position_ids=pos)
    with pytest.raises(ValueError, match="position_ids must be"):
        tiny(row, position_ids=pos[:, :3])


def test_kv_cache_generation_equals_full_recompute(tiny):
    x = ids_batch(B=2, T=5)
    new = tiny.generate(x, max_new_tokens=12)
    seq = x
    with torch.no_grad():
        for _ in range(12):  # no cache: recompute the whole sequence each step
            seq = torch.cat([seq, tiny(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(new, seq[:, 5:])
    assert torch.equal(tiny.generate(inputs_embeds=tiny.embed(x), max_new_tokens=12), new)


def test_left_padded_batched_generate_equals_single(tiny):
    prompts = [ids_batch(1, 6, seed=2)[0], ids_batch(1, 3, seed=3)[0], ids_batch(1, 1, seed=4)[0]]
    T = max(len(p) for p in prompts)
    x = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(T - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    batched = tiny.generate(x, attention_mask=mask, max_new_tokens=10)
    for b, p in enumerate(prompts):
        assert torch.equal(batched[b], tiny.generate(p[None], max_new_tokens=10)[0]), f"row {b}"


def test_eos_stops_and_pads(tiny):
    x = ids_batch(B=2, T=5)
    free = tiny.generate(x, max_new_tokens=8)
    eos = int(free[0, 2])  # make row 0 finish at step 2
    out = tiny.generate(x, max_new_tokens=8, eos_token_id=eos)
    first = (out[0] == eos).nonzero()[0, 0]
    assert first <= 2 and (out[0, first:] == eos).all()
    done = [(row == eos).any() for row in out]
    assert out.shape[1] == 8 or all(done)


def test_sampling(tiny):
    x = ids_batch(B=2, T=5)
    greedy = tiny.generate(x, max_new_tokens=6)
    # a nucleus so small it holds only the top token is greedy again
    assert torch.equal(tiny.generate(x, max_new_tokens=6, temperature=1.0, top_p=1e-6), greedy)
    a = tiny.generate(x, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = tiny.generate(x, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 6)


# ----------------------------------------------------------------------------- tokenizer (sentencepiece written here)

def _pb_varint(n):
    n &= (1 << 64) - 1  # negative int32 fields are encoded as 10-byte two's complement, like protobuf does
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb(field, value):
    """One protobuf field: int -> varint, float -> fixed32, bytes/str -> length-delimited."""
    if isinstance(value, bool) or isinstance(value, int):
        return _pb_varint(field << 3 | 0) + _pb_varint(int(value))
    if isinstance(value, float):
        return _pb_varint(field << 3 | 5) + struct.pack("<f", value)
    value = value.encode() if isinstance(value, str) else value
    return _pb_varint(field << 3 | 2) + _pb_varint(len(value)) + value


# normal pieces, in id order, best merge first (score = -rank as in Llama's model); single chars last
MERGED = ["▁h", "ll", "▁he", "llo", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "▁▁"]
CHARS = ["▁", "h", "e", "l", "o", "w", "r", "d", "!"]


def write_sp_model(path, add_dummy_prefix=True):
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    pieces += [(p, -float(i), 1) for i, p in enumerate(MERGED + CHARS)]
    model = b"".join(_pb(1, _pb(1, p) + _pb(2, s) + (_pb(3, t) if t != 1 else b"")) for p, s, t in pieces)
    trainer = _pb(3, 2) + _pb(4, len(pieces)) + _pb(35, True) + _pb(40, 0) + _pb(41, 1) + _pb(42, 2) + _pb(43, -1)
    normalizer = _pb(1, "identity") + _pb(3, add_dummy_prefix) + _pb(4, False)
    with open(path, "wb") as f:
        f.write(model + _pb(2, trainer) + _pb(3, normalizer))
    return {p: i for i, (p, _, _) in enumerate(pieces)}


def test_protobuf_reader_reads_our_writer(tmp_path):
    vocab = write_sp_model(str(tmp_path / "tokenizer.model"))
    pieces, trainer, normalizer = llm.read_sentencepiece_model(str(tmp_path / "tokenizer.model"))
    assert [p for p, _, _ in pieces] == list(vocab)
    assert pieces[0][2] == 2 and pieces[1][2] == 3 and pieces[3] == ("<0x00>", 0.0, 6)
    assert pieces[vocab["▁world"]] == ("▁world", -9.0, 1)
    assert trainer[3] == 2 and trainer[35] == 1 and trainer[43] == 2**64 - 1 and normalizer[4] == 0
    (tmp_path / "bad.model").write_bytes(b"\x0a\xff\x01ab")  # a piece claiming 255 bytes
    _raises(ValueError, "bad.model", llm.read_sentencepiece_model, str(tmp_path / "bad.model"))


def test_tokenizer_from_sentencepiece(tmp_path):
    v = write_sp_model(str(tmp_path / "tokenizer.model"))
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("hello world").ids == [1, v["▁hello"], v["▁world"]]  # BOS + merges in score order
    assert tok.encode("hello").tokens == ["<s>", "▁hello"]
    assert tok.encode("hello world!").ids[-1] == v["!"]
    # byte fallback: é is not a piece -> its two UTF-8 bytes; 😀 -> four
    assert tok.encode("hé").ids == [1, v["▁h"], v["<0xC3>"], v["<0xA9>"]]
    assert tok.encode("😀").ids == [1, v["▁"], v["<0xF0>"], v["<0x9F>"], v["<0x98>"], v["<0x80>"]]
    # special tokens in text; non-legacy (Vicuna v1.5): no dummy "▁" after a special token ("</s>USER" -> "USER")
    assert tok.encode("hello</s>world").ids == [1, v["▁hello"], 2, v["w"], v["or"], v["ld"]]
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2 and tok.token_to_id("<unk>") == 0
    for text in ["hello world", "hé 😀 hello!", "hello  world", "world\nhello"]:
        assert tok.decode(tok.encode(text).ids) == text, text
    assert tok.decode(tok.encode("hello</s>").ids, skip_special_tokens=False) == "<s> hello</s>"


def test_tokenizer_config_legacy_and_json_precedence(tmp_path):
    v = write_sp_model(str(tmp_path / "tokenizer.model"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": True, "add_eos_token": True}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("hello</s>world").ids == [1, v["▁hello"], 2, v["▁world"], 2]  # legacy: "▁" after </s>
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer.model").write_bytes(b"")  # tokenizer.json must win; the broken .model is never read
    assert load_tokenizer(str(tmp_path)).encode("hello").ids == [1, v["▁hello"], 2]
    _raises(FileNotFoundError, "no tokenizer.json or tokenizer.model", load_tokenizer, str(tmp_path / ".."))


REAL_TOKENIZER = os.environ.get("LLAMA_TOKENIZER_MODEL")  # e.g. llama2.c's tokenizer.model (== Vicuna's)


@pytest.mark.skipif(not REAL_TOKENIZER, reason="set LLAMA_TOKENIZER_MODEL to the real Llama-2 tokenizer.model")
def test_real_llama_tokenizer_vectors():
    tok = load_tokenizer(REAL_TOKENIZER)
    vectors = {"Hello world!": [1, 15043, 3186, 29991], "Hello this is a test": [1, 15043, 445, 338, 263, 1243],
               " grabbed": [1, 2646, 1327, 287], "\n": [1, 29871, 13], "ax\n####\nboo": [1, 4853, 13, 4136, 13, 833,
               29877], "🦙": [1, 29871, 243, 162, 169, 156], "镇": [1, 29871, 30411]}  # " grabbed": non-legacy
    for text, want in vectors.items():
        assert tok.encode(text).ids == want, text
    ids, labels = tokenize_conversation(tok, [("What is it?", "A cat."), ("Color?", "Orange.")])
    assert [tok.id_to_token(i) for i in labels if i != IGNORE_INDEX] == \
        ["▁A", "▁cat", ".", "</s>", "▁Orange", ".", "</s>"]  # LLaVA's preprocess_v1 supervises exactly these
    assert ids[ids.index(2) + 1] == 11889  # "USER" after "</s>" is one token, as in LLaVA training


# ----------------------------------------------------------------------------- template

def char_tokenizer():
    """A stand-in for train.py's toy tokenizer: one token per character, no post-processor (so no BOS of its own)."""
    from tokenizers import AddedToken, Tokenizer, models
    chars = sorted(set(SYSTEM_PROMPT + "USERASSISTANT: What is it?A cat.Color?Orange.!"))
    tok = Tokenizer(models.BPE({"<unk>": 0} | {c: i + 1 for i, c in enumerate(chars)}, [], unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "</s>")])
    return tok


def test_prompt_text():
    assert prompt_text("What is it?") == SYSTEM_PROMPT + " USER: What is it? ASSISTANT:"
    assert prompt_text("Hi", system="") == "USER: Hi ASSISTANT:"


@pytest.mark.parametrize("which", ["char", "sentencepiece"])
def test_tokenize_conversation_label_mask(tmp_path, which):
    if which == "char":
        tok = char_tokenizer()
    else:
        write_sp_model(str(tmp_path / "tokenizer.model"))
        tok = load_tokenizer(str(tmp_path))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    turns = [("What is it?", "A cat."), ("Color?", "Orange.")]
    ids, labels = tokenize_conversation(tok, turns)
    assert len(ids) == len(labels) and ids[0] == bos and labels[0] == IGNORE_INDEX and ids.count(bos) == 1
    assert tok.decode(ids, skip_special_tokens=False).replace(" ", "").replace("<s>", "") == \
        (SYSTEM_PROMPT + " USER: What is it? ASSISTANT: A cat.</s>USER: Color? ASSISTANT: Orange.</s>").replace(" ", "")
    sup = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(ids, labels))
    assert sup.count(eos) == 2 and labels[-1] == eos  # each answer's </s> is supervised
    pieces = tok.decode(sup, skip_special_tokens=True)
    assert pieces.replace(" ", "") == "Acat.Orange."
    # the first supervised token starts the first answer: nothing from the prompt leaks into the labels
    first = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX)
    assert tok.decode(ids[:first], skip_special_tokens=True).replace(" ", "").endswith("ASSISTANT:")
    # the inference prompt is a prefix of the training conversation's tokens (same tokenization of the question)
    prompt_ids = tok.encode(prompt_text("What is it?")).ids
    prompt_ids = prompt_ids if prompt_ids[0] == bos else [bos] + prompt_ids
    assert ids[:len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("system", [SYSTEM_PROMPT, ""])
def test_tokenize_turns_user_labels_and_turn_ids(system):
    tok = char_tokenizer()
    turns = [("What is it?", "A cat."), ("Color?", "Orange.")]
    ids, labels, user, turn = llm.tokenize_turns(tok, turns, system)
    assert (ids, labels) == tuple(tokenize_conversation(tok, turns, system))
    assert len(user) == len(turn) == len(ids) and turn[0] == 0 and turn == sorted(turn)
    squash = lambda xs: tok.decode(xs, skip_special_tokens=False).replace(" ", "").replace("\u2581", "")
    assert squash([i for i, t in zip(ids, turn) if t == 0]) == "<s>" + system.replace(" ", "")
    for k, (q, a) in enumerate(turns, 1):
        assert squash([i for i, t in zip(ids, turn) if t == k]) == f"USER:{q}ASSISTANT:{a}</s>".replace(" ", "")
        asked = [u for u, t in zip(user, turn) if t == k and u != IGNORE_INDEX]
        assert squash(asked) == f"USER:{q}ASSISTANT:".replace(" ", "")
    for l, u, t in zip(labels, user, turn):  # in a turn every token is an answer label or a user label, not both
        assert (l == u == IGNORE_INDEX) if t == 0 else ((l == IGNORE_INDEX) != (u == IGNORE_INDEX))


def test_tokenize_conversation_needs_single_eos_token():
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(set(SYSTEM_PROMPT + "USERASIT: ab</>")))}, []))
    tok.add_tokens(["<s>"])  # has <s> but "</s>" is not a token
    with pytest.raises(ValueError, match="'<s>' and '</s>'"):
        tokenize_conversation(tok, [("a", "b")])


# ----------------------------------------------------------------------------- optional: transformers as the reference

@pytest.mark.parametrize("layout", ["safetensors", "vicuna_bin"])
def test_matches_transformers(tmp_path, tiny, layout):
    transformers = pytest.importorskip("transformers")
    tiny = write_layout(str(tmp_path), tiny, layout)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    x = ids_batch(B=2, T=9)
    with torch.no_grad():
        torch.testing.assert_close(tiny(x), hf(x).logits, atol=1e-5, rtol=1e-5)
        theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, eos_token_id=None, pad_token_id=0)[:, 9:]
    assert torch.equal(tiny.generate(x, max_new_tokens=12), theirs)
