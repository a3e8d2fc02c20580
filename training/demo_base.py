"""The demo base model: a tiny Llama trained from nothing, so loraplex needs no model hub.

``build_demo_base`` generates a corpus (``training.corpus``), trains a byte-level BPE
tokenizer on it (``training.demo_tokenizer``), trains a few-million-parameter Llama on
it for about a minute and a half of two CPU cores, and saves both in Hugging Face
format (float32 safetensors). Anything that loads a real model (transformers, PEFT,
vLLM) loads this one the same way, from its directory.

The build is deterministic (fixed seeds, fixed thread count, generated corpus) and
cached: the directory records a hash of the config it was built from, and a second
call with the same config returns at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from tqdm import tqdm
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from training.build_dir import build_lock, install, remove_stale_scratch, scratch_dir
from training.corpus import generate_corpus
from training.demo_tokenizer import END_OF_TURN_TOKEN, MIN_VOCAB_SIZE, train_tokenizer

MANIFEST_NAME = "loraplex_demo_base.json"
"""Written last into a finished build; its config hash makes the build a cache entry."""

RECIPE_VERSION = 3
"""Part of the config hash: bump it when the corpus, tokenizer or training code changes
what a given config builds, so that cached builds are rebuilt."""

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes vLLM 0.32's CPU attention backend accepts (it rejected 16 on these machines)."""


class DemoBaseConfigError(ValueError):
    """The demo base config is invalid; the message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"invalid demo base config, fix these fields:\n{lines}")


class NotADemoBaseError(FileExistsError):
    """The output directory holds something other than a demo base build."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"{path} exists and is not a loraplex demo base build (no {MANIFEST_NAME}); "
            "choose another output directory or remove this one"
        )


@dataclass(frozen=True)
class DemoBaseConfig:
    """What to build. Every field is part of the cache key."""

    hidden_size: int = 256
    """Width of the residual stream."""

    num_layers: int = 4
    """Number of transformer blocks."""

    num_heads: int = 4
    """Attention heads; ``hidden_size / num_heads`` must be a head size vLLM's CPU kernels
    accept (64 is the safe choice: they reject 16)."""

    intermediate_size: int = 768
    """Width of each block's SwiGLU MLP."""

    vocab_size: int = 2048
    """Target BPE vocabulary size, special tokens included (the corpus may yield fewer)."""

    max_position_embeddings: int = 2048
    """Longest sequence the model (and its tokenizer) declares it handles."""

    tie_word_embeddings: bool = False
    """Share the input embedding and output projection weights."""

    corpus_documents: int = 8000
    """Documents generated for the corpus (sentences, stories, chats)."""

    train_steps: int = 150
    """Optimizer steps; the build time is roughly proportional to this."""

    batch_size: int = 16
    """Sequences per step."""

    seq_len: int = 128
    """Tokens per training sequence (windows cut from the packed corpus)."""

    learning_rate: float = 3e-3
    """Peak AdamW learning rate, reached after warmup and decayed by cosine to a tenth."""

    warmup_steps: int = 20
    """Steps of linear learning-rate warmup."""

    seed: int = 0
    """Seeds the corpus, the weight initialisation and the batch sampling."""

    num_threads: int = 2
    """Torch CPU threads while building; fixed because it changes float summation order."""

    @classmethod
    def tiny(cls) -> DemoBaseConfig:
        """One small layer, three steps, one thread: builds in about a second. For tests that
        need a real Hugging Face model directory, not a model that writes well."""
        return cls(
            hidden_size=64,
            num_layers=1,
            num_heads=1,
            intermediate_size=128,
            vocab_size=400,
            max_position_embeddings=256,
            corpus_documents=200,
            train_steps=3,
            batch_size=2,
            seq_len=32,
            warmup_steps=1,
            # Tiny matrices gain nothing from a second thread, and on a busy machine
            # spinning OpenMP threads slow down by an order of magnitude.
            num_threads=1,
        )

    def validate(self) -> None:
        """Raise ``DemoBaseConfigError`` listing every invalid field at once."""
        problems = [
            f"{name} must be at least {minimum}, got {getattr(self, name)}"
            for name, minimum in _MINIMUMS.items()
            if getattr(self, name) < minimum
        ]
        if self.num_heads >= 1 and self.hidden_size % self.num_heads:
            problems.append(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        elif self.num_heads >= 1 and self.hidden_size // self.num_heads not in SUPPORTED_HEAD_DIMS:
            problems.append(
                f"hidden_size / num_heads = {self.hidden_size // self.num_heads} is not a head "
                f"size vLLM's CPU attention accepts; use one of {SUPPORTED_HEAD_DIMS}"
            )
        if self.seq_len > self.max_position_embeddings:
            problems.append(
                f"seq_len ({self.seq_len}) must not exceed max_position_embeddings "
                f"({self.max_position_embeddings})"
            )
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            problems.append(f"learning_rate must be a positive number, got {self.learning_rate}")
        if self.warmup_steps > self.train_steps:
            problems.append(
                f"warmup_steps ({self.warmup_steps}) must not exceed train_steps "
                f"({self.train_steps})"
            )
        if problems:
            raise DemoBaseConfigError(problems)

    def fingerprint(self) -> str:
        """SHA-256 over the config and the recipe version: the build's cache key."""
        canonical = json.dumps({"recipe": RECIPE_VERSION, "config": asdict(self)}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


_MINIMUMS = {
    "hidden_size": 1,
    "num_layers": 1,
    "num_heads": 1,
    "intermediate_size": 1,
    "vocab_size": MIN_VOCAB_SIZE,
    "max_position_embeddings": 2,
    "corpus_documents": 1,
    "train_steps": 1,
    "batch_size": 1,
    "seq_len": 2,
    "warmup_steps": 0,
    "seed": 0,
    "num_threads": 1,
}


def build_demo_base(
    out_dir: Path, config: DemoBaseConfig | None = None, progress: bool = True
) -> Path:
    """Build (or return the cached) demo base at out_dir."""
    config = config or DemoBaseConfig()
    config.validate()
    out_dir = Path(out_dir)
    fingerprint = config.fingerprint()
    if not _needs_build(out_dir, fingerprint):
        _say(progress, f"Demo base model already built at {out_dir} (cached)")
        return out_dir
    with build_lock(out_dir, announce=progress):
        # Another builder may have finished while this one waited for the lock.
        if _needs_build(out_dir, fingerprint):
            remove_stale_scratch(out_dir)
            with scratch_dir(out_dir) as scratch:
                _build_into(scratch, config, progress)
                install(scratch, out_dir)
    _say(progress, f"Demo base model written to {out_dir}")
    return out_dir


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The build record of a finished demo base at ``model_dir``, or None if there is none."""
    try:
        manifest: dict[str, Any] = json.loads((model_dir / MANIFEST_NAME).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return manifest


def _needs_build(out_dir: Path, fingerprint: str) -> bool:
    """False if ``out_dir`` holds this exact build; raises if it holds something foreign."""
    manifest = read_manifest(out_dir)
    if manifest is not None:
        return bool(manifest.get("config_hash") != fingerprint)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise NotADemoBaseError(out_dir)
    return True


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, file=sys.stderr)


def _build_into(model_dir: Path, config: DemoBaseConfig, progress: bool) -> None:
    """Generate, tokenize, train and save everything into the empty ``model_dir``."""
    started = time.monotonic()
    with _torch_threads(config.num_threads):
        corpus = generate_corpus(config.corpus_documents, config.seed)
        tokenizer = train_tokenizer(
            corpus.tokenizer_texts(), config.vocab_size, config.max_position_embeddings
        )
        stream = _token_stream(corpus.texts, corpus.chats, tokenizer, config.seed)
        model = _new_model(config, tokenizer)
        final_loss = _train(model, stream, config, progress)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    manifest = {
        "config_hash": config.fingerprint(),
        "recipe_version": RECIPE_VERSION,
        "config": asdict(config),
        "final_loss": final_loss,
        "build_seconds": round(time.monotonic() - started, 1),
        "libraries": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    # Written last: its presence is what marks the build finished.
    (model_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _token_stream(
    texts: list[str],
    chats: list[list[dict[str, str]]],
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
) -> torch.Tensor:
    """All documents as one shuffled stream of token ids, each delimited as at inference."""
    eos = [tokenizer.eos_token_id]
    # verbose=False: documents longer than model_max_length are fine, they are packed.
    encoded = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    plain = [ids + eos for ids in encoded]
    rendered = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    # The rendered chat already starts with bos and ends with the end-of-turn token.
    chat_ids = tokenizer(rendered, add_special_tokens=False, verbose=False)["input_ids"]
    documents = plain + chat_ids
    random.Random(seed).shuffle(documents)
    return torch.tensor([token for doc in documents for token in doc], dtype=torch.long)


def _new_model(config: DemoBaseConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised float32 Llama sized by ``config``, seeded for determinism."""
    stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)]
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(model_config)
    # Chat replies end with the end-of-turn token: generation must stop there too.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def _learning_rate_factor(step: int, config: DemoBaseConfig) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.train_steps - config.warmup_steps)
    progress = (step - config.warmup_steps) / span
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _train(
    model: LlamaForCausalLM, stream: torch.Tensor, config: DemoBaseConfig, progress: bool
) -> float:
    """Train on random windows of ``stream``; returns the last step's loss."""
    if stream.numel() <= config.seq_len:
        raise DemoBaseConfigError(
            [
                f"corpus_documents ({config.corpus_documents}) gives {stream.numel()} tokens, "
                f"too few for one window of seq_len ({config.seq_len}): raise it"
            ]
        )
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.1
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(step, config)
    )
    model.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(
        range(config.train_steps),
        desc="Training demo base",
        unit="step",
        file=sys.stderr,
        disable=not progress,
    )
    for _ in bar:
        starts = torch.randint(
            0, stream.numel() - config.seq_len, (config.batch_size,), generator=generator
        )
        batch = torch.stack([stream[start : start + config.seq_len] for start in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return round(float(loss.item()), 4)
