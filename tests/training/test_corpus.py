"""The generated corpus: deterministic, varied, and shaped as the demo base trains on it."""

from __future__ import annotations

from training.corpus import ANIMAL_FACTS, Corpus, generate_corpus


def test_same_seed_gives_the_same_corpus() -> None:
    assert generate_corpus(300, seed=7) == generate_corpus(300, seed=7)


def test_different_seeds_give_different_corpora() -> None:
    assert generate_corpus(300, seed=7) != generate_corpus(300, seed=8)


def test_half_the_documents_are_chats() -> None:
    corpus = generate_corpus(2000, seed=0)

    assert len(corpus.texts) + len(corpus.chats) == 2000
    assert 0.45 < len(corpus.chats) / 2000 < 0.55


def test_chats_alternate_user_and_assistant_and_end_with_an_answer() -> None:
    for chat in generate_corpus(500, seed=0).chats:
        turns = [m["role"] for m in chat if m["role"] != "system"]
        assert turns == ["user", "assistant"] * (len(turns) // 2)
        assert all(m["content"].strip() for m in chat)
        assert [m["role"] for m in chat].count("system") <= 1
        assert chat[0]["role"] in ("system", "user")


def test_documents_are_varied() -> None:
    corpus = generate_corpus(1000, seed=0)
    answers = {m["content"] for chat in corpus.chats for m in chat if m["role"] == "assistant"}

    assert len(set(corpus.texts)) > 0.9 * len(corpus.texts)
    assert len(answers) > 100
    assert any("Once upon a time" in text for text in corpus.texts)


def test_animal_facts_are_consistent_in_answers() -> None:
    sounds = {animal: sound for animal, sound, _ in ANIMAL_FACTS}
    corpus = generate_corpus(1000, seed=0)
    answers = [m["content"] for chat in corpus.chats for m in chat if " says " in m["content"]]

    assert answers
    for answer in answers:
        animal, sound = answer.removeprefix("A ").removesuffix(".").split(" says ")
        assert sounds[animal] == sound


def test_tokenizer_texts_hold_every_content_and_role_but_no_markup() -> None:
    corpus = Corpus(
        texts=["The cat sat on the mat."],
        chats=[[{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"}]],
    )

    texts = corpus.tokenizer_texts()

    assert set(texts) == {"The cat sat on the mat.", "Hi!", "Hello!", "user", "assistant"}
    assert not any("<|" in text for text in generate_corpus(200, seed=0).tokenizer_texts())
