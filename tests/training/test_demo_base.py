"""The demo base build: HF-loadable output, chat template, cache, determinism, validation.

Every build here uses ``DemoBaseConfig.tiny()`` (one small layer, three steps): these
tests check the build's mechanics, not what the model learns, except
``test_training_learns_the_corpus``, which trains a little longer.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from training import demo_base
from training.corpus import SEATS
from training.demo_base import (
    MANIFEST_NAME,
    DemoBaseConfig,
    DemoBaseConfigError,
    NotADemoBaseError,
    build_demo_base,
    read_manifest,
)
from training.demo_tokenizer import BOS_TOKEN, END_OF_TURN_TOKEN, EOS_TOKEN, PAD_TOKEN

TINY = DemoBaseConfig.tiny()

QUESTION = [{"role": "user", "content": "What color is the sky?"}]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_base(tmp_path_factory.mktemp("demo") / "base", TINY, progress=False)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_build_is_a_float32_llama_that_auto_classes_load(built: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(built)
    tokenizer = AutoTokenizer.from_pretrained(built)

    assert model.config.model_type == "llama"
    assert model.config.hidden_size == TINY.hidden_size
    assert model.config.num_hidden_layers == TINY.num_layers
    assert {tensor.dtype for tensor in _weights(built).values()} == {torch.float32}
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("The cat sat on the", return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))


def test_tokenizer_has_llama3_special_tokens(built: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built)

    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        BOS_TOKEN,
        EOS_TOKEN,
        PAD_TOKEN,
    )
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    eot_id = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    assert eot_id != tokenizer.unk_token_id
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(END_OF_TURN_TOKEN))[-1] == (
        END_OF_TURN_TOKEN
    )


def test_generation_stops_at_end_of_turn_and_end_of_text(built: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built)
    generation = GenerationConfig.from_pretrained(built)

    eot_id = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    assert set(generation.eos_token_id) == {eot_id, tokenizer.eos_token_id}
    assert generation.pad_token_id == tokenizer.pad_token_id


def test_plain_prompt_starts_with_one_bos_and_round_trips(built: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built)
    text = "The cat sat on the mat. Zebras & émojis 🐱 still encode."

    ids = tokenizer(text)["input_ids"]

    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_renders_generation_prompt(built: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built)

    rendered = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)

    assert rendered == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "What color is the sky?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_chat_template_round_trips_through_token_ids(built: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built)
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        *QUESTION,
        {"role": "assistant", "content": "The sky is blue."},
    ]

    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]

    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)) == 3
    assert tokenizer.decode(ids) == rendered


def test_chat_template_is_saved_where_servers_read_it(built: Path) -> None:
    tokenizer_config = json.loads((built / "tokenizer_config.json").read_text())
    template_file = built / "chat_template.jinja"

    saved = tokenizer_config.get("chat_template") or template_file.read_text()

    assert "<|start_header_id|>" in saved


def test_manifest_records_config_hash(built: Path) -> None:
    manifest = read_manifest(built)

    assert manifest is not None
    assert manifest["config_hash"] == TINY.fingerprint()
    assert manifest["config"]["hidden_size"] == TINY.hidden_size


def test_second_call_returns_cached_build_without_rebuilding(
    built: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_build_into_must_not_run(*args: object) -> None:
        raise AssertionError("a cached build was rebuilt")

    monkeypatch.setattr(demo_base, "_build_into", fake_build_into_must_not_run)
    before = (built / "model.safetensors").stat().st_mtime_ns

    assert build_demo_base(built, TINY, progress=False) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == before


def test_changed_config_rebuilds_in_place(tmp_path: Path) -> None:
    out_dir = build_demo_base(tmp_path / "base", TINY, progress=False)
    changed = replace(TINY, train_steps=4)

    build_demo_base(out_dir, changed, progress=False)

    manifest = read_manifest(out_dir)
    assert manifest is not None
    assert manifest["config_hash"] == changed.fingerprint()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".base.lock", "base"]


def test_two_builds_with_one_config_are_identical(built: Path, tmp_path: Path) -> None:
    again = build_demo_base(tmp_path / "again", TINY, progress=False)

    first, second = _weights(built), _weights(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert (built / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_different_seed_gives_different_weights(built: Path, tmp_path: Path) -> None:
    seeded = replace(TINY, seed=1)
    other = build_demo_base(tmp_path / "other", seeded, progress=False)

    first, second = _weights(built), _weights(other)
    assert not torch.equal(first["lm_head.weight"], second["lm_head.weight"])


class SimulatedKill(BaseException):
    """Stands in for a signal: not an Exception, so no ``except Exception`` swallows it."""


def test_failed_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build_into = demo_base._build_into

    def build_then_crash(model_dir: Path, config: DemoBaseConfig, progress: bool) -> None:
        real_build_into(model_dir, config, progress)
        raise SimulatedKill("killed before installing")

    monkeypatch.setattr(demo_base, "_build_into", build_then_crash)

    with pytest.raises(SimulatedKill):
        build_demo_base(tmp_path / "base", TINY, progress=False)

    assert [p.name for p in tmp_path.iterdir()] == [".base.lock"]


def test_stale_scratch_from_a_killed_build_is_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".base.building-killed"
    (stale / "half").mkdir(parents=True)

    build_demo_base(tmp_path / "base", TINY, progress=False)

    assert not stale.exists()


def test_concurrent_builders_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real_build_into = demo_base._build_into

    def counting_build_into(model_dir: Path, config: DemoBaseConfig, progress: bool) -> None:
        calls.append(model_dir)
        real_build_into(model_dir, config, progress)

    monkeypatch.setattr(demo_base, "_build_into", counting_build_into)
    results: list[Path] = []
    builders = [
        threading.Thread(
            target=lambda: results.append(build_demo_base(tmp_path / "base", TINY, progress=False))
        )
        for _ in range(2)
    ]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join()

    assert results == [tmp_path / "base"] * 2
    assert len(calls) == 1
    assert read_manifest(tmp_path / "base") is not None


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    foreign = tmp_path / "my-model"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")

    with pytest.raises(NotADemoBaseError, match="choose another output directory"):
        build_demo_base(foreign, TINY, progress=False)

    assert (foreign / "config.json").read_text() == "{}"
    assert not (foreign / MANIFEST_NAME).exists()


def test_validate_lists_every_problem() -> None:
    config = DemoBaseConfig(
        hidden_size=100,
        num_heads=3,
        vocab_size=10,
        train_steps=0,
        learning_rate=-1.0,
        seq_len=4096,
        max_position_embeddings=1024,
    )

    with pytest.raises(DemoBaseConfigError) as caught:
        config.validate()

    problems = caught.value.problems
    for field in ("vocab_size", "train_steps", "divisible by num_heads", "seq_len (4096)"):
        assert any(field in problem for problem in problems), field
    assert any(p.startswith("learning_rate") for p in problems)
    assert any(p.startswith("warmup_steps") for p in problems)
    assert len(problems) == 6
    assert all(problem in str(caught.value) for problem in problems)


def test_validate_rejects_head_size_vllm_cpu_cannot_run() -> None:
    with pytest.raises(DemoBaseConfigError, match="head size"):
        DemoBaseConfig(hidden_size=64, num_heads=4).validate()


def test_default_config_is_valid() -> None:
    DemoBaseConfig().validate()


def test_build_validates_before_touching_the_disk(tmp_path: Path) -> None:
    with pytest.raises(DemoBaseConfigError):
        build_demo_base(tmp_path / "base", DemoBaseConfig(train_steps=0), progress=False)

    assert list(tmp_path.iterdir()) == []


def test_training_learns_the_corpus(tmp_path: Path) -> None:
    """A short real run: loss falls far below chance, and after "The cat sat on the" most
    of the next-token probability goes to the corpus's seats (chance: about 2%)."""
    config = replace(
        TINY,
        corpus_documents=500,
        train_steps=100,
        batch_size=8,
        seq_len=64,
        learning_rate=1e-2,
        warmup_steps=5,
    )
    model_dir = build_demo_base(tmp_path / "base", config, progress=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    ids = tokenizer("The cat sat on the", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_token = model(input_ids=ids).logits[0, -1].softmax(-1)
    seat_ids = {tokenizer(f" {seat}", add_special_tokens=False)["input_ids"][0] for seat in SEATS}

    manifest = read_manifest(model_dir)
    assert manifest is not None
    assert manifest["final_loss"] < 0.3 * math.log(len(tokenizer))
    assert float(next_token[sorted(seat_ids)].sum()) > 0.4
