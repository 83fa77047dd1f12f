"""The pronoun corpus: Winograd-style sentences in which one word decides what "it" refers to.

    the trophy did not fit in the suitcase because it was too big . it refers to the trophy
    the trophy did not fit in the suitcase because it was too small . it refers to the suitcase

Both nouns are grammatical referents; only the adjective at the end of the clause decides. To
answer, the position of the final "the" must find the right noun among the two, which is what the
attention probe (model/probe.py) measures.

Seven templates from four families (fit, cross, lift, catch). The first three families have two
roles (an object and a container, …) and come in both orders (the object first, the container
first); "catch" has one role, so every ordered pair of distinct animals appears. Each template has
two adjectives: the first makes the first noun the referent, the second the second noun.

Held out, fixed and public: a (template t, first noun i, second noun j) combination — both of its
sentences — never appears in training iff (2t + 3i + 5j) mod 11 == 7, with i and j the nouns'
indices in their role's list. Every noun still meets ~21 of its ~23 partners in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OBJECTS = ["trophy", "ball", "book", "lamp", "vase", "laptop", "guitar", "helmet", "pillow", "blanket",
           "statue", "clock", "kettle", "camera", "painting", "mirror", "drum", "globe", "shoe", "hat",
           "bottle", "teapot", "radio", "toaster"]
CONTAINERS = ["suitcase", "box", "bag", "drawer", "basket", "backpack", "crate", "cupboard", "trunk", "case",
              "bucket", "locker", "cabinet", "chest", "sack", "tin", "jar", "bin", "closet", "carton",
              "pouch", "wardrobe", "envelope", "barrel"]
ANIMALS = ["dog", "cat", "horse", "cow", "sheep", "goat", "fox", "deer", "rabbit", "duck", "chicken", "pig",
           "wolf", "bear", "mouse", "turtle", "donkey", "lion", "tiger", "camel", "goose", "frog", "squirrel",
           "elephant"]
CROSSINGS = ["street", "road", "river", "highway", "field", "valley", "canal", "stream", "desert", "lake",
             "meadow", "railway", "square", "avenue", "lane", "path", "track", "creek", "pond", "plain",
             "moat", "ditch", "yard", "bridge"]
LIFTERS = ["robot", "crane", "forklift", "truck", "tractor", "pony", "mule", "ox", "ant", "beetle",
           "machine", "drone", "helicopter", "winch", "pulley", "jack", "lever", "arm", "magnet", "hoist",
           "cart", "wheelbarrow", "puppy", "kitten"]
LOADS = ["rock", "log", "anvil", "boulder", "piano", "sofa", "safe", "engine", "tree", "stone",
         "beam", "car", "boat", "fridge", "desk", "bed", "table", "bell", "wagon", "brick",
         "pipe", "tire", "cannon", "couch"]


@dataclass(frozen=True)
class Template:
    name: str
    pattern: str                  # "{first}", "{second}" and "{adj}" are filled in
    first_nouns: tuple[str, ...]
    second_nouns: tuple[str, ...]
    adjectives: tuple[str, str]   # (makes the first noun the referent, makes the second one)

    @property
    def same_role(self) -> bool:
        return self.first_nouns == self.second_nouns


def _t(name: str, pattern: str, first: list[str], second: list[str], adjectives: tuple[str, str]) -> Template:
    return Template(name, pattern, tuple(first), tuple(second), adjectives)


TEMPLATES: tuple[Template, ...] = (
    _t("fit", "the {first} did not fit in the {second} because it was too {adj}",
       OBJECTS, CONTAINERS, ("big", "small")),
    _t("hold", "the {first} could not hold the {second} because it was too {adj}",
       CONTAINERS, OBJECTS, ("small", "big")),
    _t("cross", "the {first} did not cross the {second} because it was too {adj}",
       ANIMALS, CROSSINGS, ("tired", "wide")),
    _t("crossed", "the {first} was not crossed by the {second} because it was too {adj}",
       CROSSINGS, ANIMALS, ("wide", "tired")),
    _t("lift", "the {first} could not lift the {second} because it was too {adj}",
       LIFTERS, LOADS, ("weak", "heavy")),
    _t("lifted", "the {first} could not be lifted by the {second} because it was too {adj}",
       LOADS, LIFTERS, ("heavy", "weak")),
    _t("catch", "the {first} could not catch the {second} because it was too {adj}",
       ANIMALS, ANIMALS, ("slow", "fast")),
)

QUESTION = " . it refers to the"
HELD_OUT_RULE = "(template t, first noun i, second noun j) is held out iff (2t + 3i + 5j) mod 11 == 7"


def is_held_out(template: int, first: int, second: int) -> bool:
    """The fixed, public held-out rule over (template index, first noun index, second noun index)."""
    return (2 * template + 3 * first + 5 * second) % 11 == 7


@dataclass(frozen=True)
class PronounProblem:
    template: int      # index into TEMPLATES
    first: int         # index into the template's first_nouns
    second: int        # index into the template's second_nouns
    refers_to_first: bool

    @property
    def spec(self) -> Template:
        return TEMPLATES[self.template]

    @property
    def first_noun(self) -> str:
        return self.spec.first_nouns[self.first]

    @property
    def second_noun(self) -> str:
        return self.spec.second_nouns[self.second]

    @property
    def adjective(self) -> str:
        return self.spec.adjectives[0 if self.refers_to_first else 1]

    @property
    def referent(self) -> str:
        return self.first_noun if self.refers_to_first else self.second_noun

    @property
    def distractor(self) -> str:
        return self.second_noun if self.refers_to_first else self.first_noun

    @property
    def sentence(self) -> str:
        return self.spec.pattern.format(first=self.first_noun, second=self.second_noun, adj=self.adjective)

    @property
    def prompt(self) -> str:
        return self.sentence + QUESTION

    @property
    def completion(self) -> str:
        return " " + self.referent

    @property
    def text(self) -> str:
        return self.prompt + self.completion

    def spans(self) -> dict[str, tuple[int, int]]:
        """Character spans [start, end) in `prompt` of the referent, the distractor and the pronoun
        "it" of the sentence (not the question's)."""
        pattern = self.spec.pattern
        before_first = pattern.index("{first}")
        first = (before_first, before_first + len(self.first_noun))
        before_second = pattern.index("{second}") - len("{first}") + len(self.first_noun)
        second = (before_second, before_second + len(self.second_noun))
        it = self.sentence.index(" it was ") + 1
        referent, distractor = (first, second) if self.refers_to_first else (second, first)
        return {"referent": referent, "distractor": distractor, "it": (it, it + 2)}


def all_problems() -> list[PronounProblem]:
    """Every sentence: each template × each (first, second) noun pair (distinct where the two
    nouns share a role) × both adjectives."""
    return [PronounProblem(t, i, j, refers_to_first)
            for t, spec in enumerate(TEMPLATES)
            for i in range(len(spec.first_nouns)) for j in range(len(spec.second_nouns))
            if not (spec.same_role and i == j)
            for refers_to_first in (True, False)]


def pronoun_split(*, val_size: int = 500, seed: int = 0
                  ) -> tuple[list[PronounProblem], list[PronounProblem], list[PronounProblem]]:
    """(train, validation, held_out). Validation is a seeded slice of the non-held-out sentences."""
    problems = all_problems()
    held_out = [p for p in problems if is_held_out(p.template, p.first, p.second)]
    rest = [p for p in problems if not is_held_out(p.template, p.first, p.second)]
    random.Random(seed).shuffle(rest)
    return rest[val_size:], rest[:val_size], held_out


def examples() -> list[dict[str, str]]:
    """Prompts for the viewer: the classic pair, then one sentence per other family, each held out
    (the model never saw them in training)."""
    classic = [PronounProblem(0, OBJECTS.index("trophy"), CONTAINERS.index("suitcase"), r) for r in (True, False)]
    picks = []
    for t in (2, 4, 6, 1):
        p = next(p for p in all_problems() if p.template == t and is_held_out(t, p.first, p.second))
        picks += [p, PronounProblem(p.template, p.first, p.second, not p.refers_to_first)]
    return [{"prompt": p.prompt, "completion": p.completion} for p in classic + picks]
