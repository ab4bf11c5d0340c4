"""The synthetic capacity-vs-compute corpus: determinism, correctness of every computed answer, and the
separation between the training stream and the held-out evaluation splits."""

from __future__ import annotations

import dataclasses
import itertools
import re
import string
import time

import pytest

from dualpath.config import from_dict
from dualpath.data import synthetic as syn
from dualpath.data.synthetic import (CATEGORIES, EVAL_QUESTIONS, RELATIONS, STATEMENTS, TRAIN_QUESTIONS,
                                     SyntheticConfig, build_world, eval_examples, held_out, train_documents)
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


def test_eval_examples_are_consistent(evals):
    assert [e["category"] for e in evals] == [c for c in CATEGORIES for _ in range(200)]
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
])
def test_config_rejects_bad_values(field, value):
    cfg = dataclasses.replace(SyntheticConfig(min_digits=2, program_depth_min=2), **{field: value})
    with pytest.raises(ConfigError, match=field) as info:
        cfg.validate()
    assert "\n" not in str(info.value)


def test_config_rejects_zero_mix():
    with pytest.raises(ConfigError, match="mix_facts"):
        SyntheticConfig(mix_facts=0, mix_arith=0, mix_programs=0, mix_gsm=0).validate()
    with pytest.raises(ConfigError):
        next(train_documents(SyntheticConfig(n_relations=9)))
    with pytest.raises(ConfigError, match="n_per_category"):
        eval_examples(SyntheticConfig(), -1)


def test_too_small_a_problem_space_is_a_data_error():
    with pytest.raises(DataError, match="arith"):
        eval_examples(SyntheticConfig(min_digits=1, max_digits=1), 500)
