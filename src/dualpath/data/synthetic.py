"""The built-in capacity-vs-compute corpus: offline, seeded and unlimited.

Two kinds of documents, so that the Dual-Path claim can be tested at laptop scale:

* capacity: prose facts about a seeded world of named people (city, job, birth year, relations).
  Recalling them needs stored knowledge, which a wide path should supply;
* compute: multi-digit arithmetic, chained variable programs and GSM8K-style worked problems.
  Answering them needs sequential steps, which a deep (looped) path should supply.

Two small mechanism tasks with one dial each, off by default (mix 0), sized for laptop-scale models:

* recall (capacity): `recall_facts` made-up "key : value" facts, stated in the query format itself;
  pure memorisation, so every eval fact is in training by design;
* chain (compute): a start digit and `chain_steps` dependent invertible operations modulo 10;
* hops (compute): variable chasing, "let q = 4 x = 7 b = q m = x k = b\n; k ? 4": follow `hops` copies back
  to a root digit, among distractor chains, with the assignments in random order.

The held-out evaluation splits ask for seen facts in unseen phrasings, and for arithmetic, programs,
word problems, chains and hop problems that the training stream never emits (held out by a hash of the canonical
problem). See docs/SYNTHETIC.md.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import ConfigError, DataError

CATEGORIES: tuple[str, ...] = ("fact", "arith", "program", "gsm", "recall", "chain", "hops")
# The mix weight of each category; eval_examples covers the categories whose weight is > 0.
MIX_FIELDS: dict[str, str] = {"fact": "mix_facts", "arith": "mix_arith", "program": "mix_programs",
                              "gsm": "mix_gsm", "recall": "mix_recall", "chain": "mix_chain",
                              "hops": "mix_hops"}
# The dial an eval example of these categories carries as an extra field (see by_dial).
DIALS: dict[str, str] = {"recall": "facts", "chain": "steps", "hops": "hops"}

# Relations are functional (one per type per person) and asymmetric, so "Who is X's mentor?" has one
# answer; symmetric ones such as sibling would make the reverse question ambiguous.
RELATIONS: dict[str, str] = {
    "best_friend": "best friend",
    "mentor": "mentor",
    "employer": "employer",
    "doctor": "doctor",
    "landlord": "landlord",
}

JOBS: tuple[str, ...] = (
    "baker", "carpenter", "nurse", "architect", "teacher", "pilot", "plumber", "farmer", "librarian",
    "chemist", "tailor", "potter", "sailor", "judge", "dentist", "painter", "engineer", "electrician",
    "florist", "butcher", "journalist", "translator", "surgeon", "mechanic", "gardener", "accountant",
    "astronomer", "locksmith", "veterinarian", "geologist", "violinist", "fisherman", "blacksmith",
    "photographer", "pharmacist", "beekeeper", "cartographer", "watchmaker", "glassblower", "shepherd",
)

YEAR_MIN, YEAR_MAX = 1920, 2005
MAX_CITIES = 2000  # the city-name generator has about 8,800 distinct names; stay well inside it
RECALL_FACTS_DEFAULT = 100  # calibrated: see docs/SYNTHETIC.md
RECALL_FACTS_MAX = 100_000
RECALL_TWO_SYLLABLES_MAX = 10_000  # 2-syllable keys (33,856 exist) up to here, 3-syllable ones above
CHAIN_STEPS_MAX = 30
HOPS_MAX = 24  # a chain of h copies uses h + 1 distinct letters; hops_chains * (hops_max + 1) <= 26
HOPS_CHAINS_MAX = 10  # the chains' root digits are distinct
HOPS_QUERIES_MAX = 8

# ---------------------------------------------------------------------------------------------
# Templates. Placeholders: name, city, job, a_job, year, rel, a_rel, other.
# Training statements and questions never share a phrasing with the eval-only questions;
# tests/test_synthetic.py checks that statically and on the generated stream.

STATEMENTS: dict[str, tuple[str, ...]] = {
    "city": (
        "{name} lives in {city}.",
        "{name} is a resident of {city}.",
        "{name} resides in the city of {city}.",
        "These days, {name} lives in {city}.",
        "{city} is where {name} lives.",
        "{name} moved to {city} long ago and has stayed there ever since.",
        "The city that {name} lives in is {city}.",
        "{name} rents a small flat in {city}.",
        "If you visit {city}, you may run into {name}, who lives there.",
        "{name} settled in {city} and never left.",
    ),
    "job": (
        "{name} works as {a_job}.",
        "{name} is {a_job} by trade.",
        "By profession, {name} is {a_job}.",
        "{name} earns a living as {a_job}.",
        "{name} has worked as {a_job} for many years.",
        "Everyone in town knows {name} as {a_job}.",
        "{name} is employed as {a_job}.",
        "The occupation of {name} is {job}.",
        "{name} trained as {a_job} and still works in that trade.",
    ),
    "birth_year": (
        "{name} was born in {year}.",
        "{name} came into the world in {year}.",
        "{year} is the year {name} was born.",
        "The birth year of {name} is {year}.",
        "In {year}, {name} was born.",
        "Records show that {name} was born in the year {year}.",
        "{name} (born {year}) is well known locally.",
        "{name} has been alive since {year}.",
        "{name}'s date of birth falls in {year}.",
    ),
    "relation": (
        "{name}'s {rel} is {other}.",
        "The {rel} of {name} is {other}.",
        "{other} is {name}'s {rel}.",
        "{other} is the {rel} of {name}.",
        "{name} would describe {other} as {a_rel}.",
        "{name} has {other} as {a_rel}.",
        "It is {other} who is {name}'s {rel}.",
        "Ask around and you will learn that {name}'s {rel} is {other}.",
        "As for {name}, the {rel} is {other}.",
    ),
}

TRAIN_QUESTIONS: dict[str, tuple[str, ...]] = {
    "city": ("Where does {name} live?", "What city does {name} live in?", "Which city is {name} a resident of?"),
    "job": ("What is {name}'s job?", "What does {name} do for a living?", "What is the occupation of {name}?"),
    "birth_year": ("When was {name} born?", "What is {name}'s birth year?", "In what year was {name} born?"),
    "relation": ("Who is {name}'s {rel}?", "Who is the {rel} of {name}?", "Whom does {name} have as {a_rel}?"),
}

# Reserved for evaluation: never rendered into a training document.
EVAL_QUESTIONS: dict[str, tuple[str, ...]] = {
    "city": ("In which city does {name} live?", "Name the city that {name} calls home.",
             "{name} is based in which city?"),
    "job": ("What line of work is {name} in?", "Which profession does {name} practise?",
            "{name} makes money doing what kind of work?"),
    "birth_year": ("Which year saw the birth of {name}?", "{name} was born in which year?",
                   "Give the year in which {name} was born."),
    "relation": ("Which person serves as {name}'s {rel}?", "Who fills the role of {rel} for {name}?",
                 "{name} relies on whom as {a_rel}?"),
}


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class SyntheticConfig:
    """Knobs of the synthetic corpus. Every field is a plain scalar so the YAML loader can fill it."""

    seed: int = 0  # world, training stream and eval draws
    n_entities: int = 200  # people in the world (capacity load)
    n_relations: int = 2  # relations per person, each of a different type (at most len(RELATIONS))
    n_cities: int = 0  # 0: n_entities // 8, clipped to [10, MAX_CITIES]
    min_digits: int = 1  # digits per arithmetic operand, drawn uniformly in [min_digits, max_digits]
    max_digits: int = 4
    program_depth_min: int = 2  # dependent operations per program, after the initial constant
    program_depth_max: int = 5
    # Document-type proportions (normalised, need not sum to 1).
    mix_facts: float = 0.5
    mix_arith: float = 0.2
    mix_programs: float = 0.2
    mix_gsm: float = 0.1
    qa_prob: float = 0.3  # chance a fact document ends with Q/A pairs in training phrasings
    holdout_fraction: float = 0.05  # share of arith/program/gsm/chain problems reserved for eval, by hash
    # The mechanism tasks (off by default, so the default corpus is unchanged).
    mix_recall: float = 0.0
    mix_chain: float = 0.0
    recall_facts: int = RECALL_FACTS_DEFAULT  # capacity dial: distinct "key : value" facts in the recall world
    recall_value_digits: int = 2  # digits of a recall value (1: 0-9, d > 1: uniform over d-digit numbers)
    chain_steps_min: int = 1  # compute dial: dependent mod-10 operations per chain, uniform in [min, max]
    chain_steps_max: int = 3
    chain_ops: str = "mod10"  # mod10: invertible mod-10 steps (no shortcut) | sum: plain sums of digits
    mix_hops: float = 0.0
    # Hops defaults: the only setting seen to learn at laptop scale (needs ~1.5M tokens; see docs/SYNTHETIC.md).
    hops_min: int = 0  # compute dial: copies between the queried variable and its root, uniform in [min, max]
    hops_max: int = 1
    hops_chains: int = 2  # chains per problem: the queried one and hops_chains - 1 distractors
    hops_queries: int = 4  # query lines per training problem; the first is shaped like the eval query

    def validate(self) -> "SyntheticConfig":
        ints = ("seed", "n_entities", "n_relations", "n_cities", "min_digits", "max_digits",
                "program_depth_min", "program_depth_max", "recall_facts", "recall_value_digits",
                "chain_steps_min", "chain_steps_max", "hops_min", "hops_max", "hops_chains", "hops_queries")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"synthetic.{name} must be an integer, got {v!r}")
        for name in (*MIX_FIELDS.values(), "qa_prob", "holdout_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"synthetic.{name} must be a finite number, got {v!r}")
        if self.chain_ops not in CHAIN_OPS:
            raise ConfigError(f"synthetic.chain_ops must be one of {', '.join(CHAIN_OPS)}, got {self.chain_ops!r}")
        if not 0 <= self.n_relations <= len(RELATIONS):
            raise ConfigError(f"synthetic.n_relations must be in [0, {len(RELATIONS)}], got {self.n_relations}")
        lo = max(2, self.n_relations + 1)  # everyone needs n_relations distinct others
        if not lo <= self.n_entities <= 100_000:
            raise ConfigError(f"synthetic.n_entities must be in [{lo}, 100000], got {self.n_entities}")
        if not 0 <= self.n_cities <= MAX_CITIES or self.n_cities == 1:
            raise ConfigError(f"synthetic.n_cities must be 0 (auto) or in [2, {MAX_CITIES}], got {self.n_cities}")
        if not 1 <= self.min_digits <= 30:
            raise ConfigError(f"synthetic.min_digits must be in [1, 30], got {self.min_digits}")
        if not self.min_digits <= self.max_digits <= 30:
            raise ConfigError(f"synthetic.max_digits must be in [min_digits={self.min_digits}, 30], "
                              f"got {self.max_digits}")
        if not 1 <= self.program_depth_min <= 20:
            raise ConfigError(f"synthetic.program_depth_min must be in [1, 20], got {self.program_depth_min}")
        if not self.program_depth_min <= self.program_depth_max <= 20:
            raise ConfigError(f"synthetic.program_depth_max must be in [program_depth_min="
                              f"{self.program_depth_min}, 20], got {self.program_depth_max}")
        if not 1 <= self.recall_facts <= RECALL_FACTS_MAX:
            raise ConfigError(f"synthetic.recall_facts must be in [1, {RECALL_FACTS_MAX}], got {self.recall_facts}")
        if not 1 <= self.recall_value_digits <= 6:
            raise ConfigError(f"synthetic.recall_value_digits must be in [1, 6], got {self.recall_value_digits}")
        if not 1 <= self.chain_steps_min <= CHAIN_STEPS_MAX:
            raise ConfigError(f"synthetic.chain_steps_min must be in [1, {CHAIN_STEPS_MAX}], "
                              f"got {self.chain_steps_min}")
        if not self.chain_steps_min <= self.chain_steps_max <= CHAIN_STEPS_MAX:
            raise ConfigError(f"synthetic.chain_steps_max must be in [chain_steps_min={self.chain_steps_min}, "
                              f"{CHAIN_STEPS_MAX}], got {self.chain_steps_max}")
        if not 0 <= self.hops_min <= HOPS_MAX:
            raise ConfigError(f"synthetic.hops_min must be in [0, {HOPS_MAX}], got {self.hops_min}")
        if not self.hops_min <= self.hops_max <= HOPS_MAX:
            raise ConfigError(f"synthetic.hops_max must be in [hops_min={self.hops_min}, {HOPS_MAX}], "
                              f"got {self.hops_max}")
        if not 2 <= self.hops_chains <= HOPS_CHAINS_MAX:  # one chain alone: the only digit is the answer
            raise ConfigError(f"synthetic.hops_chains must be in [2, {HOPS_CHAINS_MAX}], got {self.hops_chains}")
        if self.hops_chains * (self.hops_max + 1) > len(_VARS):
            raise ConfigError(f"synthetic.hops_chains * (hops_max + 1) must be <= {len(_VARS)} (one letter per "
                              f"variable), got {self.hops_chains} * {self.hops_max + 1}")
        if not 1 <= self.hops_queries <= HOPS_QUERIES_MAX:
            raise ConfigError(f"synthetic.hops_queries must be in [1, {HOPS_QUERIES_MAX}], got {self.hops_queries}")
        for name in MIX_FIELDS.values():
            if getattr(self, name) < 0:
                raise ConfigError(f"synthetic.{name} must be >= 0, got {getattr(self, name)}")
        if sum(getattr(self, name) for name in MIX_FIELDS.values()) <= 0:
            raise ConfigError("synthetic.mix_facts/mix_arith/mix_programs/mix_gsm/mix_recall/mix_chain/"
                              "mix_hops must not all be 0")
        if not 0 <= self.qa_prob <= 1:
            raise ConfigError(f"synthetic.qa_prob must be in [0, 1], got {self.qa_prob}")
        if not 0 < self.holdout_fraction <= 0.5:
            raise ConfigError(f"synthetic.holdout_fraction must be in (0, 0.5], got {self.holdout_fraction}")
        return self

    def city_count(self) -> int:
        return self.n_cities or min(MAX_CITIES, max(10, self.n_entities // 8))

    def trained_categories(self) -> tuple[str, ...]:
        """The categories whose mix weight is > 0, in the order of CATEGORIES."""
        return tuple(c for c in CATEGORIES if getattr(self, MIX_FIELDS[c]) > 0)


# ---------------------------------------------------------------------------------------------
# The world


@dataclass(frozen=True)
class Entity:
    name: str  # "First Last", unique in the world
    city: str
    job: str
    birth_year: int
    relations: tuple[tuple[str, str], ...]  # (relation key in RELATIONS, other entity's name)

    def facts(self) -> list[tuple[str, str]]:
        """(attribute, answer) pairs; relation attributes are keys of RELATIONS."""
        return [("city", self.city), ("job", self.job), ("birth_year", str(self.birth_year)),
                *self.relations]


@dataclass(frozen=True)
class World:
    entities: tuple[Entity, ...]
    cities: tuple[str, ...]

    def entity(self, name: str) -> Entity:
        for e in self.entities:
            if e.name == name:
                return e
        raise KeyError(name)

    def first_names(self) -> list[str]:
        return [e.name.split(" ")[0] for e in self.entities]


_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "st", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou")
_CODAS = ("n", "r", "l", "s", "m", "th", "nd", "rk")
_CITY_ENDINGS = ("vath", "mor", "holm", "vale", "dor", "wick", "ven", "grad", "ria", "port", "stead", "mark")


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS)


def _word(rng: random.Random, syllables: int, coda_p: float) -> str:
    w = "".join(_syllable(rng) for _ in range(syllables))
    if rng.random() < coda_p:
        w += rng.choice(_CODAS)
    return w.capitalize()


def build_world(cfg: SyntheticConfig) -> World:
    """The seeded world of people; depends only on seed, n_entities, n_relations and n_cities."""
    cfg.validate()
    rng = random.Random(f"dualpath.synthetic/world/{cfg.seed}")
    names: list[str] = []
    taken: set[str] = set()
    while len(names) < cfg.n_entities:
        first = _word(rng, rng.choice((2, 2, 3)), 0.3)
        last = _word(rng, 2, 0.7)
        full = f"{first} {last}"
        if full not in taken:
            taken.add(full)
            names.append(full)
    parts = {p for n in names for p in n.split(" ")}
    cities: list[str] = []
    while len(cities) < cfg.city_count():
        c = (_syllable(rng) + rng.choice(("", "r", "l", "n"))).capitalize() + rng.choice(_CITY_ENDINGS)
        if c not in parts and c not in cities:
            cities.append(c)
    relation_keys = list(RELATIONS)
    entities = []
    for i, name in enumerate(names):
        kinds = rng.sample(relation_keys, cfg.n_relations)
        others = _sample_others(rng, i, cfg.n_entities, cfg.n_relations)
        entities.append(Entity(
            name=name, city=rng.choice(cities), job=rng.choice(JOBS),
            birth_year=rng.randint(YEAR_MIN, YEAR_MAX),
            relations=tuple((k, names[j]) for k, j in zip(kinds, others)),
        ))
    return World(entities=tuple(entities), cities=tuple(cities))


def _sample_others(rng: random.Random, me: int, n: int, k: int) -> list[int]:
    # Rejection sampling: building the full "everyone but me" list is quadratic for large worlds.
    out: list[int] = []
    while len(out) < k:
        j = rng.randrange(n)
        if j != me and j not in out:
            out.append(j)
    return out


def _fields(ent: Entity, attr: str) -> tuple[str, dict[str, str]]:
    """Template kind and placeholder values for one fact."""
    if attr == "city":
        return "city", {"name": ent.name, "city": ent.city}
    if attr == "job":
        return "job", {"name": ent.name, "job": ent.job, "a_job": _article(ent.job)}
    if attr == "birth_year":
        return "birth_year", {"name": ent.name, "year": str(ent.birth_year)}
    other = dict(ent.relations)[attr]
    rel = RELATIONS[attr]
    return "relation", {"name": ent.name, "rel": rel, "a_rel": _article(rel), "other": other}


def fact_answer(ent: Entity, attr: str) -> str:
    return dict(ent.facts())[attr]


# ---------------------------------------------------------------------------------------------
# Hold-out: a problem is reserved for eval iff a keyed hash of its canonical form falls below the
# fraction. The key ignores surface wording (names, variable letters, items), and is the same for
# every seed, so no seed's training stream contains any seed's eval problems.


def held_out(key: str, fraction: float) -> bool:
    h = hashlib.blake2b(key.encode(), digest_size=8, person=b"dualpath-holdout").digest()
    return int.from_bytes(h, "big") < fraction * 2.0**64


# ---------------------------------------------------------------------------------------------
# Arithmetic: "4821 + 377 = 5198"


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _arith(rng: random.Random, cfg: SyntheticConfig) -> tuple[str, str, str]:
    """(key, prompt, answer); subtraction keeps the larger operand first, so answers are >= 0."""
    op = rng.choice("+-*")
    a = _number(rng, rng.randint(cfg.min_digits, cfg.max_digits))
    b = _number(rng, rng.randint(cfg.min_digits, cfg.max_digits))
    if op == "-" and a < b:
        a, b = b, a
    r = a + b if op == "+" else a - b if op == "-" else a * b
    return f"arith/{a}{op}{b}", f"{a} {op} {b} = ", str(r)


# ---------------------------------------------------------------------------------------------
# Programs: "a = 7; b = a + 5; c = b * 3; c = ? 36". Every step reads the previous variable, so the
# answer needs `depth` sequential operations; values stay in [0, 999].

_VARS = "abcdefghijklmnopqrstuvwxyz"
_PROGRAM_MAX = 999


def _in_range(a: int, op: str, b: int) -> bool:
    if op == "*":
        return b <= 12 and a * b <= _PROGRAM_MAX
    return 0 <= (a + b if op == "+" else a - b) <= _PROGRAM_MAX


def _program(rng: random.Random, depth: int) -> tuple[str, str, str]:
    names = rng.sample(_VARS, depth + 1)
    vals = [rng.randint(1, 20)]
    stmts = [f"{names[0]} = {vals[0]}"]
    shape = [str(vals[0])]  # canonical form with positional variables, for the hold-out key
    for i in range(1, depth + 1):
        prev = vals[-1]
        op = rng.choice("+-*")
        # Sometimes the second operand is an earlier variable, so programs need a store, not a counter.
        ref = rng.randrange(i - 1) if i >= 2 and rng.random() < 0.3 else None
        operand = vals[ref] if ref is not None else rng.randint(2, 9) if op == "*" else rng.randint(1, 20)
        if not _in_range(prev, op, operand):
            op = next((o for o in "+-" if _in_range(prev, o, operand)), None)
            if op is None:  # a large earlier variable fits neither way: use a small constant instead
                ref, op, operand = None, "+" if prev <= _PROGRAM_MAX - 20 else "-", rng.randint(1, 20)
        val = prev + operand if op == "+" else prev - operand if op == "-" else prev * operand
        rhs = names[ref] if ref is not None else str(operand)
        stmts.append(f"{names[i]} = {names[i - 1]} {op} {rhs}")
        shape.append(f"{op}{'v%d' % ref if ref is not None else operand}")
        vals.append(val)
    prompt = "; ".join(stmts) + f"; {names[-1]} = ? "
    return "program/" + ",".join(shape), prompt, str(vals[-1])


# ---------------------------------------------------------------------------------------------
# GSM8K-style worked problems: every step is "a op b = <<a op b=c>>c", the last line "#### c".


def _calc(a: int, op: str, b: int) -> tuple[str, int]:
    r = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a // b
    assert op != "/" or a % b == 0
    return f"{a}{op}{b} = <<{a}{op}{b}={r}>>{r}", r


_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "seashells", "cards")


def _gsm_halves(rng, who):
    x, y = 2 * rng.randint(5, 100), rng.randint(2, 50)
    item = rng.choice(_ITEMS)
    gave, h = _calc(x, "/", 2)
    kept, k = _calc(x, "-", h)
    now, r = _calc(k, "+", y)
    q = (f"{who} has {x} {item}. {who} gives half of them to a friend and then buys {y} more. "
         f"How many {item} does {who} have now?")
    return (x, y), q, [f"{who} gives away {gave} {item}.", f"That leaves {who} with {kept} {item}.",
                       f"After buying more, {who} has {now} {item}."], r


def _gsm_change(rng, who):
    n, p = rng.randint(2, 12), rng.randint(2, 40)
    bill = next(b for b in (10, 20, 50, 100, 200, 500) if b > n * p)
    thing = rng.choice(("notebooks", "tickets", "plants", "mugs", "scarves"))
    cost, c = _calc(n, "*", p)
    change, r = _calc(bill, "-", c)
    q = f"{who} buys {n} {thing} that cost {p} dollars each and pays with a {bill}-dollar bill. " \
        f"How much change does {who} get?"
    return (n, p), q, [f"The {thing} cost {cost} dollars.", f"The change is {change} dollars."], r


def _gsm_pages(rng, who):
    p, d, left = rng.randint(5, 40), rng.randint(2, 14), rng.randint(5, 300)
    total = p * d + left
    read, rd = _calc(p, "*", d)
    rest, r = _calc(total, "-", rd)
    q = f"A book has {total} pages. {who} reads {p} pages every day for {d} days. " \
        f"How many pages are left to read?"
    return (p, d, total), q, [f"{who} reads {read} pages in total.", f"There are {rest} pages left."], r


def _gsm_share(rng, who):
    k, m = rng.randint(2, 12), rng.randint(3, 24)
    f = rng.choice([d for d in range(2, 13) if (k * m) % d == 0])
    total, t = _calc(k, "*", m)
    each, r = _calc(t, "/", f)
    q = f"{who} has {k} boxes with {m} crayons in each box. {who} shares all the crayons equally " \
        f"among {f} friends. How many crayons does each friend get?"
    return (k, m, f), q, [f"There are {total} crayons.", f"Each friend gets {each} crayons."], r


def _gsm_savings(rng, who):
    w, n = rng.randint(5, 60), rng.randint(2, 12)
    spend = rng.randint(1, w * n - 1)
    saved, s = _calc(w, "*", n)
    left, r = _calc(s, "-", spend)
    q = f"{who} saves {w} dollars every week for {n} weeks and then spends {spend} dollars on a bike. " \
        f"How much money does {who} have left?"
    return (w, n, spend), q, [f"{who} saves {saved} dollars.", f"{who} has {left} dollars left."], r


def _gsm_shopping(rng, who):
    a, p1, b, p2 = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(1, 9)
    books, x = _calc(a, "*", p1)
    pens, y = _calc(b, "*", p2)
    total, r = _calc(x, "+", y)
    q = f"{who} buys {a} notebooks for {p1} dollars each and {b} pens for {p2} dollars each. " \
        f"How much does {who} spend in total?"
    return (a, p1, b, p2), q, [f"The notebooks cost {books} dollars.", f"The pens cost {pens} dollars.",
                               f"In total {who} spends {total} dollars."], r


def _gsm_ages(rng, who):
    a, k = rng.randint(4, 30), rng.randint(2, 3)
    d = rng.randint(1, min(15, k * a - 1))
    aunt, x = _calc(k, "*", a)
    uncle, y = _calc(x, "-", d)
    both, r = _calc(x, "+", y)
    q = f"{who} is {a} years old. {who}'s aunt is {k} times as old as {who}, and {who}'s uncle is " \
        f"{d} years younger than the aunt. How old are the aunt and the uncle together?"
    return (a, k, d), q, [f"The aunt is {aunt} years old.", f"The uncle is {uncle} years old.",
                          f"Together they are {both} years old."], r


def _gsm_trip(rng, who):
    s1, h1, s2, h2 = rng.randint(20, 80), rng.randint(1, 5), rng.randint(20, 80), rng.randint(1, 5)
    first, x = _calc(s1, "*", h1)
    second, y = _calc(s2, "*", h2)
    total, r = _calc(x, "+", y)
    q = f"{who} drives at {s1} miles per hour for {h1} hours and then at {s2} miles per hour for " \
        f"{h2} hours. How many miles does {who} drive in all?"
    return (s1, h1, s2, h2), q, [f"First {who} drives {first} miles.", f"Then {who} drives {second} miles.",
                                 f"{who} drives {total} miles in all."], r


def _gsm_bake(rng, who):
    b, c, g = rng.randint(2, 6), rng.randint(6, 24), rng.randint(2, 8)
    t = b * c
    base = t % g or g  # eaten cookies leave a whole number of full bags
    e = base + g * rng.randint(0, (t - base) // g - 1)
    baked, _ = _calc(b, "*", c)
    rest, left = _calc(t, "-", e)
    bags, r = _calc(left, "/", g)
    q = f"{who} bakes {b} batches of {c} cookies and eats {e} of them. {who} packs the rest into bags " \
        f"of {g}. How many bags does {who} fill?"
    return (b, c, e, g), q, [f"{who} bakes {baked} cookies.", f"{rest} cookies are left.",
                             f"{who} fills {bags} bags."], r


_GSM_SCHEMAS: dict[str, Callable] = {
    "halves": _gsm_halves, "change": _gsm_change, "pages": _gsm_pages, "share": _gsm_share,
    "savings": _gsm_savings, "shopping": _gsm_shopping, "ages": _gsm_ages, "trip": _gsm_trip,
    "bake": _gsm_bake,
}
_GSM_NAMES = tuple(_GSM_SCHEMAS)


def _gsm(rng: random.Random, first_names: list[str]) -> tuple[str, str, str]:
    """(key, prompt, answer): the prompt holds the question and the worked steps, up to '#### '."""
    schema = rng.choice(_GSM_NAMES)
    numbers, question, steps, answer = _GSM_SCHEMAS[schema](rng, rng.choice(first_names))
    prompt = f"Question: {question}\nAnswer: " + "\n".join(steps) + "\n#### "
    return f"gsm/{schema}/{numbers}", prompt, str(answer)


# ---------------------------------------------------------------------------------------------
# Recall (capacity): "zamo : 417". A world of recall_facts made-up keys, each with one value. The training
# documents state the facts in exactly the query format, so recall is memorisation by design.


def build_recall(cfg: SyntheticConfig) -> tuple[tuple[str, str], ...]:
    """The recall world: recall_facts (key, value) pairs with distinct lowercase keys.

    Depends only on seed, recall_facts and recall_value_digits. Facts are drawn one after the other, so a
    smaller world is a prefix of a larger one (while both use keys of the same syllable count)."""
    cfg.validate()
    rng = random.Random(f"dualpath.synthetic/recall/{cfg.seed}")
    syllables = 2 if cfg.recall_facts <= RECALL_TWO_SYLLABLES_MAX else 3
    facts: list[tuple[str, str]] = []
    taken: set[str] = set()
    while len(facts) < cfg.recall_facts:
        key = "".join(_syllable(rng) for _ in range(syllables))
        value = str(_number(rng, cfg.recall_value_digits))
        if key not in taken:
            taken.add(key)
            facts.append((key, value))
    return tuple(facts)


def recall_line(key: str, value: str) -> str:
    return f"{key} : {value}"


# ---------------------------------------------------------------------------------------------
# Chains (compute): "7 +3 *3 -5 = 3" is ((7 + 3) * 3 - 5) mod 10. Every operation is a bijection of the
# digits 0-9 (adding or subtracting 1-9, multiplying by 3, 7 or 9, which are coprime to 10), so the
# answer depends on the start digit and on every step: no step can be skipped and no prefix forgotten.

CHAIN_MULTIPLIERS = (3, 7, 9)


CHAIN_OPS = ("mod10", "sum")  # mod10: the bijections above; sum: "7 +3 +5 = 15", plain sums of digits


def chain_value(start: int, ops: list[tuple[str, int]], kind: str = "mod10") -> int:
    if kind == "sum":
        return start + sum(d for _, d in ops)
    x = start
    for op, d in ops:
        x = (x + d if op == "+" else x - d if op == "-" else x * d) % 10
    return x


def chain_held_out(key: str, fraction: float) -> bool:
    """One-step chains are the primitives (210 digit/operation pairs, 90 for sums): always trained, never held
    out, so a held-out chain is an unseen composition of seen steps, not an unseen fact."""
    return key.count("+") + key.count("-") + key.count("*") > 1 and held_out(key, fraction)


def _chain(rng: random.Random, steps: int, kind: str = "mod10") -> tuple[str, str, str]:
    """(key, prompt, answer); the key is the whole problem, e.g. "chain/7+3*3-5"."""
    start = rng.randrange(10)
    ops = []
    for _ in range(steps):
        op = "+" if kind == "sum" else rng.choice("+-*")
        ops.append((op, rng.choice(CHAIN_MULTIPLIERS) if op == "*" else rng.randint(1, 9)))
    terms = [f"{op}{d}" for op, d in ops]
    return (f"chain/{start}{''.join(terms)}", f"{start} {' '.join(terms)} = ",
            str(chain_value(start, ops, kind)))


# ---------------------------------------------------------------------------------------------
# Hops (compute): variable chasing. "let q = 4 x = 7 b = q m = x k = b\n; k ? 4": hops_chains chains, each a root
# "v = digit" followed by copies "w = v"; the query is the end of one chain, `hops` copies from its root, and
# the answer is the root's digit. The roots' digits are distinct, the letters are distinct within a problem,
# and the assignments come in random order (a copy may precede the definition it reads), so the chain has to
# be searched hop by hop at the query; the distractor chains make "the only digit" or "the nearest digit"
# wrong answers. Each query is a line of its own, so a greedy answer ends at the newline (exact match reads the
# first line of the continuation), and a training problem can carry hops_queries of them.


def _hops_problem(rng: random.Random, hops: int, cfg: SyntheticConfig) -> list[list[str]]:
    """The chains of one problem, each [digit, root, copy1, ...]; chain 0 (the queried one) has `hops` copies,
    the distractors a count uniform in [hops_min, hops_max]."""
    lengths = [hops] + [rng.randint(cfg.hops_min, cfg.hops_max) for _ in range(cfg.hops_chains - 1)]
    digits = rng.sample(range(10), cfg.hops_chains)
    letters = iter(rng.sample(_VARS, sum(lengths) + len(lengths)))
    return [[str(d)] + [next(letters) for _ in range(n + 1)] for d, n in zip(digits, lengths)]


def hops_key(chains: list[list[str]]) -> str:
    """The canonical problem, for the hold-out: its chains in sorted order, each as digit + letters from the root
    ("hops/4qbk/7xm" for q = 4, b = q, k = b and x = 7, m = x). It ignores the order of the assignments and
    which variables are queried, so no ordering of a held-out problem, with any queries, is ever trained on."""
    return "hops/" + "/".join(sorted("".join(c) for c in chains))


def hops_assignments(chains: list[list[str]]) -> list[tuple[str, str]]:
    """(variable, value) of every assignment, chain by chain: (root, digit), then (copy, previous)."""
    return [(c[i], c[i - 1]) for c in chains for i in range(1, len(c))]


def _hops_text(rng: random.Random, chains: list[list[str]]) -> str:
    stmts = hops_assignments(chains)
    rng.shuffle(stmts)
    # "let " first, so that every variable is the same BPE token (" q") wherever it stands in the line.
    return "let " + " ".join(f"{v} = {x}" for v, x in stmts) + "\n"


def _hops_eval(rng: random.Random, hops: int, cfg: SyntheticConfig) -> tuple[str, str, str]:
    """(key, prompt, answer) of one problem whose query is the end of chain 0."""
    chains = _hops_problem(rng, hops, cfg)
    return hops_key(chains), _hops_text(rng, chains) + f"; {chains[0][-1]} ? ", chains[0][0]


def _hops_train(rng: random.Random, cfg: SyntheticConfig) -> tuple[str, str, str]:
    """(key, problem text minus its last answer, last answer): the first query is the end of chain 0 (as in
    eval), the other hops_queries - 1 are distinct other variables whose hop count is in [hops_min, hops_max]."""
    chains = _hops_problem(rng, rng.randint(cfg.hops_min, cfg.hops_max), cfg)
    queries = [(chains[0][-1], chains[0][0])]
    others = [(c[i], c[0]) for c in chains for i in range(1 + cfg.hops_min, len(c)) if c[i] != chains[0][-1]]
    queries += rng.sample(others, min(cfg.hops_queries - 1, len(others)))
    text = _hops_text(rng, chains) + "\n".join(f"; {v} ? {d}" for v, d in queries)
    return hops_key(chains), text[:-1], text[-1]


# ---------------------------------------------------------------------------------------------
# Training stream


def _state(rng: random.Random, ent: Entity, attr: str) -> str:
    kind, values = _fields(ent, attr)
    return rng.choice(STATEMENTS[kind]).format(**values)


def _train_qa(rng: random.Random, ent: Entity, attr: str) -> str:
    kind, values = _fields(ent, attr)
    return f"Q: {rng.choice(TRAIN_QUESTIONS[kind]).format(**values)}\nA: {fact_answer(ent, attr)}"


def _fact_doc(rng: random.Random, cfg: SyntheticConfig, by_name: dict[str, Entity], ent: Entity) -> str:
    # Every fact about `ent` is stated, so one pass over the shuffled entities covers the world.
    attrs = [a for a, _ in ent.facts()]
    rng.shuffle(attrs)
    sentences = [_state(rng, ent, a) for a in attrs]
    mentioned = [ent]
    if ent.relations and rng.random() < 0.5:
        other = by_name[rng.choice(ent.relations)[1]]
        extra = [a for a, _ in other.facts()]
        for a in rng.sample(extra, rng.randint(1, 2)):
            sentences.append(_state(rng, other, a))
        mentioned.append(other)
    text = " ".join(sentences)
    if rng.random() < cfg.qa_prob:
        qa = []
        for _ in range(rng.randint(1, 2)):
            who = rng.choice(mentioned)
            qa.append(_train_qa(rng, who, rng.choice(who.facts())[0]))
        text += "\n" + "\n".join(qa)
    return text


RECALL_LINES_MIN, RECALL_LINES_MAX = 4, 8  # facts per recall document
CHAIN_LINES_MIN, CHAIN_LINES_MAX = 4, 8  # problems per chain document
HOPS_PROBLEMS_MIN, HOPS_PROBLEMS_MAX = 2, 4  # problems per hops document


def _draw_train(rng: random.Random, cfg: SyntheticConfig, draw: Callable[[], tuple[str, str, str]],
                is_held_out: Callable[[str, float], bool] = held_out) -> str:
    while True:
        key, prompt, answer = draw()
        if not is_held_out(key, cfg.holdout_fraction):
            return prompt + answer


def train_documents(cfg: SyntheticConfig, seed_offset: int = 0) -> Iterator[str]:
    """Unlimited training documents (no separators), deterministic for (cfg, seed_offset).

    Never emits a held-out arithmetic/program/gsm/chain/hops problem or an eval-only question phrasing.
    With mix_recall = mix_chain = mix_hops = 0 the stream is the same as before those categories existed.
    """
    cfg.validate()
    world = build_world(cfg)
    by_name = {e.name: e for e in world.entities}
    first_names = world.first_names()
    rng = random.Random(f"dualpath.synthetic/train/{cfg.seed}/{seed_offset}")
    weights = tuple(getattr(cfg, MIX_FIELDS[c]) for c in CATEGORIES)
    total = sum(weights)
    cum = [sum(weights[: i + 1]) / total for i in range(len(weights))]
    order: list[int] = []
    facts = build_recall(cfg) if cfg.mix_recall > 0 else ()
    recall_order: list[int] = []

    def next_fact() -> str:
        # Shuffled passes over the recall world: every fact is stated once per recall_facts lines.
        nonlocal recall_order
        if not recall_order:
            recall_order = list(range(len(facts)))
            rng.shuffle(recall_order)
        return recall_line(*facts[recall_order.pop()])

    def arith():
        return _arith(rng, cfg)

    def program():
        return _program(rng, rng.randint(cfg.program_depth_min, cfg.program_depth_max))

    def gsm():
        return _gsm(rng, first_names)

    def chain():
        return _chain(rng, rng.randint(cfg.chain_steps_min, cfg.chain_steps_max), cfg.chain_ops)

    def hops():
        return _hops_train(rng, cfg)

    while True:
        u = rng.random()
        if u < cum[0]:
            if not order:
                order = list(range(len(world.entities)))
                rng.shuffle(order)
            yield _fact_doc(rng, cfg, by_name, world.entities[order.pop()])
        elif u < cum[1]:
            yield "\n".join(_draw_train(rng, cfg, arith) for _ in range(rng.randint(3, 8)))
        elif u < cum[2]:
            yield "\n".join(_draw_train(rng, cfg, program) for _ in range(rng.randint(2, 4)))
        elif u < cum[3]:  # with mix_recall = mix_chain = 0, cum[3] == 1.0 and this is the old `else`
            yield _draw_train(rng, cfg, gsm)
        elif u < cum[4]:
            yield "\n".join(next_fact() for _ in range(rng.randint(RECALL_LINES_MIN, RECALL_LINES_MAX)))
        elif u < cum[5]:  # with mix_hops = 0, cum[5] == 1.0 and this is the old `else`
            n = rng.randint(CHAIN_LINES_MIN, CHAIN_LINES_MAX)
            yield "\n".join(_draw_train(rng, cfg, chain, chain_held_out) for _ in range(n))
        else:
            n = rng.randint(HOPS_PROBLEMS_MIN, HOPS_PROBLEMS_MAX)
            yield "\n".join(_draw_train(rng, cfg, hops) for _ in range(n))


# ---------------------------------------------------------------------------------------------
# Evaluation


def _example(category: str, prompt: str, answer: str, **dial: int) -> dict:
    return {"category": category, "text": prompt + answer, "prompt": prompt, "answer": answer,
            "answer_start": len(prompt), "answer_end": len(prompt) + len(answer), **dial}


def _distinct(n: int, patience: int, draw: Callable[[], tuple[str, str, str] | None]) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs with distinct keys; gives up after `patience` draws in a row add nothing,
    which only happens once the pool is (nearly) exhausted."""
    out, seen, stale = [], set(), 0
    while len(out) < n and stale < patience:
        got = draw()
        if got is None or got[0] in seen:
            stale += 1
            continue
        seen.add(got[0])
        out.append(got[1:])
        stale = 0
    return out


def _eval_facts(rng: random.Random, world: World, n: int) -> list[dict]:
    def draw():
        ent = rng.choice(world.entities)
        attr = rng.choice(ent.facts())[0]
        kind, values = _fields(ent, attr)
        prompt = f"Q: {rng.choice(EVAL_QUESTIONS[kind]).format(**values)}\nA: "
        return prompt, prompt, fact_answer(ent, attr)

    pairs = _distinct(n, 5000, draw)
    if len(pairs) < n:
        raise DataError(f"only {len(pairs)} distinct fact queries exist; raise n_entities or lower n_per_category")
    return [_example("fact", p, a) for p, a in pairs]


def _eval_held_out(cfg: SyntheticConfig, category: str, n: int,
                   draw: Callable[[], tuple[str, str, str]]) -> list[dict]:
    def held():
        got = draw()
        return got if held_out(got[0], cfg.holdout_fraction) else None

    pairs = _distinct(n, int(200 / cfg.holdout_fraction) + 1000, held)
    if len(pairs) < n:
        raise DataError(f"only {len(pairs)} distinct held-out {category} problems found; widen the digit or "
                        f"depth range, raise holdout_fraction or lower n_per_category")
    return [_example(category, p, a) for p, a in pairs]


def _eval_recall(cfg: SyntheticConfig, rng: random.Random, n: int) -> list[dict]:
    """min(n, recall_facts) distinct facts: the whole world when n exceeds it (recall holds nothing out,
    so a small world is still a complete test, and `dualpath prepare`'s default of 200 keeps working)."""
    facts = build_recall(cfg)
    order = list(range(len(facts)))
    rng.shuffle(order)  # the whole permutation, so a smaller n gives a prefix
    return [_example("recall", recall_line(k, ""), v, facts=cfg.recall_facts)
            for k, v in (facts[i] for i in order[:n])]


def _round_robin(cfg: SyntheticConfig, category: str, dial: str, counts: range, n: int,
                 draw: Callable[[random.Random, int], tuple[str, str, str]], hint: str,
                 is_held_out: Callable[[str, float], bool] = held_out) -> list[dict]:
    """Round robin over the dial values, one independent held-out stream per value; a value whose held-out
    pool runs dry drops out."""
    patience = int(200 / cfg.holdout_fraction) + 1000

    def stream(k: int) -> Iterator[tuple[str, str]]:
        rng = random.Random(f"dualpath.synthetic/eval/{cfg.seed}/{category}/{k}")
        seen: set[str] = set()
        stale = 0
        while stale < patience:
            key, prompt, answer = draw(rng, k)
            if key in seen or not is_held_out(key, cfg.holdout_fraction):
                stale += 1
                continue
            seen.add(key)
            stale = 0
            yield prompt, answer

    active = list(counts)
    streams = {k: stream(k) for k in active}
    out: list[dict] = []
    j = 0
    while len(out) < n and active:
        j %= len(active)
        got = next(streams[active[j]], None)
        if got is None:
            del active[j]
            continue
        out.append(_example(category, *got, **{dial: active[j]}))
        j += 1
    if len(out) < n:
        raise DataError(f"only {len(out)} distinct held-out {category} problems found; {hint}, "
                        f"raise holdout_fraction or lower n_per_category")
    return out


def _eval_chain(cfg: SyntheticConfig, n: int) -> list[dict]:
    """Round robin over the step counts from 2 (so the problems for a given count do not depend on the
    configured range); one-step chains are all trained (chain_held_out), so none is held out."""
    if cfg.chain_steps_max < 2:
        raise DataError("chain eval needs compositions: raise chain_steps_max to 2 or more (one-step chains are "
                        "all in training)")
    return _round_robin(cfg, "chain", "steps", range(max(2, cfg.chain_steps_min), cfg.chain_steps_max + 1), n,
                        lambda rng, k: _chain(rng, k, cfg.chain_ops), "raise chain_steps_max", chain_held_out)


def _eval_hops(cfg: SyntheticConfig, n: int) -> list[dict]:
    """Round robin over the hop counts of the query; the distractors' lengths follow the configured range."""
    return _round_robin(cfg, "hops", "hops", range(cfg.hops_min, cfg.hops_max + 1), n,
                        lambda rng, k: _hops_eval(rng, k, cfg), "raise hops_max or hops_chains")


def eval_examples(cfg: SyntheticConfig, n_per_category: int,
                  categories: tuple[str, ...] | list[str] | None = None) -> list[dict]:
    """Held-out examples, n_per_category of each category (recall: at most recall_facts, the whole world),
    in the order of CATEGORIES; deterministic.

    `categories` defaults to cfg.trained_categories() (those whose mix weight is > 0). Each example is
    {"category", "text", "prompt", "answer", "answer_start", "answer_end"} with
    prompt == text[:answer_start] and answer == text[answer_start:answer_end]; recall and chain
    examples also carry their dial (DIALS: "facts" or "steps"), hops examples theirs ("hops"). A smaller n_per_category gives a prefix
    of each category's examples.
    """
    cfg.validate()
    if isinstance(n_per_category, bool) or not isinstance(n_per_category, int) or n_per_category < 0:
        raise ConfigError(f"n_per_category must be an integer >= 0, got {n_per_category!r}")
    wanted = cfg.trained_categories() if categories is None else tuple(categories)
    for c in wanted:
        if c not in CATEGORIES:
            raise ConfigError(f"unknown synthetic category {c!r} (choose from {', '.join(CATEGORIES)})")
    world = build_world(cfg)
    first_names = world.first_names()

    def rng_for(category: str) -> random.Random:
        return random.Random(f"dualpath.synthetic/eval/{cfg.seed}/{category}")

    out: list[dict] = []
    if "fact" in wanted:
        out += _eval_facts(rng_for("fact"), world, n_per_category)
    if "arith" in wanted:
        r = rng_for("arith")
        out += _eval_held_out(cfg, "arith", n_per_category, lambda: _arith(r, cfg))
    if "program" in wanted:
        p = rng_for("program")
        out += _eval_held_out(cfg, "program", n_per_category,
                              lambda: _program(p, p.randint(cfg.program_depth_min, cfg.program_depth_max)))
    if "gsm" in wanted:
        g = rng_for("gsm")
        out += _eval_held_out(cfg, "gsm", n_per_category, lambda: _gsm(g, first_names))
    if "recall" in wanted:
        out += _eval_recall(cfg, rng_for("recall"), n_per_category)
    if "chain" in wanted:
        out += _eval_chain(cfg, n_per_category)
    if "hops" in wanted:
        out += _eval_hops(cfg, n_per_category)
    return out


def by_dial(examples: list[dict]) -> list[dict]:
    """Copies of the examples with the dial value folded into the category ("chain@steps=3",
    "recall@facts=1000", the naming eval.evaluate uses for its per-dial rows), so any per-category tool
    (e.g. analysis.by_category.routing_by_category) reports one row per dial value. Other examples are
    kept as they are. `parse_dial` reverses the naming."""
    out = []
    for ex in examples:
        dial = DIALS.get(ex.get("category", ""))
        if dial is not None and dial in ex:
            ex = {**ex, "category": f"{ex['category']}@{dial}={ex[dial]}"}
        out.append(ex)
    return out


def parse_dial(category: str) -> tuple[str, str | None, int | None]:
    """"chain@steps=3" -> ("chain", "steps", 3); any other name -> (name, None, None)."""
    base, at, rest = category.partition("@")
    name, eq, value = rest.partition("=")
    if at and eq and DIALS.get(base) == name and value.isdigit():
        return base, name, int(value)
    return category, None, None


__all__ = ["CATEGORIES", "MIX_FIELDS", "DIALS", "RELATIONS", "JOBS", "STATEMENTS", "TRAIN_QUESTIONS",
           "EVAL_QUESTIONS", "CHAIN_MULTIPLIERS", "SyntheticConfig", "Entity", "World", "build_world",
           "build_recall", "recall_line", "chain_value", "chain_held_out", "hops_key", "hops_assignments", "fact_answer", "held_out", "train_documents",
           "eval_examples", "by_dial", "parse_dial"]
