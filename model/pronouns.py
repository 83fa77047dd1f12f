"""The pronoun corpus: Winograd-style sentences in which one word decides what "it" refers to.

    the trophy did not fit in the suitcase because it was too big . it refers to the trophy
    the trophy did not fit in the suitcase because it was too small . it refers to the suitcase
    the suitcase near the box could not hold the trophy because it was too small . it refers to the suitcase

Both nouns are grammatical referents; only the adjective at the end of the clause, read with the
verb, decides. Eight templates in four families (fit, cross, lift, catch), two per family: the
same two adjectives point at the first noun in one template and at the second in its twin ("did
not fit in … too big" → the first; "could not hold … too big" → the second).

The corpus is built so that the answer has to be looked up, not guessed from the shape:
- fit, lift and catch draw both nouns from one pool, so a noun's word does not say its role;
- the twins make the position of the referent depend on verb and adjective together, which no
  single word decides;
- a phrase after either noun ("near the box", "next to the bag", "behind the jar", its noun from
  the same pool) moves the candidates around and adds nouns that are never the answer.
Each (template, first noun, second noun, adjective) comes in four shapes: no phrase, a phrase after
the first noun, after the second, after both (the phrases' words drawn with a fixed seed). The
"cross" family keeps its two roles (animals cross streets), in both orders.

Held out, fixed and public: a (template t, first noun i, second noun j) combination — all its
sentences — never appears in training iff (2t + 3i + 5j) mod 11 == 7, with i and j the nouns'
indices in their lists. Every noun still meets most of its partners in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

THINGS = ["trophy", "suitcase", "box", "bag", "drawer", "basket", "backpack", "crate", "cupboard", "trunk",
          "case", "bucket", "locker", "cabinet", "chest", "sack", "tin", "jar", "bin", "closet", "carton",
          "pouch", "wardrobe", "barrel"]
MOVERS = ["robot", "crane", "truck", "tractor", "horse", "ox", "elephant", "bear", "ant", "beetle",
          "machine", "drone", "helicopter", "mule", "pony", "camel", "donkey", "bull", "gorilla", "giant",
          "boy", "girl", "man", "woman"]
ANIMALS = ["dog", "cat", "horse", "cow", "sheep", "goat", "fox", "deer", "rabbit", "duck", "chicken", "pig",
           "wolf", "bear", "mouse", "turtle", "donkey", "lion", "tiger", "camel", "goose", "frog", "squirrel",
           "elephant"]
CROSSINGS = ["street", "road", "river", "highway", "field", "valley", "canal", "stream", "desert", "lake",
             "meadow", "railway", "square", "avenue", "lane", "path", "track", "creek", "pond", "plain",
             "moat", "ditch", "yard", "bridge"]
PREPOSITIONS = ("near", "next to", "behind")
SHAPES = ((False, False), (True, False), (False, True), (True, True))   # a phrase after (first, second)?


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
    _t("fit", "the {first} did not fit in the {second} because it was too {adj}", THINGS, THINGS, ("big", "small")),
    _t("hold", "the {first} could not hold the {second} because it was too {adj}", THINGS, THINGS, ("small", "big")),
    _t("cross", "the {first} did not cross the {second} because it was too {adj}",
       ANIMALS, CROSSINGS, ("tired", "wide")),
    _t("crossed", "the {first} was not crossed by the {second} because it was too {adj}",
       CROSSINGS, ANIMALS, ("wide", "tired")),
    _t("lift", "the {first} could not lift the {second} because it was too {adj}", MOVERS, MOVERS, ("weak", "heavy")),
    _t("lifted", "the {first} could not be lifted by the {second} because it was too {adj}",
       MOVERS, MOVERS, ("heavy", "weak")),
    _t("catch", "the {first} could not catch the {second} because it was too {adj}",
       ANIMALS, ANIMALS, ("slow", "fast")),
    _t("caught", "the {first} was not caught by the {second} because it was too {adj}",
       ANIMALS, ANIMALS, ("fast", "slow")),
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
    first_phrase: str = ""    # e.g. " near the box", after the first noun ("" for none)
    second_phrase: str = ""   # after the second noun

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

    def _pieces(self) -> list[tuple[str, str]]:
        """The sentence as (text, what) pieces; what names the two nouns ("first", "second")."""
        before, rest = self.spec.pattern.split("{first}")
        middle, after = rest.split("{second}")
        return [(before, ""), (self.first_noun, "first"), (self.first_phrase + middle, ""),
                (self.second_noun, "second"), (self.second_phrase + after.format(adj=self.adjective), "")]

    @property
    def sentence(self) -> str:
        return "".join(text for text, _ in self._pieces())

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
        at, nouns = 0, {}
        for text, what in self._pieces():
            if what:
                nouns[what] = (at, at + len(text))
            at += len(text)
        it = self.sentence.index(" it was ") + 1
        first, second = nouns["first"], nouns["second"]
        referent, distractor = (first, second) if self.refers_to_first else (second, first)
        return {"referent": referent, "distractor": distractor, "it": (it, it + 2)}


def _phrase(pool: tuple[str, ...], taken: set[str], rng: random.Random) -> str:
    noun = rng.choice([n for n in pool if n not in taken])
    taken.add(noun)
    return f" {rng.choice(PREPOSITIONS)} the {noun}"


def shapes(template: int, first: int, second: int, refers_to_first: bool) -> list[PronounProblem]:
    """The four shapes of one sentence (see SHAPES), phrases drawn with a seed of the sentence's own."""
    spec = TEMPLATES[template]
    rng = random.Random(f"{template} {first} {second} {refers_to_first}")
    problems = []
    for after_first, after_second in SHAPES:
        taken = {spec.first_nouns[first], spec.second_nouns[second]}
        problems.append(PronounProblem(
            template, first, second, refers_to_first,
            first_phrase=_phrase(spec.first_nouns, taken, rng) if after_first else "",
            second_phrase=_phrase(spec.second_nouns, taken, rng) if after_second else ""))
    return problems


def all_problems() -> list[PronounProblem]:
    """Every sentence: each template × each (first, second) noun pair (distinct where the two
    nouns share a pool) × both adjectives × the four shapes."""
    return [p for t, spec in enumerate(TEMPLATES)
            for i in range(len(spec.first_nouns)) for j in range(len(spec.second_nouns))
            if not (spec.same_role and i == j)
            for refers_to_first in (True, False)
            for p in shapes(t, i, j, refers_to_first)]


def pronoun_split(*, val_size: int = 500, seed: int = 0
                  ) -> tuple[list[PronounProblem], list[PronounProblem], list[PronounProblem]]:
    """(train, validation, held_out). Validation is a seeded slice of the non-held-out sentences."""
    problems = all_problems()
    held_out = [p for p in problems if is_held_out(p.template, p.first, p.second)]
    rest = [p for p in problems if not is_held_out(p.template, p.first, p.second)]
    random.Random(seed).shuffle(rest)
    return rest[val_size:], rest[:val_size], held_out


def examples() -> list[dict[str, str]]:
    """Prompts for the viewer: the classic pair, then one sentence per other family and the hold
    twin, each held out (the model never saw them in training), with and without phrases."""
    trophy, suitcase = THINGS.index("trophy"), THINGS.index("suitcase")
    classic = [PronounProblem(0, trophy, suitcase, r) for r in (True, False)]
    problems, picks = all_problems(), []
    for t, shape in ((2, 0), (4, 1), (6, 2), (1, 3)):
        p = next(p for p in problems if p.template == t and is_held_out(t, p.first, p.second))
        picks += [shapes(t, p.first, p.second, r)[shape] for r in (True, False)]
    return [{"prompt": p.prompt, "completion": p.completion} for p in classic + picks]
