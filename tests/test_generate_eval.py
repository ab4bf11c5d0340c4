"""Generation with the KV cache, evaluation and their CLI errors."""

import json
import math
import subprocess
import sys

import pytest
import torch

from dualpath.cli import main
from dualpath.eval.evaluate import evaluate_examples, evaluate_text, load_tokenizer, score_sequences
from dualpath.generate import generate, generate_tokens, sample_next
from dualpath.model import Overrides

from helpers import SHAKESPEARE, perturbed_model, save_tiny_checkpoint, tiny_config, train_tiny_tokenizer

ARCHS = ["wide", "loop", "dual", "duo"]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    if not SHAKESPEARE.is_file():
        pytest.skip("shared data missing")
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_greedy_equals_uncached(arch):
    extra = {"duo_policy": "pattern", "duo_pattern": "BS"} if arch == "duo" else {}
    model = perturbed_model(tiny_config(arch, **extra), seed=1)
    prompt = [5, 17, 99, 3, 250, 42, 7]
    cached = list(generate_tokens(model, prompt, 40, use_cache=True))
    uncached = list(generate_tokens(model, prompt, 40, use_cache=False))
    assert cached == uncached
    assert len(cached) == 40


def test_cached_greedy_equals_uncached_with_overrides():
    model = perturbed_model(tiny_config("dual", K=3), seed=2)
    for ov in (Overrides(K=5), Overrides(gates="wide-only"), Overrides(gates="both=0.7")):
        a = list(generate_tokens(model, [1, 2, 3, 4], 20, overrides=ov, use_cache=True))
        b = list(generate_tokens(model, [1, 2, 3, 4], 20, overrides=ov, use_cache=False))
        assert a == b


def test_generation_stops_at_context_and_eos():
    model = perturbed_model(tiny_config("dual", seq_len=16), seed=3)
    out = list(generate_tokens(model, list(range(10)), 50))
    assert len(out) == 6  # 16 - 10
    first = out[0]
    assert list(generate_tokens(model, list(range(10)), 50, eos_id=first)) == [first]


def test_sampling_is_seeded_and_respects_top_k():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    a = [int(sample_next(logits, 1.0, top_k=3, generator=torch.Generator().manual_seed(s))) for s in range(30)]
    b = [int(sample_next(logits, 1.0, top_k=3, generator=torch.Generator().manual_seed(s))) for s in range(30)]
    assert a == b
    assert set(a) <= set(torch.topk(logits[0], 3).indices.tolist())
    # top_p tiny keeps only the argmax
    c = {int(sample_next(logits, 1.0, top_p=1e-6, generator=torch.Generator().manual_seed(s))) for s in range(10)}
    assert c == {int(logits.argmax())}


def test_generate_text_streams_everything(tokenizer_json):
    tok = load_tokenizer(tokenizer_json.parent)
    model = perturbed_model(tiny_config("loop"), seed=4)
    pieces = []
    text = generate(model, tok, "ROMEO:", 12, stream=pieces.append, temperature=0.0)
    assert "".join(pieces) == text


def test_score_sequences_matches_forward():
    model = perturbed_model(tiny_config("dual"), seed=5)
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13]]
    got = score_sequences(model, seqs, batch_size=2)
    for s, loss in zip(seqs, got):
        x, y = torch.tensor([s[:-1]]), torch.tensor([s[1:]])
        ref = model(x, y, return_per_token_loss=True).per_token_loss[0]
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


def test_bits_per_byte_of_text_is_exact(tokenizer_json):
    tok = load_tokenizer(tokenizer_json.parent)
    model = perturbed_model(tiny_config("wide"), seed=6)
    text = SHAKESPEARE.read_text()[:3000]
    r = evaluate_text(model, tok, text)
    ids = tok.encode(text).ids
    assert r["tokens"] == len(ids)
    assert r["bytes"] == len(text.encode())
    assert math.isclose(r["bpb"], r["loss"] * r["tokens"] / math.log(2) / r["bytes"], rel_tol=1e-9)


def test_examples_per_category_and_answer_loss(tokenizer_json):
    tok = load_tokenizer(tokenizer_json.parent)
    model = perturbed_model(tiny_config("dual"), seed=7)
    exs = []
    for i, (cat, p, a) in enumerate([("fact", "Q: Who?\nA: ", "Romeo"), ("arith", "12 + 30 = ", "42"),
                                     ("arith", "7 * 6 = ", "42")]):
        exs.append({"category": cat, "text": p + a, "prompt": p, "answer": a, "answer_start": len(p),
                    "answer_end": len(p) + len(a)})
    r = evaluate_examples(model, tok, exs, exact_match=True)
    assert r["arith"]["n"] == 2 and r["fact"]["n"] == 1 and r["all"]["n"] == 3
    assert r["all"]["bytes"] == sum(len(e["text"].encode()) for e in exs)
    for cat in ("fact", "arith", "all"):
        assert 0.0 <= r[cat]["accuracy"] <= 1.0
        assert r[cat]["answer_loss"] > 0
    # the overall BPB is the byte-weighted combination of the categories
    tot = sum(r[c]["bpb"] * r[c]["bytes"] for c in ("fact", "arith"))
    assert math.isclose(tot / r["all"]["bytes"], r["all"]["bpb"], rel_tol=1e-9)


def _checkpoint_model():
    return perturbed_model(tiny_config("dual", K=2), seed=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_json):
    model = _checkpoint_model()
    return save_tiny_checkpoint(tmp_path_factory.mktemp("run"), model, tokenizer_json)


def test_eval_cli_ablation_table(checkpoint, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(SHAKESPEARE.read_text()[:2000])
    out = tmp_path / "res.json"
    rc = main(["eval", str(checkpoint), "--data", str(text), "--K", "1,3", "--gates",
               "deep-only,both=0.5", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| K=1 |" in printed and "| gates=deep-only |" in printed
    res = json.loads(out.read_text())
    assert set(res["variants"]) == {"trained (K=2)", "K=1", "K=3", "gates=deep-only", "gates=both=0.5"}
    assert res["variants"]["K=1"]["t"]["loss"] != res["variants"]["K=3"]["t"]["loss"]


def test_generate_cli(checkpoint, tokenizer_json, capsys):
    """The CLI prints the prompt, then exactly the continuation that generate_tokens gives the checkpoint's model
    (the same weights, rebuilt here) for <|endoftext|> + the prompt's tokens, then a newline."""
    tok = load_tokenizer(tokenizer_json.parent)
    eos = tok.token_to_id("<|endoftext|>")
    prompt_ids = [eos] + tok.encode("ROMEO:").ids
    model = _checkpoint_model()  # the weights the `checkpoint` fixture saved, built again

    def expected(**kw) -> str:
        ids = list(generate_tokens(model, prompt_ids, 5, eos_id=eos, **kw))
        assert len(ids) == 5 and eos not in ids  # five real tokens: the comparison is not vacuous
        text = tok.decode(ids)
        assert text.strip()
        return text

    # sampled: the CLI's default temperature 0.8 with --seed 1
    assert main(["generate", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:")
    sampled = expected(temperature=0.8, seed=1)
    assert out == "ROMEO:" + sampled + "\n"
    # greedy: --temperature 0 is argmax decoding, with and without the KV cache
    greedy = expected(temperature=0.0)
    for flags in ([], ["--no-cache"]):
        assert main(["generate", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--temperature",
                     "0", *flags]) == 0
        assert capsys.readouterr().out == "ROMEO:" + greedy + "\n"
    # another seed samples another continuation (the seed reaches the sampler)
    others = {expected(temperature=0.8, seed=s) for s in range(2, 6)}
    assert others - {sampled}


@pytest.mark.parametrize("args,needle", [
    (["eval", "{missing}", "--data", "{text}"], "checkpoint not found"),
    (["eval", "{corrupt}", "--data", "{text}"], "corrupt"),
    (["eval", "{ckpt}", "--data", "{text}", "--K", "99"], "--K=99 is outside 1..max_loops"),
    (["eval", "{ckpt}", "--data", "{text}", "--gates", "sideways"], "gate override"),
    (["eval", "{ckpt}", "--data", "{missing}"], "not found"),
    (["generate", "{ckpt}", "--prompt", "{long}"], "longer than the context"),
    (["generate", "{ckpt}", "--prompt", "hi", "--K", "40"], "max_loops"),
    (["eval", "{mismatch}", "--data", "{text}"], "tokenizer"),
])
def test_cli_errors_are_one_line(args, needle, checkpoint, tmp_path, capsys, tokenizer_json):
    import shutil

    text = tmp_path / "t.txt"
    text.write_text("some text to evaluate, long enough. " * 5)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(checkpoint, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 20)
    mismatch = tmp_path / "mismatch"
    small = perturbed_model(tiny_config("dual", vocab_size=128), seed=9)
    save_tiny_checkpoint(mismatch, small, tokenizer_json)
    subs = {"{missing}": str(tmp_path / "nope"), "{text}": str(text), "{corrupt}": str(corrupt),
            "{ckpt}": str(checkpoint), "{long}": "word " * 200, "{mismatch}": str(mismatch)}
    argv = [subs.get(a, a) for a in args]
    before = sorted(p.name for p in checkpoint.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert sorted(p.name for p in checkpoint.iterdir()) == before


def test_cli_error_exit_code_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dualpath", "eval", str(tmp_path / "nope"), "--data", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_datasets_with_the_same_stem_keep_separate_columns(tokenizer_json, tmp_path):
    from dualpath.eval.evaluate import evaluate_datasets

    tok = load_tokenizer(tokenizer_json.parent)
    model = perturbed_model(tiny_config("wide"), seed=10)
    for folder, text in (("a", "First text, some words here. " * 10), ("b", "Another one entirely. " * 12)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "test.txt").write_text(text)
    res = evaluate_datasets(model, tok, [str(tmp_path / "a" / "test.txt"), str(tmp_path / "b" / "test.txt")])
    assert res["datasets"] == ["a/test", "b/test"]
    row = res["variants"]["trained (K=1)"]
    assert row["a/test"]["bytes"] == len("First text, some words here. " * 10)
    assert row["b/test"]["bytes"] == len("Another one entirely. " * 12)


def test_text_limit_scores_exactly_that_many_windows(tokenizer_json, tmp_path):
    from dualpath.eval.evaluate import evaluate_datasets

    tok = load_tokenizer(tokenizer_json.parent)
    model = perturbed_model(tiny_config("wide"), seed=11)
    text = SHAKESPEARE.read_text()[:20000]
    ids, ctx, n = tok.encode(text).ids, model.cfg.seq_len, 3
    assert len(ids) > n * ctx
    r = evaluate_text(model, tok, text, max_windows=n)
    prefix = tok.decode(ids[:n * ctx])
    assert text.startswith(prefix)
    assert r["tokens"] == n * ctx
    assert r["bytes"] == len(prefix.encode())  # BPB counts the scored bytes only
    eos = tok.token_to_id("<|endoftext|>")
    windows = [[eos] + ids[:ctx], ids[ctx - 1:2 * ctx], ids[2 * ctx - 1:3 * ctx]]
    ref = sum(loss.double().sum().item() for loss in score_sequences(model, windows))
    assert math.isclose(r["loss"] * r["tokens"], ref, rel_tol=1e-9)
    # a limit past the end is the whole text; evaluate_datasets passes --limit through as windows
    a, b = evaluate_text(model, tok, text, max_windows=10_000), evaluate_text(model, tok, text)
    assert (a["tokens"], a["bytes"]) == (b["tokens"], b["bytes"]) and a["loss"] == pytest.approx(b["loss"], rel=1e-9)
    (tmp_path / "t.txt").write_text(text)
    row = evaluate_datasets(model, tok, [str(tmp_path / "t.txt")], limit=n)["variants"]["trained (K=1)"]["t"]
    assert (row["tokens"], row["bytes"]) == (n * ctx, r["bytes"])
    assert row["loss"] == pytest.approx(r["loss"], rel=1e-9)


# ----------------------------------------------------------------------------------------------
# one flag vocabulary (#29), stop strings, the context end, Q/A examples longer than the context


def _greedy(tok, prompt: str, n: int) -> tuple[list[int], list[int]]:
    """(prompt ids as generate() builds them, the first n greedy tokens of the checkpoint's model after them)."""
    eos = tok.token_to_id("<|endoftext|>")
    ids = [eos] + tok.encode(prompt).ids
    out = list(generate_tokens(_checkpoint_model(), ids, n, eos_id=eos))
    assert eos not in out  # n real tokens: the comparisons below are not vacuous
    return ids, out


def _stop_strings(text: str) -> tuple[str, str]:
    """Two printable ASCII pairs of `text` (the untrained model also decodes partial UTF-8) whose first
    occurrences are at 0 < early < late."""
    found = sorted({(text.find(text[i:i + 2]), text[i:i + 2]) for i in range(1, len(text) - 1)
                    if text[i:i + 2].isascii() and text[i:i + 2].isprintable()})
    found = [f for f in found if f[0] > 0]
    assert len(found) >= 2, text
    return found[0][1], found[-1][1]


def test_generate_cli_cuts_at_the_first_stop_string(checkpoint, tokenizer_json, capsys):
    tok = load_tokenizer(tokenizer_json.parent)
    _, ids = _greedy(tok, "ROMEO:", 20)
    text = tok.decode(ids)
    early, late = _stop_strings(text)
    cut_late, cut_early = text.find(late), text.find(early)
    assert 0 < cut_early < cut_late
    base = ["generate", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--temperature", "0"]
    assert main(base + ["--stop", late]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("ROMEO:" + text[:cut_late] + "\n", "")
    # repeatable: whichever string comes first ends it; one never met changes nothing
    assert main(base + ["--stop", late, "--stop", "@@never@@", "--stop", early]) == 0
    assert capsys.readouterr().out == "ROMEO:" + text[:cut_early] + "\n"
    assert main(base + ["--stop", "@@never@@"]) == 0
    assert capsys.readouterr().out == "ROMEO:" + text + "\n"


def test_generate_library_stop_streams_no_part_of_the_stop_string(checkpoint, tokenizer_json):
    tok = load_tokenizer(tokenizer_json.parent)
    _, ids = _greedy(tok, "ROMEO:", 20)
    text = tok.decode(ids)
    stop = _stop_strings(text)[1]
    pieces = []
    got = generate(_checkpoint_model(), tok, "ROMEO:", 20, stop=[stop], stream=pieces.append)
    assert got == text[:text.find(stop)] == "".join(pieces)
    # a stop string that never completes is streamed in full at the end
    pieces = []
    assert generate(_checkpoint_model(), tok, "ROMEO:", 20, stop=[text[-2:] + "\x00"], stream=pieces.append) == text
    assert "".join(pieces) == text


def test_generate_cli_says_when_it_stops_at_the_context_end(checkpoint, tokenizer_json, capsys):
    tok = load_tokenizer(tokenizer_json.parent)
    ctx = _checkpoint_model().cfg.seq_len
    prompt, _ = _greedy(tok, "ROMEO:", 1)
    room = ctx - len(prompt)
    _, ids = _greedy(tok, "ROMEO:", room)
    base = ["generate", str(checkpoint), "--prompt", "ROMEO:", "--temperature", "0"]
    assert main(base + ["--max-new-tokens", str(room + 30)]) == 0
    out, err = capsys.readouterr()
    assert out == "ROMEO:" + tok.decode(ids) + "\n"
    assert err == f"generation stopped at the context end ({ctx} tokens) after {room} of {room + 30} new tokens\n"
    # exactly the room asked for: the requested length was reached, nothing to say
    assert main(base + ["--max-new-tokens", str(room)]) == 0
    out, err = capsys.readouterr()
    assert out == "ROMEO:" + tok.decode(ids) + "\n" and err == ""


def test_generate_help_states_both_temperature_defaults(capsys):
    assert main(["generate", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "0: greedy (default: 0.8; the library's dualpath.generate.generate() is greedy unless given a " \
           "temperature)" in help_text
    import inspect

    assert inspect.signature(generate_tokens).parameters["temperature"].default == 0.0  # what that says


def test_eval_K_and_gates_take_lists_or_repeats_and_force_K_is_gone(checkpoint, tokenizer_json, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(SHAKESPEARE.read_text()[:1500])
    runs = []
    for flags in (["--K", "1,3", "--gates", "deep-only,both=0.5"],
                  ["--K", "1", "--K", "3", "--gates", "deep-only", "--gates", " both=0.5"]):
        assert main(["eval", str(checkpoint), "--data", str(text), "--json", *flags]) == 0
        runs.append(json.loads(capsys.readouterr().out)["variants"])
    untimed = [{n: {k: x for k, x in r["t"].items() if k != "tokens_per_s"} for n, r in v.items()} for v in runs]
    assert untimed[0] == untimed[1]
    assert set(runs[0]) == {"trained (K=2)", "K=1", "K=3", "gates=deep-only", "gates=both=0.5"}
    # each row is the model under that override, computed here through the library
    tok = load_tokenizer(tokenizer_json.parent)
    for name, ov in (("K=3", Overrides(K=3)), ("gates=both=0.5", Overrides(gates="both=0.5"))):
        ref = evaluate_text(_checkpoint_model(), tok, text.read_text(), overrides=ov)
        assert runs[0][name]["t"]["loss"] == pytest.approx(ref["loss"], rel=1e-9)
    assert main(["eval", str(checkpoint), "--data", str(text), "--force-K", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == ["error: dualpath: unrecognized arguments: --force-K 1"]


def _qa_file(path, rows):
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return path


def test_eval_skips_and_counts_qa_examples_longer_than_the_context(checkpoint, tokenizer_json, tmp_path, capsys):
    tok = load_tokenizer(tokenizer_json.parent)
    model = _checkpoint_model()
    ctx, eos = model.cfg.seq_len, tok.token_to_id("<|endoftext|>")
    rows = [("Who speaks first?", "ROMEO"), ("What is the word? " * 20, "none"), ("And then?", "JULIET")]
    qa = _qa_file(tmp_path / "qa.jsonl", rows)
    seqs = [[eos] + tok.encode(f"{q}\n{a}").ids for q, a in rows]
    assert [len(s) > ctx + 1 for s in seqs] == [False, True, False]
    # the two that fit, scored here with a plain forward pass
    loss_sum, n_tok = 0.0, 0
    for s in (seqs[0], seqs[2]):
        logits = model(torch.tensor([s[:-1]])).logits[0]
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), torch.tensor(s[1:]), reduction="sum").item()
        n_tok += len(s) - 1
    assert main(["eval", str(checkpoint), "--data", str(qa), "--json"]) == 0  # exact match included: no abort
    r = json.loads(capsys.readouterr().out)["variants"]["trained (K=2)"]["qa"]
    assert (r["n"], r["skipped"], r["tokens"]) == (2, 1, n_tok)
    assert r["bytes"] == sum(len(f"{q}\n{a}".encode()) for q, a in (rows[0], rows[2]))
    assert r["loss"] == pytest.approx(loss_sum / n_tok, rel=1e-5)
    # the table says it on stdout, the log on stderr, in one line each
    assert main(["eval", str(checkpoint), "--data", str(qa), "--no-exact-match"]) == 0
    out, err = capsys.readouterr()
    assert "- qa: loss" in out and "2 examples (1 longer than the context skipped)" in out
    assert f"qa: skipped 1 of 3 examples, longer than the context ({ctx} tokens)" in err.splitlines()
    # nothing left to evaluate: one line, exit 2, nothing written
    only_long = _qa_file(tmp_path / "long.jsonl", [rows[1]])
    assert main(["eval", str(checkpoint), "--data", str(only_long), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: all 1 examples are longer than the context ({ctx} tokens)"]
    assert not (tmp_path / "r.json").exists()
