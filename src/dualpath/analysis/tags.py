"""Token tags: spaCy Universal POS tags (or a rule-based fallback), carried over to model tokens.

How a model token gets its tag, in order:
  1. SPECIAL: a special token of the tokenizer (e.g. <|endoftext|>).
  2. SPACE: a token whose text is whitespace only.
  3. ARITH: a token whose non-whitespace characters are all *arithmetic characters* of the text (below).
  4. the tag of the word it overlaps most, counted in characters (ties: the earlier word); X if none.

Arithmetic characters are decided on the whole text, so a marker split over tokens ("##" + "##") still
counts: digits 0-9; the operators + - * / × ÷ % and =; every character of an occurrence of <<, >> or
####; and a . or , with a digit on both sides (3.5, 1,000). An operator with a letter on both sides
(well-known, and/or) is not arithmetic.

Words come from spaCy (`--pos-model`, only its tagger and attribute ruler run; Universal POS tags
such as DET, NOUN, VERB, ADP, PUNCT, NUM) or, when spaCy or the model is unavailable, from the
rule-based tagger, whose classes are:
  PUNCT  a punctuation character (Unicode category P*);
  SYM    any other non-alphanumeric character (Unicode S*, e.g. $ < > ^ |);
  ARITH  a number (digits, with . or , between digits);
  FUNC   a closed-class English function word (FUNCTION_WORDS: determiners, pronouns, prepositions,
         conjunctions, auxiliaries and modals, particles), case-insensitive;
  WORD   any other word (letters, with an inner apostrophe).
"""

from __future__ import annotations

import bisect
import re
import unicodedata
import warnings
from pathlib import Path

import numpy as np

from ..errors import warn

SPECIAL, SPACE, ARITH, UNKNOWN = "SPECIAL", "SPACE", "ARITH", "X"
FALLBACK_CLASSES = ("PUNCT", "SYM", "ARITH", "FUNC", "WORD")
DEFAULT_POS_MODEL = "en_core_web_sm"
RULES = "rules"  # pos_model value that asks for the rule-based tagger (no warning)
SPACY_EXCLUDE = ("parser", "ner", "lemmatizer", "senter")
SPACY_MAX_CHARS = 100_000  # text is tagged in pieces of at most this many characters, cut at newlines
SPACY_BATCH = 64  # pieces per nlp.pipe batch

ARITH_OPERATORS = frozenset("+-*/×÷%=")
ARITH_MARKERS = ("####", "<<", ">>")

FUNCTION_WORDS = frozenset("""
a an the this that these those some any no every each either neither all both half several many much
few little more most less least other another such what which whose whatever whichever
i me my mine myself you your yours yourself yourselves he him his himself she her hers herself it its
itself we us our ours ourselves they them their theirs themselves one ones someone somebody something
anyone anybody anything everyone everybody everything nobody nothing none who whom whoever
about above across after against along amid among around as at before behind below beneath beside
besides between beyond by despite down during except for from in inside into like near of off on onto
out outside over past per since than through throughout till to toward towards under underneath unlike
until up upon via with within without
and or but nor so yet if because although though while whereas unless whether once when whenever where
wherever then also not n't
be am is are was were been being have has had having do does did doing done will would shall should
can could may might must ought 's 're 've 'd 'll 'm
there here how why
isn't aren't wasn't weren't don't doesn't didn't can't cannot couldn't won't wouldn't shouldn't mustn't
haven't hasn't hadn't it's that's there's i'm you're we're they're i've you've we've they've i'll you'll
he'll she'll we'll they'll i'd you'd he'd she'd we'd they'd he's she's let's
""".split())

_MARKER_RE = re.compile("|".join(re.escape(m) for m in ARITH_MARKERS))
_SEPARATOR_RE = re.compile(r"(?<=\d)[.,](?=\d)")
_RULE_WORD_RE = re.compile(r"(?P<num>\d+(?:[.,]\d+)*)|(?P<word>[^\W\d_]+(?:['’][^\W\d_]+)*)|(?P<other>\S)")


def arith_char_mask(text: str) -> np.ndarray:
    """True for every character of `text` that is arithmetic (see the module docstring)."""
    m = np.zeros(len(text), dtype=bool)
    for i, ch in enumerate(text):
        if "0" <= ch <= "9":
            m[i] = True
        elif ch in ARITH_OPERATORS:
            left = text[i - 1] if i > 0 else ""
            right = text[i + 1] if i + 1 < len(text) else ""
            m[i] = not (left.isalpha() and right.isalpha())
    for mt in _MARKER_RE.finditer(text):
        m[mt.start():mt.end()] = True
    for mt in _SEPARATOR_RE.finditer(text):
        m[mt.start()] = True
    return m


# ----------------------------------------------------------------------------------------------
# Taggers: text -> words [(start, end, tag)], whitespace never part of a word


class RuleTagger:
    """The fallback: PUNCT, SYM, ARITH, FUNC, WORD (see the module docstring)."""

    name = RULES
    kind = "rules"

    def words_many(self, texts: list[str]) -> list[list[tuple[int, int, str]]]:
        return [self.words(t) for t in texts]

    def words(self, text: str) -> list[tuple[int, int, str]]:
        out = []
        for mt in _RULE_WORD_RE.finditer(text):
            if mt.lastgroup == "num":
                tag = ARITH
            elif mt.lastgroup == "word":
                tag = "FUNC" if mt.group().lower().replace("’", "'") in FUNCTION_WORDS else "WORD"
            else:
                tag = "PUNCT" if unicodedata.category(mt.group()).startswith("P") else "SYM"
            out.append((mt.start(), mt.end(), tag))
        return out


class SpacyTagger:
    """Universal POS tags (`token.pos_`) from a spaCy pipeline with only tok2vec, tagger, attribute_ruler."""

    kind = "spacy"

    def __init__(self, nlp, name: str):
        self.nlp, self.name = nlp, name

    def words(self, text: str) -> list[tuple[int, int, str]]:
        return self.words_many([text])[0]

    def words_many(self, texts: list[str]) -> list[list[tuple[int, int, str]]]:
        """Words of every text, all pieces streamed through one `nlp.pipe` (batched: the per-call overhead
        of nlp(text) dominates on short documents). Pieces are cut as before, so the tags are the same."""
        pieces = [(d, base, piece) for d, t in enumerate(texts) for base, piece in _pieces(t, SPACY_MAX_CHARS)]
        out: list[list[tuple[int, int, str]]] = [[] for _ in texts]
        docs = self.nlp.pipe((p for _, _, p in pieces), batch_size=SPACY_BATCH)
        for (d, base, _), doc in zip(pieces, docs):
            out[d] += [(base + t.idx, base + t.idx + len(t.text), t.pos_ or UNKNOWN)
                       for t in doc if not t.is_space and t.text.strip()]
        return out


def _pieces(text: str, limit: int):
    """(offset, piece) with pieces of at most `limit` characters, cut after a newline where possible."""
    pos = 0
    while pos < len(text):
        end = min(pos + limit, len(text))
        if end < len(text):
            nl = text.rfind("\n", pos, end)
            if nl > pos:
                end = nl + 1
        yield pos, text[pos:end]
        pos = end


_SPACY_CACHE: dict[str, object] = {}


def load_spacy(name_or_path: str):
    """spacy.load with only the tagger and attribute ruler (and the tok2vec they need); version warnings silenced."""
    key = str(name_or_path)
    if key not in _SPACY_CACHE:
        import spacy  # noqa: F401 - ImportError is the caller's signal

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*\[W095\]")  # trained with another spaCy version
            warnings.filterwarnings("ignore", message=r".*\[W094\]")
            target = str(Path(name_or_path).expanduser()) if Path(name_or_path).expanduser().exists() else key
            nlp = spacy.load(target, exclude=list(SPACY_EXCLUDE))
        if not any(p in nlp.pipe_names for p in ("tagger", "morphologizer", "attribute_ruler")):
            raise ValueError(f"pipeline has no tagger (components: {', '.join(nlp.pipe_names) or 'none'})")
        _SPACY_CACHE[key] = nlp
    return _SPACY_CACHE[key]


def get_tagger(pos_model: str | None = DEFAULT_POS_MODEL, *, quiet: bool = False):
    """A SpacyTagger for `pos_model` (a spaCy package name or a model folder), or the RuleTagger.

    pos_model None means DEFAULT_POS_MODEL; "rules" asks for the rule-based tagger. When spaCy is missing or
    the model cannot be loaded, the rule-based tagger is used and a one-line warning goes to stderr.
    """
    name = DEFAULT_POS_MODEL if pos_model is None else str(pos_model)
    if name == RULES:
        return RuleTagger()
    try:
        return SpacyTagger(load_spacy(name), name)
    except ImportError:
        reason = "spaCy is not installed"
    except Exception as e:  # noqa: BLE001 - any failure to load means: use the fallback
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        reason = re.sub(r"^\[E\d+\]\s*", "", reason)[:160]
    if not quiet:
        warn(f"POS model {name!r} unavailable ({reason}); using the rule-based tagger "
             f"({', '.join(FALLBACK_CLASSES)})")
    return RuleTagger()


# ----------------------------------------------------------------------------------------------
# Carrying word tags over to model tokens


def tag_tokens(text: str, offsets, tagger, special=None, *, arith: bool = True) -> np.ndarray:
    """One tag per model token (see the module docstring for the order of the rules).

    offsets: (n, 2) character spans into `text`; special: bool per token. Special tokens' characters are
    blanked before the text is tagged, so they never become words.
    """
    return tag_documents([text], [offsets], tagger, [special], arith=arith)[0]


def tag_documents(texts: list[str], offsets: list, tagger, special: list | None = None, *,
                  arith: bool = True) -> list[np.ndarray]:
    """`tag_tokens` of every document, the texts tagged in one batch (`tagger.words_many`)."""
    offs = [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in offsets]
    special = [np.zeros(len(o), bool) if s is None else np.asarray(s, dtype=bool)
               for o, s in zip(offs, special or [None] * len(offs))]
    clean = [_blank(t, o, s) for t, o, s in zip(texts, offs, special)]
    return [_carry(c, o, s, w, arith) for c, o, s, w in zip(clean, offs, special, tagger.words_many(clean))]


def _blank(text: str, offs: np.ndarray, special: np.ndarray) -> str:
    """`text` with the characters of special tokens replaced by spaces."""
    if not special.any():
        return text
    chars = list(text)
    for s, e in offs[special]:
        chars[s:e] = " " * (e - s)
    return "".join(chars)


def _carry(clean: str, offs: np.ndarray, special: np.ndarray, words, arith: bool) -> np.ndarray:
    """Rules 1-4 for the tokens of one document, given its words."""
    n = len(offs)
    w_start = [w[0] for w in words]
    w_end = [w[1] for w in words]
    amask = arith_char_mask(clean) if arith else None
    out = np.empty(n, dtype=object)
    for i, (s, e) in enumerate(offs):
        s, e = int(s), int(e)
        if special[i]:
            out[i] = SPECIAL
            continue
        piece = clean[s:e]
        if piece and not piece.strip():
            out[i] = SPACE
            continue
        if amask is not None and piece:
            nonspace = [not c.isspace() for c in piece]
            if all(amask[s + k] for k, ns in enumerate(nonspace) if ns):
                out[i] = ARITH
                continue
        best, best_len = UNKNOWN, 0
        j = bisect.bisect_right(w_end, s)  # first word ending after s
        while j < len(words) and w_start[j] < e:
            ov = min(e, w_end[j]) - max(s, w_start[j])
            if ov > best_len:
                best, best_len = words[j][2], ov
            j += 1
        out[i] = best
    return out.astype(str) if n else np.zeros(0, dtype="<U8")


def tag_corpus(corpus, tagger) -> np.ndarray:
    """Tags for every token of a Corpus, flat over its documents."""
    parts = tag_documents(corpus.texts, corpus.offsets, tagger, corpus.special)
    return np.concatenate(parts) if parts else np.zeros(0, dtype="<U8")


def tag_text(text: str, tokenizer, tagger) -> tuple[list[str], np.ndarray]:
    """Convenience: (token texts, tags) of `text` under `tokenizer`."""
    from .corpus import encode_with_offsets, special_ids

    ids, offs, _ = encode_with_offsets(tokenizer, text)
    sp = np.isin(ids, list(special_ids(tokenizer) or [-1]))
    return [text[s:e] for s, e in offs], tag_tokens(text, offs, tagger, sp)
