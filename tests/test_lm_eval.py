"""lm-evaluation-harness: the dualpath tasks (src/dualpath/tasks) on an exported model (`--model hf`) and the
native `--model dualpath` (dualpath.eval.lm_eval), offline, on tiny models and a few documents.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

for _var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # lm-eval's hf model imports it

sys.path.insert(0, str(Path(__file__).parent))
from test_hf_export import make_checkpoint, train_test_tokenizer  # noqa: E402

import dualpath.eval.lm_eval  # noqa: E402,F401  (registers --model dualpath)
from dualpath.errors import DataError, DualPathError  # noqa: E402
from dualpath.generate import generate_tokens  # noqa: E402
from dualpath.hf import export_hf  # noqa: E402
from dualpath.eval.lm_eval import DualPathEvalLM  # noqa: E402
from dualpath.eval.tasks import TASKS_DIR, task_manager  # noqa: E402
from dualpath.eval.tasks import utils as task_utils  # noqa: E402

DATA = Path("/work/shared/data")
GSM8K = DATA / "gsm8k" / "test.jsonl"
WIKITEXT = DATA / "wikitext-2" / "test.txt"
need_data = pytest.mark.skipif(not (GSM8K.is_file() and WIKITEXT.is_file()), reason="shared data sets not present")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_world")
    tok = train_test_tokenizer(root / "tokenizer.json")
    run = make_checkpoint(root, "dual", seed=11, tokenizer=tok)
    return {"root": root, "run": run, "export": export_hf(run, root / "export")}


@pytest.fixture(scope="module")
def tasks():
    return task_manager(include_defaults=False)  # lm-eval's own ~thousands of tasks take seconds to index


def hf_args(world, **kw):
    return {"pretrained": str(world["export"]), "trust_remote_code": True, "dtype": "float32", **kw}


def native_args(world, **kw):
    return {"checkpoint": str(world["run"]), **kw}


def evaluate(model, model_args, task, tm, limit, **kw):
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], limit=limit, device="cpu",
                                   task_manager=tm, log_samples=True, batch_size=kw.pop("batch_size", 32), **kw)


# ----------------------------------------------------------------------------------------------
# The metrics computed without lm-eval: the checkpoint's model, its own per-token losses and its tokenizer


def reference(world, **overrides):
    """(model, tokenizer, eot id, score) for the world's checkpoint; score(ids) is the summed log-likelihood of
    ids[1:] given what precedes each token, in windows of at most the context (each token sees as many earlier
    tokens as fit a window that ends right after it, the windows tiling the sequence from the left)."""
    from dualpath.checkpoint import load_model
    from dualpath.data.tokenizer import load_tokenizer
    from dualpath.model import Overrides

    model, cfg, folder = load_model(world["run"])
    tok = load_tokenizer(folder)
    eot = tok.token_to_id("<|endoftext|>")
    ov = Overrides(**overrides)
    T = cfg.model.seq_len

    @torch.no_grad()
    def score(ids: list[int], first: int = 1) -> float:
        """Sum of log p(ids[i] | ids[<i]) over i >= first."""
        total, done = 0.0, first - 1  # tokens ids[first:] are predicted; `done` of those positions are scored
        while done < len(ids) - 1:
            end = min(done + T, len(ids) - 1)  # predict ids[done+1 .. end]
            start = max(0, end - T)
            x, y = torch.tensor([ids[start:end]]), torch.tensor([ids[start + 1:end + 1]])
            per_tok = model(x, y, overrides=ov, return_per_token_loss=True).per_token_loss[0]
            total -= per_tok[done - start:].double().sum().item()
            done = end
        return total

    return model, tok, eot, score


def tokens_of(world, text: str) -> list[int]:
    return reference(world)[1].encode(text).ids


def text_metrics(world, docs: list[str], **overrides) -> dict:
    """lm-eval's three perplexity metrics of documents scored as <|endoftext|> + the document's tokens."""
    _, tok, eot, score = reference(world, **overrides)
    ll = [score([eot] + tok.encode(d).ids) for d in docs]
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    nwords = sum(len(d.split()) for d in docs)
    return {"ll": ll, "bits_per_byte": -sum(ll) / nbytes / math.log(2), "byte_perplexity": math.exp(-sum(ll) / nbytes),
            "word_perplexity": math.exp(-sum(ll) / nwords)}


def gsm8k_greedy(world, n: int, max_gen: int = 8, **overrides) -> tuple[list[dict], list[str]]:
    """The first n GSM8K rows and the model's own greedy continuations of their prompts ("{question}\\n", no BOS):
    max_gen tokens after the prompt's last 64 - max_gen tokens (the questions are longer than the context, and lm-eval
    left-truncates so that the generation fits), cut at the task's stop sequence "\\n\\n"."""
    from dualpath.model import Overrides

    model, tok, eot, _ = reference(world)
    keep = model.cfg.seq_len - max_gen
    rows = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()[:n]]
    out = []
    for row in rows:
        prompt = tok.encode(row["question"] + "\n").ids
        assert len(prompt) > keep
        ids = list(generate_tokens(model, prompt[-keep:], max_gen, eos_id=eot, overrides=Overrides(**overrides)))
        out.append(tok.decode([t for t in ids if t != eot]).split("\n\n")[0])
    return rows, out


def gsm8k_exact_match(generation: str, answer: str, strict: bool) -> float:
    """The task's filters and metric, written out: the number after '#### ' (strict) or the last number in the
    generation (flexible) against the number after '#### ' in the answer, ignoring commas, '$' and a final '.'."""
    if strict:
        m = re.findall(r"#### (-?[0-9.,]+)", generation)
        got = m[0].strip() if m else "[invalid]"
    else:
        m = re.findall(r"-?[$0-9.,]{2,}|-?[0-9]+", generation)
        got = m[-1].strip() if m else "[invalid]"

    def norm(s: str) -> str:
        s = re.sub(r"(?s).*#### ", "", s.replace(",", "").replace("$", ""))
        return re.sub(r"\.$", "", s).lower()

    return float(norm(got) == norm(answer))


# ----------------------------------------------------------------------------------------------
# Registration


def test_native_model_is_registered_without_hiding_builtin_models():
    from lm_eval.api.registry import get_model

    assert get_model("dualpath") is DualPathEvalLM
    assert get_model("hf").__name__ == "HFLM"
    dualpath.eval.lm_eval.register()  # idempotent
    assert get_model("dualpath") is DualPathEvalLM


def test_task_yamls_are_found(tasks):
    for name in ("dualpath_gsm8k_local", "dualpath_text_ppl", "dualpath_synthetic_cloze"):
        assert name in tasks.all_tasks
    assert (TASKS_DIR / "utils.py").is_file()


# ----------------------------------------------------------------------------------------------
# Native vs exported: the same numbers


def _instances(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args_list)]


def test_native_loglikelihoods_equal_hf(world):
    from lm_eval.models.huggingface import HFLM

    native = DualPathEvalLM(**native_args(world), batch_size=4)
    hf = HFLM(**hf_args(world), device="cpu", batch_size=4)
    assert native.max_length == hf.max_length == 64
    texts = ["First Citizen:\nBefore we proceed any further, hear me speak.",
             WIKITEXT.read_text(encoding="utf-8")[:700] if WIKITEXT.is_file() else "All:\nSpeak, speak." * 30]
    a = native.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    b = hf.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    assert all(math.isfinite(x) and x < 0 for x in a)
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-4 * max(1.0, abs(y)), (x, y)
    pairs = [("First Citizen:", " Before we proceed"), ("Q: Where does he live?\nA:", " Rome"), ("", "hello")]
    a = native.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    b = hf.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    for (x, gx), (y, gy) in zip(a, b):
        assert abs(x - y) < 1e-4 and gx == gy


def test_native_K_and_gates_equal_hf_model_args(world):
    from lm_eval.models.huggingface import HFLM

    native = DualPathEvalLM(**native_args(world, K=3, gates="deep-only"))
    hf = HFLM(**hf_args(world, K=3, gates="deep-only"), device="cpu")
    assert hf.model.config.K == 3 and hf.model.config.gates == "deep-only"
    base = DualPathEvalLM(**native_args(world))
    text = [("Before we proceed any further, hear me speak.",)]
    a = native.loglikelihood_rolling(_instances("loglikelihood_rolling", text), disable_tqdm=True)[0]
    b = hf.loglikelihood_rolling(_instances("loglikelihood_rolling", text), disable_tqdm=True)[0]
    c = base.loglikelihood_rolling(_instances("loglikelihood_rolling", text), disable_tqdm=True)[0]
    assert abs(a - b) < 1e-4 and abs(a - c) > 1e-3
    # add_bos_token=True: both prepend <|endoftext|> alike
    native = DualPathEvalLM(**native_args(world), add_bos_token=True)
    hf = HFLM(**hf_args(world, add_bos_token=True), device="cpu")
    assert native.tok_encode("Hello") == hf.tok_encode("Hello") == [native.eot_token_id] + base.tok_encode("Hello")
    a = native.loglikelihood_rolling(_instances("loglikelihood_rolling", text), disable_tqdm=True)[0]
    b = hf.loglikelihood_rolling(_instances("loglikelihood_rolling", text), disable_tqdm=True)[0]
    assert abs(a - b) < 1e-4


def test_native_adaptive_policy_equals_hf_model_args(world):
    """adaptive=exit=.../deep=... ("/" between the keys: model_args splits on commas) runs the policy in both
    models; the lm-eval string parser hands the value over whole."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import simple_parse_args_string

    args = simple_parse_args_string(f"checkpoint={world['run']},adaptive=exit=0.3/deep=0.3")
    native = DualPathEvalLM(**args)
    assert str(native.overrides.adaptive) == "exit=0.3,deep=0.3"
    hf = HFLM(**hf_args(world, adaptive="exit=0.3/deep=0.3"), device="cpu")
    reqs = _instances("loglikelihood_rolling", [("Before we proceed any further, hear me speak.",)])
    a, b, c = (lm.loglikelihood_rolling(reqs, disable_tqdm=True)[0]
               for lm in (native, hf, DualPathEvalLM(**native_args(world))))
    assert abs(a - b) < 1e-4 and abs(a - c) > 1e-3
    with pytest.raises(DualPathError, match="KEY=VALUE"):
        DualPathEvalLM(**native_args(world), adaptive="depth=1")


def test_native_model_args_are_checked(world):
    with pytest.raises(DualPathError, match="needs model_args checkpoint"):
        DualPathEvalLM()
    with pytest.raises(DualPathError, match="unknown model_args.*pretrained"):
        DualPathEvalLM(**native_args(world), pretrained="x")
    with pytest.raises(DualPathError, match="K=99 is outside"):
        DualPathEvalLM(**native_args(world), K=99)
    with pytest.raises(DualPathError, match="gates"):
        DualPathEvalLM(**native_args(world), gates="sideways")


# ----------------------------------------------------------------------------------------------
# The tasks, end to end


@need_data
def test_text_ppl_task_hf_and_native(world):
    # wikitext-2 split by paragraphs (the default splits by article, and the second article is 24 kB)
    tm = task_manager(metadata={"text_split": "paragraphs"}, include_defaults=False)
    r_hf = evaluate("hf", hf_args(world), "dualpath_text_ppl", tm, limit=2)
    r_nat = evaluate("dualpath", native_args(world), "dualpath_text_ppl", tm, limit=2)
    res = r_hf["results"]["dualpath_text_ppl"]
    wp, bp, bpb = res["word_perplexity,none"], res["byte_perplexity,none"], res["bits_per_byte,none"]
    assert all(math.isfinite(v) and v > 0 for v in (wp, bp, bpb))
    assert abs(bp - 2 ** bpb) < 1e-6 * bp
    # bits per byte from the summed loglikelihood and the documents' bytes; word perplexity from words
    docs = [s["doc"]["text"] for s in r_hf["samples"]["dualpath_text_ppl"]]
    ll = [s["resps"][0][0] for s in r_hf["samples"]["dualpath_text_ppl"]]
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    nwords = sum(len(d.split()) for d in docs)
    assert abs(bpb - (-sum(ll) / nbytes / math.log(2))) < 1e-6 * bpb
    assert abs(math.log(wp) - (-sum(ll) / nwords)) < 1e-6 * math.log(wp)
    assert len(docs) == 2 and docs[0].startswith("= Robert") and docs[1].startswith("Robert")
    # the native model: the same per-document loglikelihoods
    ll_nat = [s["resps"][0][0] for s in r_nat["samples"]["dualpath_text_ppl"]]
    for x, y in zip(ll_nat, ll):
        assert abs(x - y) < 1e-4 * max(1.0, abs(y))
    assert abs(r_nat["results"]["dualpath_text_ppl"]["bits_per_byte,none"] - bpb) < 1e-6
    # and from the model's own per-token losses over <|endoftext|> + each document, in context-sized windows
    # (the second document is several windows long)
    ref = text_metrics(world, docs)
    assert len(tokens_of(world, docs[1])) > 2 * 64
    for x, y in zip(ll, ref["ll"]):
        assert abs(x - y) < 1e-4 * max(1.0, abs(y)), (x, y)
    for key in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        for r in (r_hf, r_nat):
            assert r["results"]["dualpath_text_ppl"][f"{key},none"] == pytest.approx(ref[key], rel=1e-5), key


@need_data
def test_gsm8k_task_hf_and_native(world, tasks):
    kw = dict(limit=3, gen_kwargs="max_gen_toks=8")
    r_hf = evaluate("hf", hf_args(world), "dualpath_gsm8k_local", tasks, **kw)
    r_nat = evaluate("dualpath", native_args(world), "dualpath_gsm8k_local", tasks, **kw)
    res = r_hf["results"]["dualpath_gsm8k_local"]
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert 0.0 <= res[key] <= 1.0
    samples = [s for s in r_hf["samples"]["dualpath_gsm8k_local"] if s["filter"] == "strict-match"]
    assert len(samples) == 3
    first = json.loads(GSM8K.read_text(encoding="utf-8").splitlines()[0])
    assert samples[0]["doc"]["question"] == first["question"] and samples[0]["target"] == first["answer"]
    assert json.dumps(first["question"] + "\n") in json.dumps(samples[0]["arguments"])
    # greedy generations are the same text natively
    gen_hf = [s["resps"][0][0] for s in samples]
    gen_nat = [s["resps"][0][0] for s in r_nat["samples"]["dualpath_gsm8k_local"] if s["filter"] == "strict-match"]
    assert gen_hf == gen_nat
    # ... and the model's own greedy decoding
    rows, gen_ref = gsm8k_greedy(world, 3)
    assert gen_hf == gen_ref and any(g.strip() for g in gen_ref)
    # both exact-match scores are the mean of the task's rule applied to those generations, for both models
    for key, strict in (("exact_match,strict-match", True), ("exact_match,flexible-extract", False)):
        want = sum(gsm8k_exact_match(g, row["answer"], strict) for g, row in zip(gen_ref, rows)) / len(rows)
        assert res[key] == pytest.approx(want, abs=1e-12), key
        assert r_nat["results"]["dualpath_gsm8k_local"][key] == pytest.approx(want, abs=1e-12), key


def test_gsm8k_regex_scores_a_correct_answer(tmp_path):
    """The task's filter and metric: '#### 18' after working out is right, anything else wrong."""
    from lm_eval.tasks import TaskManager

    rows = [{"question": "Janet has 9 eggs and sells them for $2 each. How much?", "answer": "9 * 2 = 18\n#### 18"}]
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                       metadata={"gsm8k_path": str(path)}).load(["dualpath_gsm8k_local"])["tasks"]
    task = next(iter(task.values()))
    doc = next(iter(task.test_docs()))
    ensembles = {f.name: f for f in task._filters}

    def score(generation: str, name: str = "strict-match") -> float:
        resps = [[generation]]
        for make_filter in ensembles[name].filters:
            resps = list(make_filter().apply(resps, [doc]))
        return task.process_results(doc, [resps[0]])["exact_match"]

    assert score("She makes 9 * 2 = $18.\n#### 18") == 1.0
    assert score("She makes 9 * 2 = 18.\n#### 1,8") == 1.0  # commas are ignored, as in lm-eval's gsm8k
    assert score("She makes 19.\n#### 19") == 0.0
    assert score("She makes 18.") == 0.0  # strict: no #### marker
    # the rule written out in this file (used to check the task's scores above) agrees with the task's own
    for generation in ("She makes 9 * 2 = $18.\n#### 18", "She makes 9 * 2 = 18.\n#### 1,8", "She makes 19.\n#### 19",
                       "She makes 18.", "#### 18.", "#### -18", "no number at all", "#### $18"):
        assert gsm8k_exact_match(generation, rows[0]["answer"], strict=True) == score(generation), generation
        assert gsm8k_exact_match(generation, rows[0]["answer"], strict=False) == score(generation, "flexible-extract")
    assert score("She makes 9 * 2 = 18.", "flexible-extract") == 1.0  # the last number


def _write_cloze_file(path: Path, n: int = 12) -> Path:
    from dualpath.data.synthetic import SyntheticConfig, eval_examples

    rows = [e for e in eval_examples(SyntheticConfig(), n) if e["category"] in ("fact", "arith")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cloze_docs(tmp_path):
    from dualpath.data.synthetic import JOBS

    path = _write_cloze_file(tmp_path / "eval_examples.jsonl", 40)
    ds = task_utils.load_cloze(cloze_path=str(path), cloze_choices=4)["test"]
    docs = list(task_utils.cloze_docs(ds))
    assert len(docs) >= 30 and all(d["choices"][d["label"]] == d["answer"] for d in docs)
    assert all(2 <= len(set(d["choices"])) == len(d["choices"]) <= 4 for d in docs)
    assert sum(len(d["choices"]) == 4 for d in docs) >= len(docs) // 2
    kinds = {d["kind"] for d in docs}
    assert kinds <= {"city", "job", "birth_year", "relation"} and len(kinds) >= 3
    answers_of = {k: {d["answer"] for d in docs if d["kind"] == k} for k in kinds}
    for d in docs:  # distractors are answers of the same kind: years for years, jobs for jobs, ...
        assert set(d["choices"]) <= answers_of[d["kind"]]
        if d["kind"] == "job":
            assert all(c in JOBS for c in d["choices"])
        if d["kind"] == "birth_year":
            assert all(c.isdigit() for c in d["choices"])
    assert any(d["kind"] == "relation" and d["attribute"] != "relation" for d in docs)  # e.g. "mentor"
    assert list(task_utils.cloze_docs(ds)) == docs  # reproducible


def test_cloze_task_native(world, tasks, tmp_path):
    path = _write_cloze_file(tmp_path / "eval_examples.jsonl", 40)
    tm = task_manager(metadata={"cloze_path": str(path)}, include_defaults=False)
    r = evaluate("dualpath", native_args(world), "dualpath_synthetic_cloze", tm, limit=4)
    res = r["results"]["dualpath_synthetic_cloze"]
    assert 0.0 <= res["acc,none"] <= 1.0 and 0.0 <= res["acc_norm,none"] <= 1.0
    s = r["samples"]["dualpath_synthetic_cloze"][0]
    assert len(s["resps"]) == len(s["doc"]["choices"]) == 4 and all(math.isfinite(x[0][0]) for x in s["resps"])
    assert json.dumps(s["doc"]["prompt"]) in json.dumps(s["arguments"]) and s["doc"]["prompt"].startswith("Q: ")
    # every choice's log-likelihood from the model's per-token losses over prompt + choice (the prompt's trailing
    # space goes with the choice, as lm-eval splits a pair), then acc (argmax) and acc_norm (argmax per character)
    _, tok, _, score = reference(world)
    samples = r["samples"]["dualpath_synthetic_cloze"]
    assert len(samples) == 4
    acc = acc_norm = 0.0
    for s in samples:
        doc = s["doc"]
        ctx = doc["prompt"].rstrip()
        lls = [score(tok.encode(doc["prompt"] + c).ids, first=len(tok.encode(ctx).ids)) for c in doc["choices"]]
        for (got, _), want in zip((x[0] for x in s["resps"]), lls):
            assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (got, want)
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        for v in (lls, norm):  # no near-tie could flip the argmax between the two computations
            top = sorted(v, reverse=True)
            assert top[0] - top[1] > 1e-3
        acc += float(max(range(4), key=lambda i: lls[i]) == doc["label"]) / len(samples)
        acc_norm += float(max(range(4), key=lambda i: norm[i]) == doc["label"]) / len(samples)
    assert res["acc,none"] == pytest.approx(acc, abs=1e-12)
    assert res["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Task data helpers


def test_split_text_modes():
    wiki = " \n = One = \n \n Alpha beta . \n \n = = Sub = = \n Gamma . \n \n = Two = \n \n Delta . \n"
    assert task_utils.split_text(wiki) == ["= One = \n \n Alpha beta . \n \n = = Sub = = \n Gamma .",
                                           "= Two = \n \n Delta ."]
    plain = "para one\nline two\n\n\npara two\n  \npara three"
    assert task_utils.split_text(plain) == ["para one\nline two", "para two", "para three"]
    assert task_utils.split_text(plain, "lines") == ["para one", "line two", "para two", "para three"]
    assert task_utils.split_text(plain, "whole") == [plain]
    with pytest.raises(DataError, match="text_split"):
        task_utils.split_text(plain, "sentences")


def test_data_paths_come_from_metadata_env_or_yaml(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("one para\n\ntwo para\n")
    assert task_utils.load_text(text_path=str(f))["test"]["text"] == ["one para", "two para"]
    monkeypatch.setenv("DUALPATH_TEXT_PATH", str(f))
    assert len(task_utils.load_text(data_files={"test": "/nonexistent"})["test"]) == 2
    monkeypatch.delenv("DUALPATH_TEXT_PATH")
    assert len(task_utils.load_text(data_files={"test": str(f)})["test"]) == 2
    with pytest.raises(DataError, match="text_path"):
        task_utils.load_text(data_files={"test": str(tmp_path / "missing.txt")})
    with pytest.raises(DataError, match="gsm8k_train_path"):
        task_utils.load_gsm8k(gsm8k_path=str(GSM8K), gsm8k_train_path=str(tmp_path / "nope.jsonl"))


def test_a_yaml_including_a_dualpath_task_can_change_its_file(tmp_path):
    from lm_eval.tasks import TaskManager

    (tmp_path / "small.txt").write_text("Hello there.\n\nSecond para.\n")
    folder = tmp_path / "mytasks"
    folder.mkdir()
    (folder / "mine.yaml").write_text(f"include: {TASKS_DIR / 'dualpath_text_ppl.yaml'}\ntask: my_text_ppl\n"
                                      f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'small.txt'}\n")
    loaded = TaskManager(include_path=str(folder), include_defaults=False).load(["my_text_ppl"])["tasks"]
    assert [d["text"] for d in next(iter(loaded.values())).test_docs()] == ["Hello there.", "Second para."]


@need_data
def test_text_task_on_another_file_via_metadata(world, tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved.\n")
    tm = task_manager(metadata={"text_path": str(f)}, include_defaults=False)
    r = evaluate("dualpath", native_args(world), "dualpath_text_ppl", tm, limit=None)
    assert len(r["samples"]["dualpath_text_ppl"]) == 3
    assert math.isfinite(r["results"]["dualpath_text_ppl"]["bits_per_byte,none"])
    # the three paragraphs of that file, scored by the model itself
    docs = ["First Citizen:\nBefore we proceed.", "All:\nSpeak, speak.", "First Citizen:\nYou are all resolved."]
    assert [s["doc"]["text"] for s in r["samples"]["dualpath_text_ppl"]] == docs
    ref = text_metrics(world, docs)
    for key in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert r["results"]["dualpath_text_ppl"][f"{key},none"] == pytest.approx(ref[key], rel=1e-5), key


# ----------------------------------------------------------------------------------------------
# The command lines (slow: lm-eval indexes its ~thousands of built-in tasks at start)


def _run(cmd, tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())


@pytest.mark.slow
@need_data
def test_lm_eval_cli_hf(world, tmp_path):
    lm_eval_bin = Path(sys.executable).with_name("lm_eval")
    cmd = [str(lm_eval_bin) if lm_eval_bin.exists() else "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={world['export']},trust_remote_code=True,dtype=float32,K=3", "--device", "cpu",
           "--tasks", "dualpath_text_ppl,dualpath_gsm8k_local", "--include_path", str(TASKS_DIR), "--limit", "2",
           "--gen_kwargs", "max_gen_toks=8", "--batch_size", "16", "--output_path", str(tmp_path / "out")]
    res = _run(cmd, tmp_path)["results"]
    assert math.isfinite(res["dualpath_text_ppl"]["bits_per_byte,none"])
    assert 0.0 <= res["dualpath_gsm8k_local"]["exact_match,strict-match"] <= 1.0
    # the same numbers from the model itself at K=3: the first two wikitext articles (the default split), and
    # the task's rule on its own greedy generations
    docs = task_utils.split_text(WIKITEXT.read_text(encoding="utf-8"))[:2]
    ref = text_metrics(world, docs, K=3)
    assert ref["bits_per_byte"] != pytest.approx(text_metrics(world, docs)["bits_per_byte"], rel=1e-4)  # K matters
    for key in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert res["dualpath_text_ppl"][f"{key},none"] == pytest.approx(ref[key], rel=1e-5), key
    rows, gens = gsm8k_greedy(world, 2, K=3)
    for key, strict in (("exact_match,strict-match", True), ("exact_match,flexible-extract", False)):
        want = sum(gsm8k_exact_match(g, row["answer"], strict) for g, row in zip(gens, rows)) / len(rows)
        assert res["dualpath_gsm8k_local"][key] == pytest.approx(want, abs=1e-12), key


@pytest.mark.slow
def test_lm_eval_cli_native_wrapper(world, tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n")
    cmd = [sys.executable, "-m", "dualpath", "lm-eval", "--model", "dualpath", "--model_args",  # as the README
           f"checkpoint={world['run']},K=1,gates=both=0.5", "--device", "cpu", "--tasks", "dualpath_text_ppl",
           "--metadata", json.dumps({"text_path": str(f)}), "--output_path", str(tmp_path / "out")]
    res = _run(cmd, tmp_path)["results"]
    assert math.isfinite(res["dualpath_text_ppl"]["word_perplexity,none"])
    # the model itself with K=1 and both gates at 0.5, on the file's two paragraphs
    docs = ["First Citizen:\nBefore we proceed.", "All:\nSpeak, speak."]
    ref = text_metrics(world, docs, K=1, gates="both=0.5")
    assert ref["word_perplexity"] != pytest.approx(text_metrics(world, docs)["word_perplexity"], rel=1e-2)
    for key in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert res["dualpath_text_ppl"][f"{key},none"] == pytest.approx(ref[key], rel=1e-5), key


def test_lm_eval_cli_checks_task_data_before_lm_eval_starts(world, tmp_path, capsys):
    from dualpath.cli import main

    missing = tmp_path / "missing.txt"
    argv = ["lm-eval", "--model", "dualpath", "--model_args", f"checkpoint={world['run']}", "--tasks",
            "dualpath_text_ppl", "--metadata", json.dumps({"text_path": str(missing)})]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: test file not found: {missing} (set it with --metadata " \
        "'{\"text_path\": \"PATH\"}' or DUALPATH_TEXT_PATH)\n"
    argv[4] = f"checkpoint={tmp_path / 'no_run'}"
    argv[-1] = json.dumps({"text_path": str(WIKITEXT)})
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: checkpoint not found: {tmp_path / 'no_run'}\n"
