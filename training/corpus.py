"""The demo base model's training corpus: templated simple English, generated, never downloaded.

No model hub or data set is reachable where loraplex is built and tested, yet the demo
and the end-to-end tests need a base model whose output reads like words, not noise.
This module writes that model's whole curriculum from a seed: plain sentences
("The cat sat on the mat."), short stories, and chat conversations (greetings,
questions about colours, animals, numbers and opposites, story requests) whose
answers are short and regular enough for a few-million-parameter model to learn in
about a minute of CPU time.

The same seed always gives the same corpus, byte for byte: every choice comes from
one ``random.Random(seed)`` drawing from fixed tuples in a fixed order. Chats are
kept as message lists so that the tokenizer's own chat template renders them; the
template stays the single source of the chat format.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

Message = dict[str, str]
"""One chat turn: ``{"role": ..., "content": ...}``, as ``apply_chat_template`` takes it."""

ANIMAL_FACTS = (
    ("cat", "meow", "house"),
    ("dog", "woof", "house"),
    ("bird", "tweet", "nest"),
    ("fox", "yip", "den"),
    ("rabbit", "squeak", "burrow"),
    ("horse", "neigh", "stable"),
    ("cow", "moo", "barn"),
    ("duck", "quack", "pond"),
    ("frog", "ribbit", "pond"),
    ("mouse", "squeak", "hole"),
)
"""(animal, the sound it makes, where it lives)."""
ANIMALS = tuple(animal for animal, _, _ in ANIMAL_FACTS)
NAMES = ("Tom", "Lily", "Max", "Anna", "Ben", "Mia", "Sam", "Lucy", "Leo", "Emma")
ADJECTIVES = ("little", "big", "happy", "small", "brave", "old", "young", "kind", "quiet", "fast")
FEELINGS = ("happy", "surprised", "excited", "glad", "curious", "proud")
SUPERLATIVES = ("happiest", "bravest", "luckiest", "kindest", "proudest")
SEATS = ("mat", "chair", "floor", "bed", "rug", "sofa", "box", "table", "step", "grass")
PLACES = ("park", "garden", "river", "forest", "school", "shop", "beach", "farm", "hill", "lake")
OBJECTS = ("ball", "book", "hat", "box", "apple", "stick", "key", "cup", "kite", "shell")
ACTIVITIES = (
    "run in the grass",
    "play with a ball",
    "read a book",
    "sing a song",
    "look at the stars",
    "swim in the lake",
    "draw pictures",
    "climb the hill",
)
COLORED_THINGS = (
    ("sky", "blue"),
    ("grass", "green"),
    ("sun", "yellow"),
    ("snow", "white"),
    ("night", "black"),
    ("apple", "red"),
    ("orange", "orange"),
    ("sea", "blue"),
    ("banana", "yellow"),
    ("leaf", "green"),
)
OPPOSITES = (
    ("big", "small"),
    ("hot", "cold"),
    ("up", "down"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("day", "night"),
    ("old", "new"),
    ("open", "closed"),
    ("light", "dark"),
    ("good", "bad"),
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GREETINGS = ("Hello!", "Hi!", "Hi there.", "Good morning!", "Hello, how are you?")
GREETING_REPLIES = (
    "Hello! How can I help you today?",
    "Hi! What would you like to talk about?",
    "Hello! I am happy to help. What do you need?",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly assistant. Answer in short, simple sentences.",
)


@dataclass
class Corpus:
    """The generated documents, in training order."""

    texts: list[str] = field(default_factory=list)
    """Plain documents: sentences and stories, each trained as one bos..eos sequence."""

    chats: list[list[Message]] = field(default_factory=list)
    """Conversations, each rendered by the tokenizer's chat template before training."""

    def tokenizer_texts(self) -> list[str]:
        """Every piece of free text, for training the BPE merges (no chat markup)."""
        contents = [m["content"] for chat in self.chats for m in chat]
        roles = sorted({m["role"] for chat in self.chats for m in chat})
        return self.texts + contents + roles


def generate_corpus(num_documents: int, seed: int) -> Corpus:
    """Generate ``num_documents`` documents from ``seed``: half chats, a quarter each of
    sentences and stories (chats are the shortest and the hardest to learn)."""
    rng = random.Random(seed)
    corpus = Corpus()
    for _ in range(num_documents):
        kind = rng.randrange(4)
        if kind == 0:
            corpus.texts.append(_sentences(rng, rng.randint(3, 6)))
        elif kind == 1:
            corpus.texts.append(_story(rng, rng.choice(ANIMALS)))
        else:
            corpus.chats.append(_chat(rng))
    return corpus


def _sentence(rng: random.Random) -> str:
    """One subject/verb/object sentence."""
    animal, seat, place = rng.choice(ANIMALS), rng.choice(SEATS), rng.choice(PLACES)
    adjective, name, thing = rng.choice(ADJECTIVES), rng.choice(NAMES), rng.choice(OBJECTS)
    templates = (
        f"The {animal} sat on the {seat}.",
        f"The {adjective} {animal} sat on the {seat}.",
        f"A {animal} ran to the {place}.",
        f"{name} saw a {adjective} {animal} in the {place}.",
        f"The {animal} likes to sleep on the {seat}.",
        f"{name} has a {adjective} {thing}.",
        f"We went to the {place} with {name}.",
        f"The {thing} is on the {seat}.",
    )
    return rng.choice(templates)


def _sentences(rng: random.Random, count: int) -> str:
    return " ".join(_sentence(rng) for _ in range(count))


def _story(rng: random.Random, animal: str) -> str:
    """A short story about ``animal``, five to seven sentences."""
    name, adjective, feeling = rng.choice(NAMES), rng.choice(ADJECTIVES), rng.choice(FEELINGS)
    home = ANIMAL_FACTS[ANIMALS.index(animal)][2]
    place, thing, activity = rng.choice(PLACES), rng.choice(OBJECTS), rng.choice(ACTIVITIES)
    lines = [
        f"Once upon a time, there was a {adjective} {animal} named {name}.",
        f"{name} lived in a {home} near the {place}.",
        f"Every day, {name} liked to {activity}.",
        f"One day, {name} found a {thing} near the {place}.",
        f"{name} was very {feeling}.",
    ]
    if rng.random() < 0.5:
        lines.append(f"{name} took the {thing} home and showed it to a friend.")
    lines.append(f"From that day on, {name} was the {rng.choice(SUPERLATIVES)} {animal} of all.")
    return " ".join(lines)


def _question_answer(rng: random.Random) -> tuple[str, str]:
    """One question and its answer, of a randomly chosen kind."""
    kinds: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
        _color_qa,
        _sound_qa,
        _home_qa,
        _sum_qa,
        _opposite_qa,
        _story_qa,
        _sentence_qa,
        _greeting_qa,
    )
    return rng.choice(kinds)(rng)


def _color_qa(rng: random.Random) -> tuple[str, str]:
    thing, color = rng.choice(COLORED_THINGS)
    return f"What color is the {thing}?", f"The {thing} is {color}."


def _sound_qa(rng: random.Random) -> tuple[str, str]:
    animal, sound, _ = rng.choice(ANIMAL_FACTS)
    return f"What sound does a {animal} make?", f"A {animal} says {sound}."


def _home_qa(rng: random.Random) -> tuple[str, str]:
    animal, _, home = rng.choice(ANIMAL_FACTS)
    return f"Where does a {animal} live?", f"A {animal} lives in a {home}."


def _sum_qa(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(5), rng.randrange(5)
    total = NUMBER_WORDS[a + b]
    return (
        f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?",
        f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {total}.",
    )


def _opposite_qa(rng: random.Random) -> tuple[str, str]:
    word, opposite = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    return f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."


def _story_qa(rng: random.Random) -> tuple[str, str]:
    animal = rng.choice(ANIMALS)
    # The lead-in marks the story as a reply, so the model learns to end it with the
    # end-of-turn token rather than the end-of-text one plain stories end with.
    return (
        f"Tell me a short story about a {animal}.",
        f"Here is a story about a {animal}. {_story(rng, animal)}",
    )


def _sentence_qa(rng: random.Random) -> tuple[str, str]:
    return "Write a sentence about an animal.", _sentence(rng)


def _greeting_qa(rng: random.Random) -> tuple[str, str]:
    return rng.choice(GREETINGS), rng.choice(GREETING_REPLIES)


def _chat(rng: random.Random) -> list[Message]:
    """A conversation of one or two exchanges, sometimes with a system prompt."""
    messages: list[Message] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(1 if rng.random() < 0.8 else 2):
        question, answer = _question_answer(rng)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return messages
