"""A native lm-evaluation-harness model: `--model dualpath --model_args checkpoint=PATH[,K=2,gates=deep-only]`.

Scores a dualpath checkpoint directly (no HF export needed), with the same request handling as lm-eval's
`hf` model (no BOS unless add_bos_token=True, EOS as the prefix of rolling windows, context-sized
non-overlapping windows, left-truncated contexts), so its numbers match an exported model run with
`--model hf` up to float rounding.

Importing this module registers the model name "dualpath" with lm-eval (lm-eval 0.4.13 has no plugin
entry points, so something must import it before lm-eval looks the name up):

    python -m dualpath.eval.lm_eval --model dualpath --model_args checkpoint=runs/x --tasks dualpath_text_ppl
        # = the lm_eval CLI, after the import; adds --include_path <dualpath>/tasks unless you give one

    import dualpath.eval.lm_eval, lm_eval
    lm_eval.simple_evaluate(model="dualpath", model_args={"checkpoint": "runs/x", "K": 2}, tasks=[...],
                            task_manager=dualpath.eval.tasks.task_manager())

model_args: checkpoint (run, checkpoints or step folder; required), K (deep-path loop steps), gates
(deep-only | wide-only | both=C | shuffled), gate_seed, device (cpu | cuda[:N]; cuda falls back to cpu
when there is none), dtype (float32 | bfloat16 | float16), batch_size, max_length (default: the model's
seq_len), max_gen_toks (default 256), add_bos_token (prepend <|endoftext|> to contexts; default False,
as the hf model does), seed (sampling, when a task asks for do_sample), adaptive (an adaptive-depth policy,
keys joined by "/" since model_args splits on commas: adaptive=exit=0.1/deep=0.05; docs/ADAPTIVE.md).
"""

from __future__ import annotations

import logging
import sys

import torch
import torch.nn.functional as F

from ..errors import DualPathError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
except ImportError:  # pragma: no cover - exercised only without the eval extra
    raise ImportError("dualpath.eval.lm_eval needs lm-eval: pip install 'dualpath[eval]'") from None

log = logging.getLogger(__name__)

MODEL_NAME = "dualpath"
_TARGET = "dualpath.eval.lm_eval:DualPathEvalLM"


def register() -> None:
    """Register "dualpath" with lm-eval's model registry (idempotent; done on import)."""
    # lm-eval fills its registry with the built-in models only while the registry is empty, so they go in
    # first: registering alone would hide "hf" and the rest.
    import lm_eval.models  # noqa: F401

    try:
        model_registry.register(MODEL_NAME, target=_TARGET)
    except ValueError:
        current = model_registry.get(MODEL_NAME)
        if getattr(current, "__name__", None) != "DualPathEvalLM":
            raise


def _int_or_none(value, name: str):
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DualPathError(f"model_args {name}={value!r} is not an integer") from None


def _resolve_device(device) -> torch.device:
    name = str(device or "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device=%s requested but CUDA is not available; using cpu", name)
        name = "cpu"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(name)
    except RuntimeError:
        raise DualPathError(f"model_args device={device!r} is not a torch device") from None


class DualPathEvalLM(TemplateLM):
    """lm-eval LM over a DualPathLM checkpoint: loglikelihood, loglikelihood_rolling, generate_until."""

    backend = "causal"

    def __init__(self, checkpoint: str | None = None, K=None, gates: str | None = None, gate_seed=0,
                 device: str | None = "cpu", dtype: str = "float32", batch_size=8, max_batch_size=None,
                 max_length=None, max_gen_toks=256, add_bos_token: bool = False, seed=None, adaptive=None,
                 **kwargs):
        super().__init__()
        from ..checkpoint import load_model
        from ..data.tokenizer import check_tokenizer, find_eos, load_tokenizer
        from ..model import check_overrides
        from ..model import AdaptivePolicy, Overrides

        if kwargs:
            raise DualPathError(f"unknown model_args for --model dualpath: {', '.join(sorted(kwargs))} "
                                "(checkpoint, K, gates, gate_seed, device, dtype, batch_size, max_length, "
                                "max_gen_toks, add_bos_token, seed, adaptive)")
        if not checkpoint:
            raise DualPathError("--model dualpath needs model_args checkpoint=PATH")
        self._device = _resolve_device(device)
        model, cfg, folder = load_model(checkpoint, device=self._device)
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "auto": torch.float32}
        if str(dtype) not in dtypes:
            raise DualPathError(f"model_args dtype={dtype!r} is not one of {', '.join(dtypes)}")
        self.model = model.to(dtypes[str(dtype)]).eval()
        self.cfg = cfg.model
        self.checkpoint = folder
        self.tokenizer = load_tokenizer(folder)
        self._eot, self.eot_string = find_eos(self.tokenizer, f"tokenizer of {folder}")
        check_tokenizer(self.tokenizer, self.model, f"the tokenizer in {folder}")

        K = _int_or_none(K, "K")
        if gates in ("", "none", "None"):
            gates = None
        check_overrides(self.cfg, K=K, gates=gates, K_flag="model_args K", gates_flag="model_args gates")
        policy = AdaptivePolicy.parse(str(adaptive)).check(self.cfg) if adaptive not in (None, "") else None
        self.overrides = Overrides(K=K, gates=gates, seed=_int_or_none(gate_seed, "gate_seed") or 0, adaptive=policy)

        bs = str(batch_size)
        if bs.startswith("auto"):
            self.batch_size = _int_or_none(max_batch_size, "max_batch_size") or 8
        else:
            self.batch_size = max(1, _int_or_none(batch_size, "batch_size") or 1)
        self._max_length = _int_or_none(max_length, "max_length") or self.cfg.seq_len
        if self._max_length > self.cfg.seq_len:
            raise DualPathError(f"model_args max_length={self._max_length} exceeds the model's context "
                                f"({self.cfg.seq_len})")
        self._max_gen_toks = _int_or_none(max_gen_toks, "max_gen_toks") or 256
        if isinstance(add_bos_token, str):
            add_bos_token = add_bos_token.lower() in ("1", "true", "yes")
        self.add_bos_token = bool(add_bos_token)
        self.seed = _int_or_none(seed, "seed")

    # -- TemplateLM interface ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        ids = self.tokenizer.encode(string).ids
        if add and not string.startswith(self.eot_string):
            ids = [self._eot] + ids
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # -- scoring -------------------------------------------------------------------------------

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy) per (key, context_enc, continuation_enc)."""
        from tqdm import tqdm

        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests (dualpath)")
        for b in range(0, len(order), self.batch_size):
            rows = order[b:b + self.batch_size]
            inps, conts = [], []
            for i in rows:
                _, ctx, cont = requests[i]
                if not ctx or not cont:
                    raise DualPathError("empty context or continuation in a loglikelihood request")
                # as lm-eval's hf model: keep the last max_length+1 tokens, drop the very last one
                inps.append((ctx + cont)[-(self.max_length + 1):][:-1])
                conts.append(cont)
            T = max(len(x) for x in inps)
            x = torch.zeros(len(rows), T, dtype=torch.long)
            for r, inp in enumerate(inps):
                x[r, :len(inp)] = torch.tensor(inp)
            logits = self.model(x.to(self.device), overrides=self.overrides).logits
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for r, i in enumerate(rows):
                n, c = len(inps[r]), len(conts[r])
                lp = logprobs[r, n - c:n]  # predictions of the continuation tokens
                target = torch.tensor(conts[r], device=lp.device)
                greedy = bool((lp.argmax(-1) == target).all())
                score = float(lp.gather(-1, target[:, None]).sum())
                results[i] = (score, greedy)
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, (score, greedy))
                pbar.update(1)
        pbar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for k, req in enumerate(requests):
            (string,) = req.args
            for w in get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                ctx, cont = make_disjoint_window(w)
                windows.append((None, ctx, cont))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for k, (s, _) in zip(owner, scores):
            totals[k] += s
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
        from tqdm import tqdm

        from ..generate import decode_until, generate_tokens

        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="Running generate_until requests (dualpath)"):
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=self.eot_string)
            max_gen = int(kw.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                log.warning("max_gen_toks=%d does not fit the context (%d); using %d", max_gen, self.max_length,
                            self.max_length // 2)
                max_gen = self.max_length // 2
            temperature = float(kw.get("temperature") or 0.0) if kw.get("do_sample", False) else 0.0
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)
            if not ids:
                ids = [self._eot]
            tokens = generate_tokens(self.model, ids, max_gen, temperature=temperature, top_k=kw.get("top_k"),
                                     top_p=kw.get("top_p"), seed=self.seed, eos_id=self._eot,
                                     overrides=self.overrides)
            text, _, _ = decode_until(self.tokenizer, tokens, eos_id=self._eot, stop=[s for s in until if s])
            text = postprocess_generated_text(text, until, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


register()


def main(argv: list[str] | None = None) -> int:
    """The lm_eval CLI with "dualpath" registered and the dualpath tasks included (unless --include_path).
    The data files of the dualpath tasks and a dualpath checkpoint are checked before lm-eval starts."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from .tasks import TASKS_DIR, check_task_data

    args = list(sys.argv[1:] if argv is None else argv)
    if args and not any(a == "--include_path" or a.startswith("--include_path=") for a in args) \
            and args[0] not in ("-h", "--help"):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval"] + args
    try:
        parser = HarnessCLI()
        parsed = parser.parse_args()
        if getattr(parsed, "command", None) == "run":
            model_args = parsed.model_args if isinstance(parsed.model_args, dict) else {}
            check_task_data(parsed.tasks or [], {**model_args, **(parsed.metadata or {})})
            if parsed.model == MODEL_NAME and model_args.get("checkpoint"):
                from ..checkpoint import resolve

                resolve(model_args["checkpoint"])
        setup_logging()
        parser.execute(parsed)
    except DualPathError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
