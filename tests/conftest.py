"""Shared fixtures: tiny random models built from a config, the SmolLM2 tokenizer, a BOS-adding tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared holds the real third-party data)")
    return path


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (pad == eos == <|im_end|> = 2, no BOS on text, ChatML template)."""
    from transformers import AutoTokenizer

    from rmtorch.modeling import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def make_bos_tokenizer():
    """A word-level tokenizer that adds BOS <s> to every text, with a distinct pad and a chat template (TRL spec §8)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "what color is the sky ? blue green red the is a an of to and in it you I how many are 1 2 3 4 5 6 7 8 9 0 + - = . , ! hello world yes no answer question good bad think".split()
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }}{% endfor %}"
    return tokenizer


@pytest.fixture(scope="session")
def bos_tokenizer():
    return make_bos_tokenizer()


def tiny_llama(vocab_size: int, seed: int = 0, pad_token_id: int | None = None, **overrides):
    """2-layer hidden-32 LlamaForSequenceClassification (num_labels=1) with an N(0,1) score head (visible rewards)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=pad_token_id, max_position_embeddings=512, **overrides,
    )
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model.eval()


def save_tiny_llama(directory: Path, tokenizer, seed: int = 0, causal: bool = False) -> Path:
    """Write a tiny Llama (seq-cls, or causal LM with no head) and its tokenizer as a loadable directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if causal:
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512)
        model = LlamaForCausalLM(config)
    else:
        model = tiny_llama(len(tokenizer), seed=seed, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """train.main builds an Accelerator; accelerate keeps its state process-wide, so tests that train with
    different precisions in one pytest process start from a clean state."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
