"""Make a local, hub-free causal-LM directory with random weights and a tokenizer.

``make_model("tiny", out)`` is small enough for CPU tests; ``"qwen3-0.6b"`` has
Qwen3-0.6B's exact shape (hidden 1024, 28 layers, 16/8 heads, head_dim 128,
intermediate 3072, vocab 151936, tied embeddings). Weights are seeded, so two
makes of one config are byte-identical. The tokenizer is a byte-level BPE
trained on a small built-in text (deterministic, offline) with ChatML special
tokens and a chat template, loadable by ``AutoTokenizer.from_pretrained(out)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from warmstart.errors import UsageError

CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=3072,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=1024,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        initializer_range=0.3,  # sharper logits: varied greedy text, not one repeated token
        torch_dtype="float32",
    ),
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SEED = 20240604

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A warm start restores a served model in seconds.
Inference servers load weights, allocate a key value cache, capture graphs and then listen.
Checkpoint and restore: freeze the process, write its memory, and bring it back elsewhere.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
Once upon a time there was a small language model that answered every question with care.
def main():\n    print("hello")\n    return 0\n
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000; punctuation . , ; : ! ? ( ) [ ] { } " ' - _ / \\ @ # $ % & *
The system prompt says: you are a helpful assistant. The user asks, the assistant answers.
"""


def _build_tokenizer(out_dir: Path, vocab_size: int, max_len: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 4096),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2)
    )
    return tok.get_vocab_size()


def make_model(config: str, out_dir: str | os.PathLike[str]) -> Path:
    """Write the model directory ``out_dir`` (created; must be absent or empty)."""
    if config not in CONFIGS:
        raise UsageError(
            f"unknown model config {config!r}", hint=f"choose one of: {', '.join(CONFIGS)}"
        )
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory", hint="pick a new path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out}: {exc.strerror}") from None

    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    shape = dict(CONFIGS[config])
    dtype = getattr(torch, shape.pop("torch_dtype"))
    n_tok = _build_tokenizer(out, shape["vocab_size"], shape["max_position_embeddings"])
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab()
    eos, pad, bos = ids["<|im_end|>"], ids["<|endoftext|>"], ids["<|endoftext|>"]
    assert n_tok <= shape["vocab_size"]

    cfg = Qwen3Config(
        **shape,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=bos,
        use_sliding_window=False,
        attention_bias=False,
        hidden_act="silu",
        rms_norm_eps=1e-6,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        model = Qwen3ForCausalLM(cfg).to(dtype)
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=bos, do_sample=False).save_pretrained(out)
    return out
