"""A transformers `PreTrainedModel` around `DualPathLM`, so exported models load with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and generate with `model.generate(...)`.

The forward pass is the native one (`DualPathLM.forward`), so logits equal the native model's exactly.

Generation uses the model's own KV cache (`DualPathCache`, one `KVCache` per batch or per row) rather than
a transformers `Cache`. Padded batches (an `attention_mask` with zeros, e.g. left padding in batched
generation) are run row by row with the padding removed, so each row gets the result it would get alone.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..model import AdaptivePolicy, DualPathLM, KVCache, Overrides, init_module
from .configuration_dualpath import DualPathConfig, check_adaptive, check_gates
# transformers 5.24 renamed the outputs' and generate()'s `past_key_values` to `cache` (the old name warns)
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class DualPathCache:
    """The KV cache of one generation: a KVCache for the whole batch, or one per row once padding appears.

    `seen` counts the input columns consumed so far (padding included), which is what `generate` slices by.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.seen = 0
        self.shared: KVCache | None = KVCache(max_len)
        self.rows: list[KVCache] | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def split_rows(self, batch_size: int) -> list[KVCache]:
        """Switch to one cache per row (every column so far was a real token of every row)."""
        if self.rows is None:
            rows = []
            for r in range(batch_size):
                c = KVCache(self.max_len)
                c.pos = self.shared.pos
                c.buffers = {k: (kb[r:r + 1].clone(), vb[r:r + 1].clone())
                             for k, (kb, vb) in self.shared.buffers.items()}
                rows.append(c)
            self.rows, self.shared = rows, None
        return self.rows


class DualPathPreTrainedModel(PreTrainedModel):
    config_class = DualPathConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DualPathLM"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model keeps its own cache (DualPathCache)

    @torch.no_grad()
    def _init_weights(self, module):
        """DualPathLM.reset_parameters, per module; from_pretrained only runs it for what the weights lack
        (the RoPE tables, which are not stored)."""
        if isinstance(module, DualPathLM):
            # in the weights' dtype, as DualPathLM(...).to(dtype) would have them
            w = module.embed.weight
            cos, sin = module._rope_tables(module.cfg.seq_len)
            module.rope_cos = cos.to(device=w.device, dtype=w.dtype)
            module.rope_sin = sin.to(device=w.device, dtype=w.dtype)
        else:
            init_module(module, self.config)


class DualPathForCausalLM(DualPathPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: DualPathConfig):
        super().__init__(config)
        # from_pretrained(..., K=2, gates="deep-only") sets these after the config was built: check them here
        config.K = int(config.K)
        config.gate_seed = int(config.gate_seed)
        check_gates(config.gates)
        config.adaptive = check_adaptive(getattr(config, "adaptive", None))
        if config.adaptive is not None:
            AdaptivePolicy.parse(config.adaptive).check(config.to_model_config())
        if not 1 <= config.K <= config.max_loops:
            raise ValueError(f"K={config.K} is outside 1..max_loops={config.max_loops}")
        self.model = DualPathLM(config.to_model_config())
        self.post_init()

    # -- transformers plumbing -------------------------------------------------------------------

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def overrides(self) -> Overrides:
        """The inference overrides the config asks for (K, gates, adaptive); read on every forward."""
        c = self.config
        K = c.K if c.arch in ("loop", "dual") else None
        adaptive = getattr(c, "adaptive", None)
        return Overrides(K=K, gates=c.gates if c.arch == "dual" else None, seed=c.gate_seed,
                         extra_steps_gain=c.extra_steps_gain,
                         adaptive=AdaptivePolicy.parse(adaptive) if adaptive else None)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: DualPathCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, inputs_embeds: torch.Tensor | None = None,
                return_dict: bool | None = None, cache: DualPathCache | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        past_key_values = cache if cache is not None else past_key_values  # `cache` from transformers 5.24
        if inputs_embeds is not None:
            raise ValueError("DualPathForCausalLM takes input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if past_key_values is not None and not isinstance(past_key_values, DualPathCache):
            raise ValueError(f"past_key_values must be a DualPathCache, got {type(past_key_values).__name__}")
        cache = past_key_values
        if cache is None and use_cache:
            cache = DualPathCache(self.config.seq_len)
        ov = self.overrides()
        B, T = input_ids.shape
        new_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("DualPathForCausalLM supports only 2-D (batch, length) attention masks")
            new_mask = attention_mask[:, -T:].bool()
        padded = new_mask is not None and not bool(new_mask.all())
        if cache is not None and (padded or cache.rows is not None):
            logits = self._forward_rows(input_ids, new_mask, cache.split_rows(B), ov)
        elif padded:
            logits = self._forward_rows(input_ids, new_mask, [None] * B, ov)
        else:
            logits = self.model(input_ids, overrides=ov, cache=cache.shared if cache is not None else None).logits
        if cache is not None:
            cache.seen += T
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                   ignore_index=-100)
        if return_dict is False:
            return tuple(v for v in (loss, logits, cache) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def _forward_rows(self, input_ids, new_mask, caches, ov):
        """Each row alone, without its padding (positions where new_mask is False get zero logits)."""
        B, T = input_ids.shape
        logits = None
        for r in range(B):
            keep = new_mask[r] if new_mask is not None else torch.ones(T, dtype=torch.bool, device=input_ids.device)
            if not bool(keep.any()):
                continue
            out = self.model(input_ids[r][keep].unsqueeze(0), overrides=ov, cache=caches[r]).logits[0]
            if logits is None:
                logits = out.new_zeros(B, T, out.size(-1))
            logits[r, keep] = out
        if logits is None:
            logits = torch.zeros(B, T, self.config.vocab_size, device=input_ids.device,
                                 dtype=self.model.lm_head.weight.dtype)
        return logits

    # -- generation ------------------------------------------------------------------------------

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=None, cache=None, **kwargs):
        past_key_values = cache if cache is not None else past_key_values
        if inputs_embeds is not None:
            raise ValueError("DualPathForCausalLM generates from input_ids, not inputs_embeds")
        if not isinstance(past_key_values, DualPathCache):
            past_key_values = None
        if past_key_values is not None and past_key_values.seen:
            input_ids = input_ids[:, past_key_values.seen:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, _CACHE_FIELD: past_key_values,
                "use_cache": use_cache}

    def _reorder_cache(self, past_key_values, beam_idx):
        raise NotImplementedError("beam search is not supported by DualPathForCausalLM; use greedy or sampling")
