"""The synthetic capacity-vs-compute corpus: determinism, correctness of every computed answer, and the
separation between the training stream and the held-out evaluation splits."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import string
import time

import pytest

from dualpath.config import from_dict
from dualpath.data import synthetic as syn
from dualpath.data.synthetic import (CATEGORIES, DIALS, EVAL_QUESTIONS, RELATIONS, STATEMENTS, TRAIN_QUESTIONS,
                                     SyntheticConfig, build_recall, build_world, by_dial, eval_examples,
                                     held_out, parse_dial, train_documents)
from dualpath.errors import ConfigError, DataError

N_TRAIN = 5000
ARITH_LINE = re.compile(r"(\d+) ([-+*]) (\d+) = (-?\d+)")
ANNOTATION = re.compile(r"(\d+)([-+*/])(\d+) = <<(\d+)([-+*/])(\d+)=(-?\d+)>>(-?\d+)")


def take(cfg: SyntheticConfig, n: int, seed_offset: int = 0) -> list[str]:
    return list(itertools.islice(train_documents(cfg, seed_offset), n))


@pytest.fixture(scope="module")
def cfg() -> SyntheticConfig:
    return SyntheticConfig()


@pytest.fixture(scope="module")
def train(cfg) -> list[str]:
    return take(cfg, N_TRAIN)


@pytest.fixture(scope="module")
def train_text(train) -> str:
    return "\n\n".join(train)


@pytest.fixture(scope="module")
def evals(cfg) -> list[dict]:
    return eval_examples(cfg, 200)


def apply(a: int, op: str, b: int) -> int:
    if op == "/":
        assert a % b == 0, f"{a}/{b} is not exact"
        return a // b
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def run_program(prompt: str) -> int:
    """Execute 'a = 7; b = a + 5; ...; b = ? ' with a tiny interpreter of our own."""
    *stmts, query = prompt.rstrip().split("; ")
    env: dict[str, int] = {}
    for s in stmts:
        var, rhs = s.split(" = ")
        parts = rhs.split(" ")
        val = lambda t: env[t] if t in env else int(t)  # noqa: E731
        env[var] = val(parts[0]) if len(parts) == 1 else apply(val(parts[0]), parts[1], val(parts[2]))
    var, q = query.split(" = ")
    assert q == "?"
    return env[var]


def fragments(template: str) -> list[str]:
    return [f for f in re.split(r"\{\w+\}", template) if f]


# ---------------------------------------------------------------------------------------------
# Determinism and the world


def test_same_seed_same_documents(cfg, train):
    assert take(cfg, 300) == train[:300]
    assert eval_examples(cfg, 20) == eval_examples(cfg, 20)


def test_different_seed_or_offset_different_documents(cfg, train):
    other = take(SyntheticConfig(seed=1), 300)
    assert sum(a != b for a, b in zip(other, train)) > 250
    shifted = take(cfg, 300, seed_offset=1)
    assert sum(a != b for a, b in zip(shifted, train)) > 250
    assert eval_examples(SyntheticConfig(seed=1), 20) != eval_examples(cfg, 20)


def test_world_is_deterministic_and_well_formed(cfg):
    world = build_world(cfg)
    assert world == build_world(cfg)
    assert world != build_world(SyntheticConfig(seed=1))
    names = [e.name for e in world.entities]
    assert len(names) == cfg.n_entities == len(set(names))
    assert len(world.cities) == cfg.city_count() and len(set(world.cities)) == len(world.cities)
    parts = {p for n in names for p in n.split(" ")}
    assert not parts & set(world.cities)
    for e in world.entities:
        assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", e.name)
        assert e.city in world.cities and e.job in syn.JOBS
        assert syn.YEAR_MIN <= e.birth_year <= syn.YEAR_MAX
        kinds = [k for k, _ in e.relations]
        assert len(kinds) == cfg.n_relations == len(set(kinds)) and set(kinds) <= set(RELATIONS)
        for _, other in e.relations:
            assert other != e.name and other in names


def test_world_ignores_the_mix_and_stream_knobs(cfg):
    assert build_world(dataclasses.replace(cfg, mix_facts=0.1, holdout_fraction=0.2, max_digits=6)) \
        == build_world(cfg)


# ---------------------------------------------------------------------------------------------
# Every computed answer in the training stream is right


def test_training_arithmetic_is_correct(train):
    lines = [ln for d in train for ln in d.split("\n") if ARITH_LINE.fullmatch(ln)]
    assert len(lines) > 2000
    ops = set()
    for ln in lines:
        a, op, b, r = ARITH_LINE.fullmatch(ln).groups()
        assert apply(int(a), op, int(b)) == int(r), ln
        ops.add(op)
        assert 1 <= len(a) <= 4 and 1 <= len(b) <= 4
    assert ops == {"+", "-", "*"}


def test_training_programs_are_correct(cfg, train):
    depths = set()
    n = 0
    for d in train:
        for ln in d.split("\n"):
            if " = ? " not in ln:
                continue
            prompt, answer = ln.rsplit(" ", 1)
            assert run_program(prompt + " ") == int(answer), ln
            depths.add(ln.count(";") - 1)
            n += 1
    assert n > 1000
    assert depths == set(range(cfg.program_depth_min, cfg.program_depth_max + 1))


def test_training_gsm_annotations_are_correct(train):
    docs = [d for d in train if d.startswith("Question: ")]
    assert len(docs) > 200
    for d in docs:
        question, answer = d.split("\nAnswer: ")
        steps = answer.split("\n")
        final = re.fullmatch(r"#### (\d+)", steps[-1])
        assert final, d
        found = ANNOTATION.findall(answer)
        assert len(found) >= 2 and len(found) == answer.count("<<")
        for a, op, b, a2, op2, b2, r, shown in found:
            assert (a, op, b) == (a2, op2, b2)  # the prose and the calculator agree
            assert apply(int(a), op, int(b)) == int(r) == int(shown), d
        assert found[-1][6] == final.group(1)


def test_mix_controls_document_types(cfg):
    only_facts = take(dataclasses.replace(cfg, mix_arith=0, mix_programs=0, mix_gsm=0), 200)
    assert not any(re.search(r"\d [-+*] \d|<<|= \?", d) for d in only_facts)
    only_gsm = take(dataclasses.replace(cfg, mix_facts=0, mix_arith=0, mix_programs=0), 50)
    assert all(d.startswith("Question: ") for d in only_gsm)


def test_facts_are_all_stated_within_one_pass_over_the_world():
    cfg = SyntheticConfig(n_entities=30, n_relations=3, mix_arith=0, mix_programs=0, mix_gsm=0)
    world = build_world(cfg)
    docs = take(cfg, cfg.n_entities)
    for e in world.entities:
        about = [d for d in docs if e.name in d]
        for attr, answer in e.facts():
            assert any(answer in d for d in about), (e.name, attr)


def test_generation_is_fast(cfg):
    t0 = time.perf_counter()
    size = 0
    for d in train_documents(cfg):
        size += len(d) + 1
        if size >= 1_000_000:
            break
    assert time.perf_counter() - t0 < 2.0


# ---------------------------------------------------------------------------------------------
# Evaluation examples


def test_eval_examples_are_consistent(cfg, evals):
    assert cfg.trained_categories() == ("fact", "arith", "program", "gsm")
    assert [e["category"] for e in evals] == [c for c in cfg.trained_categories() for _ in range(200)]
    for e in evals:
        assert set(e) == {"category", "text", "prompt", "answer", "answer_start", "answer_end"}
        assert e["text"][e["answer_start"]:e["answer_end"]] == e["answer"] != ""
        assert e["prompt"] == e["text"][:e["answer_start"]] and e["text"].startswith(e["prompt"])
        assert e["answer"] == e["answer"].strip()
    for c in CATEGORIES:
        texts = [e["text"] for e in evals if e["category"] == c]
        assert len(set(texts)) == len(texts), c


def test_smaller_eval_is_a_prefix(cfg, evals):
    small = eval_examples(cfg, 15)
    for c in CATEGORIES:
        assert [e for e in small if e["category"] == c] == [e for e in evals if e["category"] == c][:15]
    assert eval_examples(cfg, 0) == []


def test_eval_computed_answers_are_correct(cfg, evals):
    for e in evals:
        if e["category"] == "arith":
            a, op, b, r = ARITH_LINE.fullmatch(e["text"]).groups()
            assert apply(int(a), op, int(b)) == int(r)
            assert held_out(f"arith/{a}{op}{b}", cfg.holdout_fraction)
        elif e["category"] == "program":
            assert run_program(e["prompt"]) == int(e["answer"])
        elif e["category"] == "gsm":
            assert e["prompt"].endswith("\n#### ")
            last = ANNOTATION.findall(e["prompt"])[-1]
            assert apply(int(last[0]), last[1], int(last[2])) == int(e["answer"])


def test_eval_fact_answers_match_the_world(cfg, evals):
    world = build_world(cfg)
    by_name = {e.name: e for e in world.entities}
    rel_alt = "|".join(map(re.escape, RELATIONS.values()))
    patterns = []
    for kind, templates in EVAL_QUESTIONS.items():
        for t in templates:
            rx = re.escape(t)
            rx = rx.replace(r"\{name\}", r"(?P<name>[A-Z][a-z]+ [A-Z][a-z]+)")
            rx = rx.replace(r"\{a_rel\}", rf"an? (?P<rel>{rel_alt})").replace(r"\{rel\}", rf"(?P<rel>{rel_alt})")
            patterns.append((kind, re.compile(rf"Q: {rx}\nA: ")))
    kinds_seen = set()
    for e in (x for x in evals if x["category"] == "fact"):
        hits = [(k, m) for k, p in patterns if (m := p.fullmatch(e["prompt"]))]
        assert len(hits) == 1, e["prompt"]
        kind, m = hits[0]
        ent = by_name[m.group("name")]
        if kind == "relation":
            key = next(k for k, v in RELATIONS.items() if v == m.group("rel"))
            expected = dict(ent.relations)[key]
        else:
            expected = {"city": ent.city, "job": ent.job, "birth_year": str(ent.birth_year)}[kind]
        assert e["answer"] == expected
        kinds_seen.add(kind)
    assert kinds_seen == set(EVAL_QUESTIONS)


# ---------------------------------------------------------------------------------------------
# Hold-out: nothing in the eval splits is in the training stream


def test_eval_problems_never_appear_in_training(evals, train):
    train_prompts = set()
    train_questions = set()
    for d in train:
        if d.startswith("Question: "):
            train_questions.add(d.split("\n")[0])
        for ln in d.split("\n"):
            if ARITH_LINE.fullmatch(ln):
                train_prompts.add(ln.rsplit(" ", 1)[0] + " ")
            elif " = ? " in ln:
                train_prompts.add(ln.rsplit(" ", 1)[0] + " ")
    assert len(train_prompts) > 3000 and len(train_questions) > 200
    for e in evals:
        if e["category"] in ("arith", "program"):
            assert e["prompt"] not in train_prompts, e["prompt"]
        elif e["category"] == "gsm":
            assert e["text"].split("\n")[0] not in train_questions


def test_holdout_key_ignores_variable_names():
    # Two programs that differ only in their letters share one key, so renaming cannot leak a problem.
    import random

    keys = {}
    for i in range(3000):
        key, prompt, _ = syn._program(random.Random(i), 3)
        canon = prompt
        for j, v in enumerate(dict.fromkeys(re.findall(r"\b[a-z]\b", prompt))):
            canon = re.sub(rf"\b{v}\b", string.ascii_uppercase[j], canon)
        assert keys.setdefault(key, canon) == canon


def test_holdout_fraction_is_respected(cfg):
    import random

    rng = random.Random(0)
    keys = {syn._arith(rng, cfg)[0] for _ in range(20000)}
    share = sum(held_out(k, cfg.holdout_fraction) for k in keys) / len(keys)
    assert 0.03 < share < 0.07


def test_eval_question_templates_never_reach_training(train_text):
    train_templates = [t for ts in (*STATEMENTS.values(), *TRAIN_QUESTIONS.values()) for t in ts]
    for kind, templates in EVAL_QUESTIONS.items():
        assert not set(templates) & set(TRAIN_QUESTIONS[kind])
        for t in templates:
            longest = max(fragments(t), key=len)
            assert len(longest) >= 10
            assert not any(longest in tt for tt in train_templates), t
            assert longest not in train_text, t


def test_enough_paraphrases(cfg):
    for kind, templates in STATEMENTS.items():
        assert len(templates) >= 8 and len(set(templates)) == len(templates), kind
    assert set(STATEMENTS) == set(TRAIN_QUESTIONS) == set(EVAL_QUESTIONS)


def test_every_training_phrasing_is_used(train_text):
    for kind, templates in (*STATEMENTS.items(), *TRAIN_QUESTIONS.items()):
        for t in templates:
            assert max(fragments(t), key=len) in train_text, t


def test_eval_facts_were_seen_in_training(cfg, evals, train):
    # The phrasing is new, the fact is not: some training document states the name with the answer.
    names = [ent.name for ent in build_world(cfg).entities]
    for e in [x for x in evals if x["category"] == "fact"][:50]:
        name = next(n for n in names if f" {n}" in f" {e['prompt']}")
        assert any(name in d and e["answer"] in d for d in train), e["prompt"]


# ---------------------------------------------------------------------------------------------
# Config


def test_config_loads_from_plain_mapping():
    cfg = from_dict(SyntheticConfig, {"seed": 3, "max_digits": 6, "mix_gsm": 0.5, "holdout_fraction": "0.1"})
    assert cfg.validate() is cfg and cfg.max_digits == 6 and cfg.holdout_fraction == 0.1
    for f in dataclasses.fields(SyntheticConfig):
        assert f.type in ("int", "float", "bool", "str", int, float, bool, str), f.name


@pytest.mark.parametrize("field,value", [
    ("n_entities", 1), ("n_entities", 10**6), ("n_relations", -1), ("n_relations", 6), ("n_cities", 1), ("n_cities", 2001),
    ("min_digits", 0), ("max_digits", 0), ("program_depth_min", 0), ("program_depth_max", 1),
    ("program_depth_max", 21), ("mix_arith", -0.1), ("qa_prob", 1.5), ("holdout_fraction", 0.0),
    ("holdout_fraction", 0.9), ("mix_gsm", float("nan")), ("seed", 1.5), ("n_entities", "200"),
    ("mix_recall", -1.0), ("mix_chain", float("inf")), ("mix_chain", "1"), ("recall_facts", 0),
    ("recall_facts", 100_001), ("recall_facts", 2.0), ("recall_value_digits", 0), ("recall_value_digits", 7),
    ("chain_steps_min", 0), ("chain_steps_min", 31), ("chain_steps_max", 1), ("chain_steps_max", 31),
    ("chain_steps_max", True), ("mix_hops", -1.0), ("hops_min", -1), ("hops_min", 25), ("hops_max", 0),
    ("hops_max", 25), ("hops_chains", 1), ("hops_chains", 11), ("hops_queries", 0), ("hops_queries", 9),
    ("hops_chains", 2.0), ("chain_ops", "mod7"), ("chain_ops", None),
])
def test_config_rejects_bad_values(field, value):
    cfg = dataclasses.replace(SyntheticConfig(min_digits=2, program_depth_min=2, chain_steps_min=2, hops_min=1),
                              **{field: value})
    with pytest.raises(ConfigError, match=field) as info:
        cfg.validate()
    assert "\n" not in str(info.value)


def test_config_rejects_zero_mix():
    with pytest.raises(ConfigError, match="mix_facts"):
        SyntheticConfig(mix_facts=0, mix_arith=0, mix_programs=0, mix_gsm=0).validate()
    with pytest.raises(ConfigError, match="mix_chain"):
        SyntheticConfig(mix_facts=0, mix_arith=0, mix_programs=0, mix_gsm=0, mix_recall=0).validate()
    SyntheticConfig(mix_facts=0, mix_arith=0, mix_programs=0, mix_gsm=0, mix_chain=0.1).validate()
    with pytest.raises(ConfigError):
        next(train_documents(SyntheticConfig(n_relations=9)))
    with pytest.raises(ConfigError, match="n_per_category"):
        eval_examples(SyntheticConfig(), -1)


def test_too_small_a_problem_space_is_a_data_error():
    with pytest.raises(DataError, match="arith"):
        eval_examples(SyntheticConfig(min_digits=1, max_digits=1), 500)



# ---------------------------------------------------------------------------------------------
# The default corpus is byte-identical to the one before recall and chain existed

def stream_digest(cfg: SyntheticConfig, n: int = 2000) -> str:
    d = hashlib.sha256()
    for doc in itertools.islice(train_documents(cfg), n):
        d.update(doc.encode())
        d.update(b"\x00")
    return d.hexdigest()


def eval_digest(cfg: SyntheticConfig, n: int = 50) -> str:
    return hashlib.sha256(json.dumps(eval_examples(cfg, n), sort_keys=True).encode()).hexdigest()


# Computed with the code before the recall and chain categories were added.
LEGACY = [
    ({}, "1642614c87bca7ffb726dfc72fde331a670d4b0b31199f18c35181d665d61505",
     "16995aa0d93d88e9df441b41cb33030bb7adf75fb4ef963bcc8101c620622304"),
    (dict(seed=3, mix_facts=0.1, mix_gsm=0.7, n_entities=50),
     "834a0e47ccdb8c7f4eb14cf4253682cfdf06b4dd0e94c077dd7f6d1bc351a88d",
     "d55966c2d325ecceae69c29e79e37790bc860051381afac6c75fa00c034f38aa"),
]


@pytest.mark.parametrize("knobs,stream,evals_hash", LEGACY)
def test_legacy_corpora_are_byte_identical(knobs, stream, evals_hash):
    cfg = SyntheticConfig(**knobs)
    assert stream_digest(cfg) == stream
    assert eval_digest(cfg) == evals_hash
    # The new knobs do nothing while their mixes are 0.
    other = dataclasses.replace(cfg, recall_facts=7, recall_value_digits=1, chain_steps_min=9, chain_steps_max=9,
                                hops_min=2, hops_max=5, hops_chains=4, hops_queries=2)
    assert stream_digest(other, 500) == stream_digest(cfg, 500)
    assert eval_examples(other, 20) == eval_examples(cfg, 20)


# ---------------------------------------------------------------------------------------------
# The mechanism tasks: recall (capacity) and chain (compute)

CHAIN_LINE = re.compile(r"(\d)((?: [-+*]\d)+) = (\d)")
RECALL_LINE = re.compile(r"([a-z]+) : (\d+)")
ONLY_NEW = dict(mix_facts=0, mix_arith=0, mix_programs=0, mix_gsm=0, mix_recall=1, mix_chain=1)


def chain_answer(prompt: str) -> tuple[int, int]:
    """(answer, steps) of '7 +3 *3 -5 = ', computed here: the ops are applied one by one, modulo 10."""
    start, *ops = prompt.removesuffix(" = ").split(" ")
    x = int(start)
    for t in ops:
        op, d = t[0], int(t[1:])
        assert 1 <= d <= 9 and (op != "*" or d in (3, 7, 9)), t
        x = {"+": x + d, "-": x - d, "*": x * d}[op] % 10
    return x, len(ops)


@pytest.fixture(scope="module")
def mcfg() -> SyntheticConfig:
    return SyntheticConfig(**ONLY_NEW, recall_facts=300, recall_value_digits=3, chain_steps_min=1,
                           chain_steps_max=5)


@pytest.fixture(scope="module")
def mtrain(mcfg) -> list[str]:
    return take(mcfg, 6000)


@pytest.fixture(scope="module")
def mevals(mcfg) -> list[dict]:
    return eval_examples(mcfg, 200)


def lines_of(docs: list[str], rx: re.Pattern) -> list[re.Match]:
    out = []
    for d in docs:
        for ln in d.split("\n"):
            m = rx.fullmatch(ln)
            assert m, ln
            out.append(m)
    return out


def test_mechanism_stream_is_deterministic(mcfg, mtrain, mevals):
    assert take(mcfg, 300) == mtrain[:300]
    assert eval_examples(mcfg, 200) == mevals
    other = take(dataclasses.replace(mcfg, seed=1), 300)
    assert sum(a != b for a, b in zip(other, mtrain)) > 250
    assert sum(a != b for a, b in zip(take(mcfg, 300, seed_offset=1), mtrain)) > 250
    assert build_recall(mcfg) == build_recall(mcfg) != build_recall(dataclasses.replace(mcfg, seed=1))


def test_mix_selects_the_mechanism_documents(mcfg, mtrain):
    recall = [d for d in mtrain if RECALL_LINE.match(d)]
    chain = [d for d in mtrain if CHAIN_LINE.match(d)]
    assert len(recall) + len(chain) == len(mtrain) and 0.45 < len(recall) / len(mtrain) < 0.55
    only = take(dataclasses.replace(mcfg, mix_chain=0), 100)
    assert all(RECALL_LINE.match(d) for d in only)
    only = take(dataclasses.replace(mcfg, mix_recall=0), 100)
    assert all(CHAIN_LINE.match(d) for d in only)
    mixed = take(SyntheticConfig(mix_recall=0.2, mix_chain=0.2), 1000)
    assert any(d.startswith("Question: ") for d in mixed)
    assert any(RECALL_LINE.fullmatch(d.split("\n")[0]) for d in mixed)
    assert any(CHAIN_LINE.fullmatch(d.split("\n")[0]) for d in mixed)


def test_recall_world_is_well_formed(mcfg):
    facts = build_recall(mcfg)
    keys = [k for k, _ in facts]
    assert len(facts) == mcfg.recall_facts == len(set(keys))
    for k, v in facts:
        assert re.fullmatch(r"[a-z]{2,}", k) and re.fullmatch(r"[1-9]\d\d", v)
    # A smaller world is a prefix of a larger one; the value width is a knob.
    assert build_recall(dataclasses.replace(mcfg, recall_facts=50)) == facts[:50]
    assert all(len(v) == 1 for _, v in build_recall(dataclasses.replace(mcfg, recall_value_digits=1)))
    assert all(len(v) == 5 for _, v in build_recall(dataclasses.replace(mcfg, recall_value_digits=5)))


def test_recall_training_states_every_fact_equally_often():
    cfg = SyntheticConfig(mix_facts=0, mix_arith=0, mix_programs=0, mix_gsm=0, mix_recall=1, recall_facts=97)
    world = dict(build_recall(cfg))
    lines = lines_of(take(cfg, 400), RECALL_LINE)
    counts: dict[str, int] = {}
    for m in lines:
        assert world[m.group(1)] == m.group(2)  # every stated fact is the world's
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    assert len(lines) > 10 * len(world) and set(counts) == set(world)
    assert max(counts.values()) - min(counts.values()) <= 1  # shuffled passes over the world


def test_training_chains_are_correct_and_never_held_out(mcfg, mtrain):
    lines = lines_of([d for d in mtrain if CHAIN_LINE.match(d)], CHAIN_LINE)
    assert len(lines) > 10_000
    steps, ops, primitives = set(), set(), set()
    for m in lines:
        prompt = m.group(0).rsplit(" ", 1)[0] + " "
        answer, k = chain_answer(prompt)
        assert answer == int(m.group(3)), m.group(0)
        key = "chain/" + prompt.removesuffix(" = ").replace(" ", "")
        assert not held_out(key, mcfg.holdout_fraction) or k == 1
        steps.add(k)
        ops |= {t[0] for t in m.group(2).split()}
        if k == 1:
            primitives.add(key)
    assert steps == set(range(mcfg.chain_steps_min, mcfg.chain_steps_max + 1)) and ops == set("+-*")
    # every one-step primitive (10 digits x 21 operations) is trained, the ~5% that hash into the hold-out too
    assert len(primitives) == 210 and any(held_out(k, mcfg.holdout_fraction) for k in primitives)


def test_sum_chains_add_digits_and_hold_out_only_unseen_sums():
    cfg = dataclasses.replace(SyntheticConfig(**ONLY_NEW, chain_steps_min=1, chain_steps_max=4), chain_ops="sum",
                              mix_recall=0)
    line = re.compile(r"(\d)((?: \+\d)+) = (\d+)")
    docs = take(cfg, 3000)
    lines = [ln for d in docs for ln in d.split("\n")]
    assert lines and all(line.fullmatch(ln) for ln in lines)
    trained, primitives = set(), set()
    for ln in lines:
        start, *terms = ln.split(" = ")[0].split(" ")
        assert int(ln.split(" = ")[1]) == int(start) + sum(int(t[1:]) for t in terms)  # computed here
        trained.add(ln.split(" = ")[0] + " = ")
        if len(terms) == 1:
            primitives.add(ln)
    assert len(primitives) == 90  # every digit + every 1-9 addend, held-out hash or not
    evals = eval_examples(cfg, 60)
    assert evals and all(e["category"] == "chain" and e["steps"] >= 2 for e in evals)
    for e in evals:
        start, *terms = e["prompt"].removesuffix(" = ").split(" ")
        assert e["answer"] == str(int(start) + sum(int(t[1:]) for t in terms)) and len(terms) == e["steps"]
        assert e["prompt"] not in trained
    # the default is the mod-10 chain, so corpora prepared before the knob are unchanged
    assert SyntheticConfig().chain_ops == "mod10" and take(dataclasses.replace(cfg, chain_ops="mod10"), 50) != docs[:50]


def test_chain_steps_are_bijections_of_the_digits():
    # No step loses information, so the answer depends on the start and on every step.
    for op, d in [("+", d) for d in range(1, 10)] + [("-", d) for d in range(1, 10)] + \
            [("*", d) for d in syn.CHAIN_MULTIPLIERS]:
        assert sorted(syn.chain_value(x, [(op, d)]) for x in range(10)) == list(range(10))


def test_mechanism_eval_examples(mcfg, mevals):
    assert [e["category"] for e in mevals] == ["recall"] * 200 + ["chain"] * 200
    world = dict(build_recall(mcfg))
    for e in mevals:
        assert set(e) == {"category", "text", "prompt", "answer", "answer_start", "answer_end",
                          DIALS[e["category"]]}
        assert e["text"][e["answer_start"]:e["answer_end"]] == e["answer"]
        assert e["prompt"] == e["text"][:e["answer_start"]] and e["answer_end"] == len(e["text"])
        if e["category"] == "recall":
            key = RECALL_LINE.fullmatch(e["text"]).group(1)
            assert e["prompt"] == f"{key} : " and e["answer"] == world[key] and e["facts"] == 300
        else:
            answer, k = chain_answer(e["prompt"])
            assert str(answer) == e["answer"] and e["steps"] == k >= 2  # compositions only
            assert held_out("chain/" + e["prompt"].removesuffix(" = ").replace(" ", ""), mcfg.holdout_fraction)
    for c in ("recall", "chain"):
        texts = [e["text"] for e in mevals if e["category"] == c]
        assert len(set(texts)) == len(texts)
    # Round robin over the step counts from 2: one-step chains are all trained, so none is held out.
    per_step = [sum(e.get("steps") == k for e in mevals) for k in range(1, 6)]
    assert per_step[0] == 0 and max(per_step[1:]) - min(per_step[1:]) <= 1


def test_mechanism_eval_prefix_and_step_streams(mcfg, mevals):
    small = eval_examples(mcfg, 17)
    for c in ("recall", "chain"):
        assert [e for e in small if e["category"] == c] == [e for e in mevals if e["category"] == c][:17]
    # The problems for one step count do not depend on the configured range.
    three = eval_examples(dataclasses.replace(mcfg, chain_steps_min=3, chain_steps_max=3), 30, ["chain"])
    assert [e["text"] for e in three][:20] == [e["text"] for e in mevals if e.get("steps") == 3][:20]


def test_held_out_chains_never_appear_in_training(mcfg, mevals):
    train_prompts = set()
    for d in take(mcfg, 20_000):
        if CHAIN_LINE.match(d):
            train_prompts |= {ln.rsplit(" ", 1)[0] + " " for ln in d.split("\n")}
    assert len(train_prompts) > 20_000
    chains = [e for e in mevals if e["category"] == "chain"]
    assert not {e["prompt"] for e in chains} & train_prompts
    # Every one-step primitive is trained; no held-out two-step chain is, while most of the others are found
    # (the sample draws ~3 per distinct two-step chain).
    short = {f"{s} {op}{d} = " for s in range(10) for op in "+-" for d in range(1, 10)}
    short |= {f"{s} *{d} = " for s in range(10) for d in syn.CHAIN_MULTIPLIERS}
    assert short <= train_prompts
    two = {f"{p[:-3]} {op}" for p in short for op in [f"+{d}" for d in range(1, 10)] + [f"-{d}" for d in range(1, 10)]
           + [f"*{d}" for d in syn.CHAIN_MULTIPLIERS]}
    two = {t + " = " for t in two}
    held = {p for p in two if held_out("chain/" + p.removesuffix(" = ").replace(" ", ""), 0.05)}
    assert 100 < len(held) < 400 and not held & train_prompts
    assert len((two - held) & train_prompts) > 0.85 * len(two - held)


def test_recall_eval_facts_are_in_training_by_design(mcfg, mevals, mtrain):
    stated = {ln for d in mtrain if RECALL_LINE.match(d) for ln in d.split("\n")}
    for e in mevals:
        if e["category"] == "recall":
            assert e["text"] in stated


def test_eval_categories_follow_the_mix_or_the_argument(mcfg):
    assert {e["category"] for e in eval_examples(dataclasses.replace(mcfg, mix_recall=0), 5)} == {"chain"}
    got = eval_examples(SyntheticConfig(mix_chain=0.5), 3)
    assert [e["category"] for e in got] == [c for c in ("fact", "arith", "program", "gsm", "chain") for _ in range(3)]
    assert eval_examples(SyntheticConfig(mix_chain=0.5), 3)[:12] == eval_examples(SyntheticConfig(), 3)
    got = eval_examples(mcfg, 4, categories=["chain", "gsm"])
    assert [e["category"] for e in got] == ["gsm"] * 4 + ["chain"] * 4
    assert eval_examples(mcfg, 4, categories=()) == []
    with pytest.raises(ConfigError, match="unknown synthetic category 'chains'"):
        eval_examples(mcfg, 4, categories=["chains"])


def test_mechanism_eval_too_small(mcfg):
    # Recall holds nothing out: a world smaller than n gives all of its facts, once each.
    small = dataclasses.replace(mcfg, recall_facts=10)
    got = eval_examples(small, 200, ["recall"])
    assert sorted((e["prompt"], e["answer"]) for e in got) == sorted((f"{k} : ", v) for k, v in build_recall(small))
    assert eval_examples(small, 4, ["recall"]) == got[:4]
    with pytest.raises(DataError, match="chain"):
        eval_examples(dataclasses.replace(mcfg, chain_steps_max=1), 50)


def test_by_dial_names_every_dial_value(mevals):
    binned = by_dial(mevals)
    assert len(binned) == len(mevals) and binned[0]["category"] == "recall@facts=300"
    assert {e["category"] for e in binned if e["category"].startswith("chain")} == \
        {f"chain@steps={k}" for k in range(2, 6)}
    for e, b in zip(mevals, binned):
        assert parse_dial(b["category"]) == (e["category"], DIALS[e["category"]], e[DIALS[e["category"]]])
        assert {k: v for k, v in b.items() if k != "category"} == {k: v for k, v in e.items() if k != "category"}
    plain = {"category": "arith", "text": "1 + 1 = 2"}
    assert by_dial([plain]) == [plain] and parse_dial("arith") == ("arith", None, None)
    assert set(DIALS) <= set(CATEGORIES)


def test_new_defaults():
    cfg = SyntheticConfig()
    assert (cfg.mix_recall, cfg.mix_chain) == (0, 0)
    assert (cfg.recall_facts, cfg.recall_value_digits, cfg.chain_steps_min, cfg.chain_steps_max) == (100, 2, 1, 3)
    got = eval_examples(dataclasses.replace(cfg, **ONLY_NEW), 100)
    assert [e["category"] for e in got] == ["recall"] * 100 + ["chain"] * 100
    assert {e["steps"] for e in got if e["category"] == "chain"} == {2, 3}  # compositions only


def test_new_knobs_load_from_a_plain_mapping():
    cfg = from_dict(SyntheticConfig, {"mix_recall": 1, "mix_chain": "0.5", "mix_hops": 2, "recall_facts": 64,
                                      "recall_value_digits": 2, "chain_steps_min": 3, "chain_steps_max": 6})
    assert cfg.validate() is cfg and cfg.trained_categories() == CATEGORIES
    assert (cfg.recall_facts, cfg.chain_steps_min, cfg.chain_steps_max, cfg.mix_chain) == (64, 3, 6, 0.5)


# ---------------------------------------------------------------------------------------------
# Hops (compute): variable chasing among distractor chains, assignments in random order

HOPS_PROBLEM = re.compile(r"let [a-z] = [a-z0-9](?: [a-z] = [a-z0-9])*(?:\n; [a-z] \? \d)+")
HOPS_ONLY = dict(mix_facts=0, mix_arith=0, mix_programs=0, mix_gsm=0, mix_hops=1)


def hops_problems(doc: str) -> list[str]:
    """The problems of a hops document: each is a "let ..." line followed by its query lines."""
    return re.split(r"\n(?=let )", doc)


def parse_hops(text: str) -> tuple[list[tuple[str, str]], list[tuple[str, str | None]]]:
    """([(var, value), ...] in text order, [(query var, stated answer or None), ...]) of a hops problem or
    prompt ("let q = 4 b = q\n; b ? 4\n; q ? 4", or "let q = 4 b = q\n; b ? ")."""
    defs, *queries = text.split("\n")
    assert defs.startswith("let "), text
    toks = defs.removeprefix("let ").split(" ")
    assert len(toks) % 3 == 0 and toks[1::3] == ["="] * (len(toks) // 3), text
    stmts = list(zip(toks[0::3], toks[2::3]))
    qs = []
    for q in queries:
        semi, var, mark, ans = q.split(" ")
        assert semi == ";" and mark == "?", text
        qs.append((var, ans or None))
    return stmts, qs


def resolve(stmts: list[tuple[str, str]], var: str) -> tuple[str, int]:
    """(root digit, hops) of `var`, by following the copies one at a time."""
    env = dict(stmts)
    hops = 0
    while not env[var].isdigit():
        var = env[var]
        hops += 1
        assert hops <= 26, "cycle"
    return env[var], hops


def check_hops_problem(cfg: SyntheticConfig, stmts: list[tuple[str, str]]) -> str:
    """Checks the structure of one problem; returns its canonical key, computed here from the text: the chains
    as digit + letters from the root, sorted."""
    lhs = [v for v, _ in stmts]
    assert len(set(lhs)) == len(lhs) and all(len(v) == 1 and v.islower() for v in lhs)
    env = dict(stmts)
    roots = [v for v, x in stmts if x.isdigit()]
    assert len(roots) == cfg.hops_chains
    assert len({env[r] for r in roots}) == len(roots)  # distinct root digits
    copied_by = {x: v for v, x in stmts if not x.isdigit()}
    assert len(copied_by) == len(stmts) - len(roots)  # every variable is read at most once: chains, no trees
    chains = []
    for r in roots:
        chain = [env[r], r]
        while chain[-1] in copied_by:
            chain.append(copied_by[chain[-1]])
        assert cfg.hops_min <= len(chain) - 2 <= cfg.hops_max
        chains.append("".join(chain))
    assert sum(len(c) - 1 for c in chains) == len(stmts)  # every assignment is on a chain from a root
    return "hops/" + "/".join(sorted(chains))


@pytest.fixture(scope="module")
def hcfg() -> SyntheticConfig:
    return SyntheticConfig(**HOPS_ONLY, mix_recall=1, hops_min=1, hops_max=4, hops_chains=3, hops_queries=3)


@pytest.fixture(scope="module")
def htrain(hcfg) -> list[str]:
    return take(hcfg, 4000)


@pytest.fixture(scope="module")
def hevals(hcfg) -> list[dict]:
    return eval_examples(hcfg, 200)


def test_training_hops_are_correct_and_never_held_out(hcfg, htrain):
    lines = [p for d in htrain if d.startswith("let ") for p in hops_problems(d)]
    assert len(lines) > 5000 and all(HOPS_PROBLEM.fullmatch(p) for p in lines)
    first_hops, other_hops, n_queries, before_use = set(), set(), set(), 0
    for ln in lines:
        stmts, queries = parse_hops(ln)
        key = check_hops_problem(hcfg, stmts)
        assert not held_out(key, hcfg.holdout_fraction), ln
        reads = {x for _, x in stmts}
        assert queries[0][0] not in reads  # the first query (the eval query) is the end of a chain
        assert len({q for q, _ in queries}) == len(queries)
        for i, (q, ans) in enumerate(queries):
            digit, hops = resolve(stmts, q)
            assert ans == digit, ln
            assert hcfg.hops_min <= hops <= hcfg.hops_max
            (first_hops if i == 0 else other_hops).add(hops)
        n_queries.add(len(queries))
        pos = {v: i for i, (v, _) in enumerate(stmts)}
        before_use += sum(pos[x] > pos[v] for v, x in stmts if not x.isdigit())
    assert first_hops == other_hops == set(range(hcfg.hops_min, hcfg.hops_max + 1))
    assert n_queries == {hcfg.hops_queries}
    # Random order: a good share of the copies read a variable that is only defined later in the line.
    copies = sum(len(parse_hops(ln)[0]) - hcfg.hops_chains for ln in lines)
    assert 0.3 < before_use / copies < 0.7


def test_hops_key_ignores_the_order_of_the_assignments():
    chains = [["4", "q", "b", "k"], ["7", "x", "m"]]
    assert syn.hops_key(chains) == syn.hops_key(chains[::-1]) == "hops/4qbk/7xm"
    assert syn.hops_assignments(chains) == [("q", "4"), ("b", "q"), ("k", "b"), ("x", "7"), ("m", "x")]
    cfg = SyntheticConfig(**HOPS_ONLY, hops_chains=2, hops_max=3)
    stmts = syn.hops_assignments(chains)
    assert check_hops_problem(cfg, stmts) == check_hops_problem(cfg, stmts[::-1]) == syn.hops_key(chains)


def test_hops_eval_examples(hcfg, hevals):
    hops = [e for e in hevals if e["category"] == "hops"]
    assert len(hops) == 200 and [e["category"] for e in hevals] == ["recall"] * 100 + ["hops"] * 200
    for e in hops:
        assert set(e) == {"category", "text", "prompt", "answer", "answer_start", "answer_end", "hops"}
        assert e["prompt"] == e["text"][:e["answer_start"]] and e["answer_end"] == len(e["text"])
        assert HOPS_PROBLEM.fullmatch(e["text"]) and e["prompt"].endswith(" ? ")
        stmts, queries = parse_hops(e["prompt"])
        assert len(queries) == 1 and queries[0][1] is None
        assert held_out(check_hops_problem(hcfg, stmts), hcfg.holdout_fraction)
        digit, k = resolve(stmts, queries[0][0])
        assert digit == e["answer"] and k == e["hops"]
        assert queries[0][0] not in {x for _, x in stmts}
    assert len({e["text"] for e in hops}) == 200
    # Round robin over the hop counts: 50 of each of 1..4.
    assert [e["hops"] for e in hops[:8]] == [1, 2, 3, 4, 1, 2, 3, 4]
    assert sorted(sum(e["hops"] == k for e in hops) for k in range(1, 5)) == [50] * 4
    small = eval_examples(hcfg, 9, ["hops"])
    assert small == hops[:9]
    assert {e["category"] for e in by_dial(hops)} == {f"hops@hops={k}" for k in range(1, 5)}
    assert parse_dial("hops@hops=3") == ("hops", "hops", 3)


def test_held_out_hops_never_appear_in_training():
    # A small problem space (two chains of one root each: about 29,000 problems) that 20,000 documents
    # mostly cover, so held-out problems would show up in training if they were not rejected.
    cfg = SyntheticConfig(**HOPS_ONLY, hops_min=0, hops_max=0, hops_chains=2, hops_queries=2)
    keys = set()
    for d in take(cfg, 20_000):
        for ln in hops_problems(d):
            stmts, queries = parse_hops(ln)
            assert len(queries) == 2 and all(resolve(stmts, q) == (a, 0) for q, a in queries)
            keys.add(check_hops_problem(cfg, stmts))
    assert len(keys) > 20_000
    evals = eval_examples(cfg, 300)
    assert {e["hops"] for e in evals} == {0}
    eval_keys = {check_hops_problem(cfg, parse_hops(e["prompt"])[0]) for e in evals}
    assert len(eval_keys) == 300 and not eval_keys & keys


def test_hops_config():
    cfg = SyntheticConfig()
    assert (cfg.mix_hops, cfg.hops_min, cfg.hops_max, cfg.hops_chains, cfg.hops_queries) == (0, 0, 1, 2, 4)
    got = eval_examples(dataclasses.replace(cfg, **HOPS_ONLY), 10)
    assert [e["hops"] for e in got] == [0, 1] * 5
    got = from_dict(SyntheticConfig, {"mix_hops": "1", "hops_min": 2, "hops_max": 5, "hops_chains": 4,
                                      "hops_queries": 2})
    assert got.validate() is got and "hops" in got.trained_categories()
    assert (got.hops_min, got.hops_max, got.hops_chains, got.hops_queries) == (2, 5, 4, 2)
    SyntheticConfig(**HOPS_ONLY, hops_chains=2, hops_max=12).validate()  # 2 * 13 letters: the limit
    with pytest.raises(ConfigError, match="hops_chains"):
        SyntheticConfig(**HOPS_ONLY, hops_chains=7, hops_max=3).validate()  # 28 variables > 26 letters
    with pytest.raises(DataError, match="hops"):
        eval_examples(SyntheticConfig(**HOPS_ONLY, hops_min=0, hops_max=0, hops_chains=2), 2000)
