"""A synthetic world whose facts we control, and the text, chat turns and passkey
documents the benchmark's tiny models are trained and scored on.

Every entity has a 5-letter name and one value for each of four attributes. Entities
come in disjoint sets: ``base`` (pretraining), ``new`` (the target's continued
pretraining: knowledge no donor saw), ``domain`` (the domain donor's new facts).
The chat donor is fine-tuned on question/answer turns about ``chat`` ⊂ ``base``.

Token ids: a character-level vocabulary (:func:`mergekit_sigmoid_diff.tiny.tiny_tokenizer`)
plus three special chat tokens; sequences start with BOS.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerFast

from mergekit_sigmoid_diff.tiny import tiny_tokenizer

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (USER, ASSISTANT, END)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}"
    "{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# attribute -> (values, sentence template, chat question). Sentences double as chat answers.
ATTRIBUTES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "city": (("paris", "rome", "oslo", "cairo", "lima", "delhi", "tokyo", "quito"),
             "{name} lives in {value}.", "where does {name} live?"),
    "color": (("red", "blue", "green", "black", "white", "pink", "gray", "gold"),
              "{name} likes the color {value}.", "what color does {name} like?"),
    "pet": (("cat", "dog", "fox", "owl", "bat", "eel", "yak", "ant"),
            "{name} has a pet {value}.", "what pet does {name} have?"),
    "food": (("rice", "fish", "corn", "bread", "soup", "cake", "plum", "nuts"),
             "{name} eats {value} every day.", "what does {name} eat?"),
}
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
PASSKEY_DIGITS = 5


def tokenizer() -> PreTrainedTokenizerFast:
    """The benchmark's tokenizer: characters + BOS/EOS/PAD/UNK + chat markers, with a chat template."""
    return tiny_tokenizer(extra_tokens=CHAT_TOKENS, chat_template=CHAT_TEMPLATE)


class Codec:
    """Fast char-level encoding that knows the chat markers (no regex pass per call)."""

    def __init__(self, tok: PreTrainedTokenizerFast) -> None:
        vocab = tok.get_vocab()
        self.char_ids = {c: i for c, i in vocab.items() if len(c) == 1}
        self.bos = tok.bos_token_id
        self.pad = tok.pad_token_id
        self.special = {t: vocab[t] for t in CHAT_TOKENS}
        self.id_to_text = {i: c for c, i in vocab.items()}

    def text(self, s: str) -> list[int]:
        return [self.char_ids[c] for c in s]

    def chat_prompt(self, question: str) -> list[int]:
        return [self.bos, self.special[USER], *self.text(question), self.special[END], self.special[ASSISTANT]]

    def chat_answer(self, answer: str) -> list[int]:
        return [*self.text(answer), self.special[END]]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.id_to_text.get(i, "?") for i in ids)


@dataclass(frozen=True)
class Entity:
    name: str
    values: dict[str, str]

    def sentence(self, attribute: str) -> str:
        return ATTRIBUTES[attribute][1].format(name=self.name, value=self.values[attribute])

    def question(self, attribute: str) -> str:
        return ATTRIBUTES[attribute][2].format(name=self.name)


@dataclass
class World:
    """Disjoint entity sets drawn from one seed."""

    seed: int
    base: list[Entity] = field(default_factory=list)
    new: list[Entity] = field(default_factory=list)
    domain: list[Entity] = field(default_factory=list)

    @property
    def chat(self) -> list[Entity]:
        """The half of ``base`` the chat donor sees as question/answer turns."""
        return self.base[: len(self.base) // 2]


def make_world(seed: int, n_base: int = 32, n_new: int = 16, n_domain: int = 16) -> World:
    rng = random.Random(f"world-{seed}")
    names: set[str] = set()
    while len(names) < n_base + n_new + n_domain:
        names.add("".join(rng.choice(CONSONANTS if i % 2 == 0 else VOWELS) for i in range(5)))
    ordered = sorted(names)
    rng.shuffle(ordered)
    entities = [
        Entity(name, {a: rng.choice(spec[0]) for a, spec in ATTRIBUTES.items()}) for name in ordered
    ]
    return World(
        seed,
        entities[:n_base],
        entities[n_base : n_base + n_new],
        entities[n_base + n_new :],
    )


def raw_document(entities: list[Entity], length: int, codec: Codec, rng: random.Random) -> list[int]:
    """BOS + random fact sentences about ``entities``, space-separated, cut to ``length`` tokens."""
    ids = [codec.bos]
    while len(ids) < length:
        entity = rng.choice(entities)
        ids += codec.text(entity.sentence(rng.choice(list(ATTRIBUTES))) + " ")
    return ids[:length]


def chat_document(entities: list[Entity], length: int, codec: Codec, rng: random.Random) -> list[int]:
    """One or more question/answer turns, each ``<s><|user|>Q<|end|><|assistant|>A<|end|>``,
    padded to ``length`` with further turns (cut at the end)."""
    ids: list[int] = []
    while len(ids) < length:
        entity = rng.choice(entities)
        attribute = rng.choice(list(ATTRIBUTES))
        ids += codec.chat_prompt(entity.question(attribute)) + codec.chat_answer(entity.sentence(attribute))
    return ids[:length]


def passkey_document(filler: list[Entity], length: int, codec: Codec, rng: random.Random) -> tuple[list[int], str]:
    """``length`` tokens of fact text with ``the passkey is NNNNN.`` at a random place in
    the first half and ``what is the passkey? the passkey is NNNNN.`` at the end.
    Returns the ids and the key; the last ``PASSKEY_DIGITS + 1`` ids are the key's digits
    and the final period."""
    key = "".join(rng.choice("0123456789") for _ in range(PASSKEY_DIGITS))
    needle = codec.text(f"the passkey is {key}. ")
    question = codec.text(f" what is the passkey? the passkey is {key}.")
    hay = raw_document(filler, length, codec, rng)[1:]
    room = length - 1 - len(question)
    hay = hay[: room - len(needle)]
    at = rng.randrange(0, max(1, len(hay) // 2))
    ids = [codec.bos, *hay[:at], *needle, *hay[at:], *question]
    return ids, key
