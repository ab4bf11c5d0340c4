"""`dualpath export CHECKPOINT --hf OUT_DIR`: a transformers-loadable, self-contained model folder.

    OUT_DIR/
        config.json                  model_type "dualpath", every ModelConfig field, dualpath_config_version,
                                     auto_map -> the two code files below
        model.safetensors            weights, keys "model.<native name>" (a tied LM head is stored once)
        generation_config.json       bos/eos/pad = <|endoftext|>, greedy by default
        tokenizer.json, tokenizer_config.json   (PreTrainedTokenizerFast)
        configuration_dualpath.py    DualPathConfig
        modeling_dualpath.py         DualPathForCausalLM (PreTrainedModel + GenerationMixin)
        model.py, config.py, errors.py, ...   the dualpath model code they import (relative imports)
        README.md

    AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True[, K=2, gates="deep-only"])
    AutoTokenizer.from_pretrained(OUT_DIR, trust_remote_code=True)   # or PreTrainedTokenizerFast.from_pretrained(OUT_DIR); omitted: transformers asks (docs/HF_AND_LM_EVAL.md)

The folder is written to a temporary sibling and renamed into place; a non-empty OUT_DIR is refused
unless overwrite=True.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..errors import CheckpointError, DualPathError
from ..fileio import atomic_write_text, check_out_dir, fsync_tree, install_dir

HF_FILES = ("configuration_dualpath.py", "modeling_dualpath.py")
ROOT_MODULE = "model"  # the dualpath module the exported code needs; its relative imports follow

_PKG = Path(__file__).resolve().parent.parent  # src/dualpath
_REL_IMPORT = re.compile(r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE)
_PARENT_IMPORT = re.compile(r"^(\s*from\s+)\.\.(\w)", re.MULTILINE)


def _relative_imports(text: str) -> list[str]:
    """Modules named by `from .x import ...` (what transformers' dynamic-module loader follows)."""
    return sorted(set(_REL_IMPORT.findall(text)))


def _stub(name: str) -> str:
    return (f'"""Placeholder: dualpath.{name} was not available when this model was exported."""\n\n'
            f'raise ImportError("dualpath.{name} is not part of this export")\n')


def model_code_files() -> dict[str, str]:
    """File name -> source of every file the exported model code needs, flat, with relative imports.

    configuration_dualpath.py and modeling_dualpath.py import `..x` inside the package; here that becomes `.x`.
    The dualpath modules they reach (model.py and what it imports) are copied as they are; a module the
    model code names but this installation lacks gets a stub that raises ImportError when imported.
    """
    files: dict[str, str] = {}
    for name in HF_FILES:
        files[name] = _PARENT_IMPORT.sub(r"\1.\2", (Path(__file__).parent / name).read_text(encoding="utf-8"))
    todo = [m for text in files.values() for m in _relative_imports(text)]
    seen = {Path(n).stem for n in files}
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        if "." in mod:
            raise DualPathError(f"the model code imports '.{mod}', a sub-package; the HF export can only bundle "
                                "top-level dualpath modules")
        src = _PKG / f"{mod}.py"
        if src.is_file():
            text = src.read_text(encoding="utf-8")
            files[f"{mod}.py"] = text
            todo.extend(_relative_imports(text))
        else:
            files[f"{mod}.py"] = _stub(mod)
    return files


def _readme(cfg, ckpt: Path, eos: str) -> str:
    m = cfg.model
    return (f"# dualpath export ({m.arch})\n\n"
            f"Exported by `dualpath export` from checkpoint `{ckpt.name}`.\n\n"
            f"arch={m.arch} d_model={m.d_model} n_layers={m.n_layers} heads={m.n_heads}/{m.n_kv_heads} "
            f"K={m.K} seq_len={m.seq_len} vocab={m.vocab_size}\n\n"
            "```python\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)  # K=..., gates=...\n"
            "tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)\n"
            "```\n\n"
            f"`{eos}` is the BOS, EOS and padding token. Inference settings: `K` (deep-path loop steps, "
            f"1..{m.max_loops}), `gates` (deep-only | wide-only | both=C | shuffled, dual only), `gate_seed`.\n")


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
              adaptive=None) -> Path:
    """Export a dualpath checkpoint (run, checkpoints or step folder) as a Hugging Face model folder.

    adaptive: an AdaptivePolicy (or its string) the exported config runs by default (from_pretrained(...,
    adaptive=None) turns it off).

    Returns the output folder. Raises CheckpointError for a missing/corrupt checkpoint, a checkpoint without
    tokenizer.json, or a non-empty out_dir without overwrite.
    """
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise DualPathError("the HF export needs transformers: pip install 'dualpath[eval]'") from None
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from .. import __version__
    from ..checkpoint import load_model, weights_for_saving
    from ..data.tokenizer import check_vocab, find_eos
    from .configuration_dualpath import DualPathConfig

    out = Path(out_dir).expanduser().absolute()
    check_out_dir(out, overwrite, CheckpointError)
    model, cfg, ckpt = load_model(checkpoint)
    if out == ckpt.absolute() or out in ckpt.absolute().parents:
        raise CheckpointError(f"{out} holds the checkpoint being exported; choose another output folder")
    tok_path = ckpt / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no tokenizer.json; the HF export needs one")
    try:
        raw_tok = Tokenizer.from_file(str(tok_path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
        raise CheckpointError(f"cannot read {tok_path}: {str(e).splitlines()[0][:160] if str(e) else e}") from None
    check_vocab(raw_tok.get_vocab_size(), cfg.model.vocab_size, f"the tokenizer in {ckpt}")
    eos_id, eos = find_eos(raw_tok, "the checkpoint's tokenizer")
    if adaptive is not None:  # before anything is written
        from ..model import AdaptivePolicy

        adaptive = str((adaptive if isinstance(adaptive, AdaptivePolicy) else AdaptivePolicy.parse(str(adaptive)))
                       .check(cfg.model))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        # weights: the native names under "model.", a tied head stored once (as model.embed.weight)
        state = weights_for_saving(model.state_dict(), cfg)
        save_file({f"model.{k}": v for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})

        hf_cfg = DualPathConfig(**{k: v for k, v in vars(cfg.model).items()}, adaptive=adaptive, bos_token_id=eos_id,
                                eos_token_id=eos_id, pad_token_id=eos_id)
        hf_cfg.architectures = ["DualPathForCausalLM"]
        hf_cfg.auto_map = {"AutoConfig": "configuration_dualpath.DualPathConfig",
                           "AutoModelForCausalLM": "modeling_dualpath.DualPathForCausalLM"}
        hf_cfg.dtype = "float32"
        data = hf_cfg.to_dict()
        for key in ("_name_or_path", "id2label", "label2id"):
            data.pop(key, None)
        data["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        data["dualpath_version"] = __version__
        atomic_write_text(tmp / "config.json", json.dumps(data, indent=2, sort_keys=True) + "\n")

        GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                         do_sample=False).save_pretrained(tmp)

        for name, text in model_code_files().items():
            atomic_write_text(tmp / name, text)

        hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), bos_token=eos, eos_token=eos, pad_token=eos,
                                         model_max_length=cfg.model.seq_len, clean_up_tokenization_spaces=False)
        hf_tok.save_pretrained(tmp)
        # name the class every transformers version knows (5.x writes its own alias, TokenizersBackend)
        tok_cfg_path = tmp / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        atomic_write_text(tok_cfg_path, json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
        atomic_write_text(tmp / "README.md", _readme(cfg, ckpt, eos))
        mode = (tmp / "config.json").stat().st_mode & 0o777  # safetensors writes 0600; share like the rest
        for f in tmp.iterdir():
            f.chmod(mode)
        fsync_tree(tmp)
        install_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
