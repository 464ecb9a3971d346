from __future__ import annotations

import hashlib
import json

import pytest

from warmstart.errors import UsageError
from warmstart.serve.modelmake import CONFIGS, make_model


def digest(d):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def test_tiny_is_deterministic_and_loadable(tmp_path):
    a, b = make_model("tiny", tmp_path / "a"), make_model("tiny", tmp_path / "b")
    da = digest(a)
    assert da == digest(b)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(da)
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(a, local_files_only=True)
    assert cfg.model_type == "qwen3" and cfg.tie_word_embeddings and cfg.num_hidden_layers == 2
    tok = AutoTokenizer.from_pretrained(a, local_files_only=True)
    ids = tok("Hello world")["input_ids"]
    assert tok.decode(ids) == "Hello world"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((a / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_qwen3_shape_is_declared():
    q = CONFIGS["qwen3-0.6b"]
    assert (q["hidden_size"], q["num_hidden_layers"], q["num_attention_heads"], q["num_key_value_heads"],
            q["head_dim"], q["intermediate_size"], q["vocab_size"], q["tie_word_embeddings"]) == (
        1024, 28, 16, 8, 128, 3072, 151936, True)


def test_unknown_config(tmp_path):
    with pytest.raises(UsageError, match="unknown model config 'huge'"):
        make_model("huge", tmp_path / "x")


def test_nonempty_out_dir(tmp_path):
    (tmp_path / "keep").write_text("x")
    with pytest.raises(UsageError, match="not an empty directory"):
        make_model("tiny", tmp_path)
