"""Search adapters: a DualPathLM seen as "a model whose layers each take one of a few named choices"
(the `LayeredModel` interface of `routing.search`). They call the layers' own choice interface and
re-implement no forward pass."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import CheckpointError
from ..model import NO_OVERRIDES
from .search import LayeredModel


def chunked_token_loss(hidden: torch.Tensor, norm, head, targets: torch.Tensor, max_rows: int = 8192
                       ) -> torch.Tensor:
    """Per-token cross-entropy of head(norm(hidden)) without materialising all logits at once."""
    B, T, d = hidden.shape
    flat_h, flat_t = hidden.reshape(-1, d), targets.reshape(-1)
    out = torch.empty(flat_t.shape, dtype=torch.float32, device=hidden.device)
    for s in range(0, flat_h.shape[0], max_rows):
        logits = head(norm(flat_h[s:s + max_rows])).float()
        out[s:s + max_rows] = F.cross_entropy(logits, flat_t[s:s + max_rows], ignore_index=-1, reduction="none")
    return out.view(B, T)


class _LMHeadMixin:
    model: Any

    def embed(self, idx):
        return self.model.embed(idx)

    def _rope(self, T: int):
        if T > self.model.rope_cos.shape[0]:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.model.rope_cos.shape[0]})")
        return self.model.rope_cos[:T], self.model.rope_sin[:T]

    def logits_loss(self, state, targets):
        return chunked_token_loss(state, self.model.norm, self.model.lm_head, targets)


class LayerChoiceModel(_LMHeadMixin):
    """A DualPathLM whose layers take named whole-batch choices: every call goes through the layers' own
    choice interface (`layer(x, rope, ov, choice=c)`, `layer.step_many(x, rope, choices)`)."""

    arch: ClassVar[str]

    def __init__(self, model):
        if model.cfg.arch != self.arch:
            raise CheckpointError(f"this needs a {self.title} model (model.arch={self.arch}), this one is "
                                  f"{model.cfg.arch}")
        self.model = model
        self.n_layers = model.cfg.n_layers

    def apply_layer(self, i, x, choice):
        """The reference path: the layer's own forward under the choice."""
        return self.model.layers[i](x, self._rope(x.shape[1]), NO_OVERRIDES, None, None, choice)

    def apply_layer_multi(self, i, x, choices):
        """Siblings from one input, sharing what they have in common (the layer's `step_many`)."""
        return self.model.layers[i].step_many(x, self._rope(x.shape[1]), choices)


class DuoSearchModel(LayerChoiceModel):
    """A Duo-LLM model (arch duo): every layer is big, small or skip for the whole batch."""

    arch, title = "duo", "Duo-LLM"
    choices: ClassVar[tuple] = ("big", "small", "skip")
    default_choice = "small"
    letters: ClassVar[dict] = {"big": "B", "small": "S", "skip": "X"}


class DualSearchModel(LayerChoiceModel):
    """A Dual-Path model (arch dual): per layer, the learned gates, or their sum moved to one path
    ("deep-favoured" keeps g_d + g_w and puts all of it on the deep path, "wide-favoured" on the wide)."""

    arch, title = "dual", "Dual-Path"
    choices: ClassVar[tuple] = ("learned", "deep-favoured", "wide-favoured")
    default_choice = "learned"
    letters: ClassVar[dict] = {"learned": "L", "deep-favoured": "D", "wide-favoured": "W"}


def search_model_for(model) -> LayeredModel:
    """The search adapter of a DualPathLM: Duo (big/small/skip) or Dual-Path (learned/deep/wide)."""
    arch = model.cfg.arch
    if arch == "duo":
        return DuoSearchModel(model)
    if arch == "dual":
        return DualSearchModel(model)
    raise CheckpointError(f"routing search needs a duo or dual model, this one is {arch}")
