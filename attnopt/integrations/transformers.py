"""`attn_implementation="attnopt"` for transformers models, through its public AttentionInterface.

    import attnopt.integrations.transformers as att
    att.register(quant="int8", pv="auto")
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnopt")

Prefill runs attnopt's quantized attention; without an AttnoptCache, decode (one query token),
soft-capping and requested attention weights fall back to transformers' own SDPA path, so nothing
is silently changed there.

With an `AttnoptCache` (a quantized static KV cache, decode/ holds its storage and kernels) the
same attention function also runs decode: the cache's update() writes the new K / V into the
quantized storage and returns the new 16-bit tokens (what a prefill into an empty cache attends
to), and hands the layer to the attention function through the attention kwargs dict the model
passes to both (`cache.update(..., kwargs=kwargs)`, then `attention_interface(..., **kwargs)` in
transformers 5.x's Llama / Qwen2 / Mistral attention). Decode steps then read the quantized
tensors directly (torch.ops.attnopt.kv_decode: the Triton split-KV kernel on CUDA), never a
dequantized copy.

    att.register()
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="attnopt")
    cache = att.AttnoptCache(model.config, max_cache_len=4096, quant="int8")
    model.generate(ids, cache=cache, max_new_tokens=256)

AttnoptCache.mark() / rewind() drop the positions written since a mark (self-speculative
decoding: speculative.py); AttnoptCache.from_plan() applies a calibrated plan's per-head decode
windows and stores only what they reach (windows.py, decode/storage.py).
"""

from __future__ import annotations

import functools

import torch

NAME = "attnopt"
HANDLE = "attnopt_kv_layer"  # the attention kwargs key AttnoptLayer.update() puts itself under
DECODE_MAX_QUERIES = 16  # appends up to this many tokens attend to the quantized storage (decode, verification)


def register(quant: str = "int8", pv: str = "auto", smooth_k: bool = True, min_seq_len: int = 0,
             name: str = NAME) -> str:
    """Register attnopt as an attention implementation (and its mask format) under `name`."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from ..ops.attention import attention

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        layer = kwargs.pop(HANDLE, None)
        if layer is not None:  # an AttnoptCache layer: key / value are the tokens just written
            layer.read = True
            extra = [k for k in ("softcap", "output_attentions", "position_bias", "sliding_window", "s_aux")
                     if kwargs.get(k) not in (None, False)] + (["dropout"] if dropout else [])
            if extra:  # SDPA cannot take over: it would see the new tokens only
                raise NotImplementedError(f"AttnoptCache: attention with {', '.join(extra)}")
            if not layer.prefill_from_empty:
                return _decode(query, layer, attention_mask, scaling)
            if attention_mask is not None:
                attention_mask = attention_mask[..., : key.shape[2]]
        q_len, kv_len = query.shape[2], key.shape[2]
        unsupported = (kwargs.get("softcap") is not None or kwargs.get("output_attentions") or dropout
                       or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None)
        if unsupported or q_len == 1 or kv_len < min_seq_len:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(q_len > 1 and attention_mask is None and causal)
        if causal and kv_len > q_len:  # an empty static cache's prefill: only the first q_len keys exist
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        out = attention(query, key, value, attn_mask=attention_mask, is_causal=causal, scale=scaling,
                        enable_gqa=key.shape[1] != query.shape[1], quant=quant, pv=pv, smooth_k=smooth_k)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)  # boolean masks, as SDPA takes them
    return name


def _decode(query, layer, attention_mask, scaling):
    """Attention of the new query tokens over the layer's whole quantized cache; the mask's last
    row gives the keys each sequence has (left padding), the kernel adds the causal offset."""
    from ..decode.op import decode_attention

    valid = None
    if attention_mask is not None:
        row = attention_mask[:, 0, -1, :]
        valid = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    lengths = layer.cumulative_length.expand(query.shape[0])
    window = getattr(layer, "window_heads", None)
    if window is not None and window.numel() != query.shape[1]:
        raise ValueError(f"AttnoptCache: {window.numel()} head windows for {query.shape[1]} query heads")
    out = decode_attention(query, layer.store, lengths, valid, scaling, draft=layer.draft, window=window,
                           sinks=layer.sinks)
    return out.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=None)
def _classes():
    """(AttnoptLayer, AttnoptCache), made on first use so that importing this module does not
    import transformers (module __getattr__ below)."""
    from transformers.cache_utils import Cache, StaticLayer, get_layer_types_and_kwargs
    from transformers.utils import is_torchdynamo_compiling

    from ..decode.kv_quant import KVLayout
    from ..decode.storage import QuantizedKV, windowed_slots

    class AttnoptLayer(StaticLayer):
        """A StaticLayer whose K / V live in a QuantizedKV (static shapes, written in place)."""

        is_croppable = False  # only back to a mark() (the 16-bit ring holds the last `residual` tokens)

        def __init__(self, max_cache_len: int, layout: KVLayout, window: list[int] | None = None, sinks: int = 0,
                     **kwargs):
            super().__init__(max_cache_len)
            self.layout = layout
            self.window, self.sinks = window, sinks  # per query head (from_plan); None: every token kept
            self.keep = None if window is None else windowed_slots(layout, sinks, max(window), DECODE_MAX_QUERIES)
            if self.keep is not None and sum(self.keep) >= layout.slots(max_cache_len):
                self.keep = None  # the windows reach further than the cache holds: store it all
            self.store = None
            self.prefill_from_empty = False
            self.draft = False  # "int4+int8": decode reads the upper nibbles only (AttnoptCache.set_draft)
            self.saved = None  # mark(): (first position, the ring slots the next positions overwrite)
            self.read = True  # False between an update() and the attention function reading the storage

        def lazy_initialization(self, key_states, value_states):
            self.device = key_states.device
            self.batch_size, self.num_heads = key_states.shape[:2]
            self.k_head_dim = self.v_head_dim = key_states.shape[-1]
            if value_states.shape[-1] != self.k_head_dim:
                raise NotImplementedError("AttnoptCache: K and V head dims differ")
            self.store = QuantizedKV(self.layout, self.batch_size, self.num_heads, self.max_cache_len,
                                     self.k_head_dim, key_states.dtype, self.device, keep=self.keep)
            if self.window is not None:
                self.window_heads = torch.tensor(self.window, device=self.device)
            self.keys, self.values = self.store.ring_k, self.store.ring_v  # what Cache's helpers look at
            self.cumulative_length = self.cumulative_length.to(self.device)
            if not is_torchdynamo_compiling():
                for t in self.store.tensors() + [self.cumulative_length]:
                    torch._dynamo.mark_static_address(t)
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            compiling = is_torchdynamo_compiling()
            if not compiling and not self.read:
                raise RuntimeError(
                    "AttnoptCache: the attention did not read the quantized cache. Register attnopt's attention "
                    "(attnopt.integrations.transformers.register()) and load the model with "
                    "attn_implementation='attnopt'.")
            model_kwargs = kwargs.get("kwargs")
            if not isinstance(model_kwargs, dict):
                raise NotImplementedError(
                    "AttnoptCache: this model does not pass its attention kwargs to cache.update(), so its "
                    "attention cannot find the quantized storage")
            n = key_states.shape[-2]
            self.prefill_from_empty = n > DECODE_MAX_QUERIES and not compiling and int(self.cumulative_length) == 0
            self.store.append(key_states, value_states, self.cumulative_length)
            self.cumulative_length.add_(n)
            model_kwargs[HANDLE] = self
            self.read = compiling
            return key_states, value_states

        def reset(self):
            if self.store is not None:
                self.store.zero_()
            self.cumulative_length.zero_()
            self.read = True

        def mark(self, n: int) -> None:
            """Save the 16-bit ring slots that writing the next `n` positions overwrites, so that
            rewind() can drop those positions again (speculative decoding)."""
            r = self.layout.residual
            if not 0 < n <= r:
                raise ValueError(f"AttnoptCache: mark(n) needs 0 < n <= residual={r}, got {n}")
            start = int(self.cumulative_length)
            slots = (start + torch.arange(n, device=self.device)) % r
            self.saved = (start, n, self.store.ring_k[:, :, slots].clone(), self.store.ring_v[:, :, slots].clone())

        def rewind(self, length: int) -> None:
            """Back to `length` tokens, between the mark() and now: the ring slots of the dropped
            positions get back the older tokens they held (readers take the last `residual` tokens
            from the ring); quantized codes past `length` are masked by the length and rewritten
            by the next append (it re-quantizes whole groups from its valid tokens only)."""
            if self.saved is None:
                raise RuntimeError("AttnoptCache: rewind() without mark()")
            start, n, ring_k, ring_v = self.saved
            end = int(self.cumulative_length)
            if not start <= length <= end or end > start + n:
                raise ValueError(f"AttnoptCache: rewind to {length} outside the mark [{start}, {start + n}] "
                                 f"(now {end} tokens)")
            r = self.layout.residual
            pos = torch.arange(length, end, device=self.device)
            self.store.ring_k.index_copy_(2, pos % r, ring_k[:, :, pos - start])
            self.store.ring_v.index_copy_(2, pos % r, ring_v[:, :, pos - start])
            self.cumulative_length.fill_(length)

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("AttnoptCache: crop (its ring keeps only the last `residual` tokens in 16 "
                                      "bits); AttnoptCache.mark() / rewind() drop tokens written since a mark")

        def reorder_cache(self, beam_idx) -> None:
            raise NotImplementedError("AttnoptCache: beam search (reorder_cache)")

    class AttnoptCache(Cache):
        """A transformers Cache of AttnoptLayers, like StaticCache(config, max_cache_len) but with
        K and V stored as `quant` ("int8", "int4", "int4+int8") with per-`group` scales and the
        last `residual` tokens in 16 bits. Needs attn_implementation="attnopt" (register())."""

        def __init__(self, config, max_cache_len: int, quant: str = "int8", group: int = 64, residual: int = 128,
                     offloading: bool = False, windows: dict | None = None, **kwargs):
            if offloading:
                raise NotImplementedError("AttnoptCache: offloading")
            self.layout = KVLayout(quant, group, residual)
            self.text_config = config.get_text_config(decoder=True)
            self.layout.check_head_dim(_head_dim(self.text_config))
            layer_types, _ = get_layer_types_and_kwargs(self.text_config)
            if any(t != "full_attention" for t in layer_types):
                raise NotImplementedError(f"AttnoptCache: only full-attention layers, got {sorted(set(layer_types))}")
            self.max_cache_len = max_cache_len
            windows = windows or {}  # layer index -> (per query head windows, sinks)
            super().__init__(layers=[AttnoptLayer(max_cache_len, self.layout, *windows.get(i, (None, 0)))
                                     for i in range(len(layer_types))])

        @classmethod
        def from_plan(cls, config, max_cache_len: int, plan, model=None, **kwargs):
            """Per-head decode windows from a calibrated plan's 'window' sites (MoA-style): each
            layer stores only its sinks and the span its widest window reaches (kwargs: quant,
            group, residual). Site keys map to layers by `model` (the module's layer_idx) or, without
            it, by the number after "layers." in the key (windows.py)."""
            from .windows import plan_windows

            heads = config.get_text_config(decoder=True).num_attention_heads
            return cls(config, max_cache_len, windows=plan_windows(plan, heads, max_cache_len, model), **kwargs)

        @classmethod
        def from_options(cls, config, max_cache_len: int, options=None):
            """From attnopt options: attention.kv_cache's settings; null gives transformers' StaticCache."""
            from transformers.cache_utils import StaticCache

            from ..config import normalize_options

            kv = normalize_options(options).attention.kv_cache
            if kv is None:
                return StaticCache(config, max_cache_len)
            return cls(config, max_cache_len, quant=kv.quant, group=kv.group, residual=kv.residual)

        def set_draft(self, on: bool = True) -> None:
            """"int4+int8" only: decode steps read the 4-bit upper nibbles (a self-speculative draft,
            QuantSpec) until set_draft(False); the stored cache is the same either way."""
            if on and not self.layout.has_low:
                raise ValueError(f"AttnoptCache: a draft read needs quant='int4+int8', not {self.layout.quant!r}")
            for layer in self.layers:
                layer.draft = bool(on)

        def mark(self, n: int) -> None:
            """Every layer: the next `n` positions (n <= residual) may be dropped again by rewind()."""
            for layer in self.layers:
                layer.mark(n)

        def rewind(self, length: int) -> None:
            """Every layer back to `length` tokens (at least the length at mark())."""
            for layer in self.layers:
                layer.rewind(length)

        def nbytes(self, batch_size: int | None = None, dtype: torch.dtype | None = None) -> int:
            """Bytes of its storage: the allocated tensors (once the first update() made them), or
            what `batch_size` sequences of `dtype` K / V allocate (computed from the shapes)."""
            return sum(self.layer_nbytes(batch_size, dtype))

        def layer_nbytes(self, batch_size: int | None = None, dtype: torch.dtype | None = None) -> list[int]:
            """nbytes() per layer (windowed layers store less)."""
            if batch_size is None and dtype is None and all(layer.store is not None for layer in self.layers):
                return [layer.store.nbytes() for layer in self.layers]
            c = self.text_config
            return [self.layout.nbytes(batch_size or 1, c.num_key_value_heads, self.max_cache_len, _head_dim(c),
                                       dtype or torch.bfloat16, None if layer.keep is None else sum(layer.keep))
                    for layer in self.layers]

        def layer_report(self, batch_size: int | None = None, dtype: torch.dtype | None = None) -> str:
            """One line per layer: its widest window, sinks and bytes."""
            lines = []
            for i, (layer, n) in enumerate(zip(self.layers, self.layer_nbytes(batch_size, dtype))):
                span = "all tokens" if layer.keep is None else (
                    f"window <= {max(layer.window)}, sinks {layer.sinks}, {sum(layer.keep)} slots")
                lines.append(f"layer {i}: {span}, {n / 2 ** 20:.2f} MiB")
            return "\n".join(lines)

    return AttnoptLayer, AttnoptCache


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def static_cache_nbytes(config, max_cache_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
    """Bytes of transformers' StaticCache(config, max_cache_len) once filled in: K and V, 16 bits."""
    config = config.get_text_config(decoder=True)
    per_layer = 2 * batch_size * config.num_key_value_heads * max_cache_len * _head_dim(config)
    return config.num_hidden_layers * per_layer * torch.empty((), dtype=dtype).element_size()


def __getattr__(name):
    """AttnoptCache(config, max_cache_len, quant="int8", group=64, residual=128) and AttnoptLayer."""
    if name in ("AttnoptLayer", "AttnoptCache"):
        return _classes()[name == "AttnoptCache"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
