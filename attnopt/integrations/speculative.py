"""Self-speculative greedy decoding over one "int4+int8" AttnoptCache (QuantSpec).

    import attnopt.integrations.transformers as att
    from attnopt.integrations.speculative import generate_speculative
    att.register()
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="attnopt")
    cache = att.AttnoptCache(model.config, 4096, quant="int4+int8")
    tokens, stats = generate_speculative(model, ids, cache, max_new_tokens=256, draft_tokens=4)

The draft and the target are the same model over the same cache: the draft's decode steps read
the cache's upper nibbles (4 bits, half the bytes), the target's one verification pass reads all
8 bits. Each round, from L cached tokens and the pending token x (the target's last prediction):

  1. mark L .. L+k: the ring slots those positions overwrite are saved (AttnoptCache.mark)
  2. draft k tokens d1..dk one step at a time, reading 4 bits (their K / V go into the cache)
  3. rewind to L (the draft's K / V are dropped), then one target pass over x, d1..dk: k+1
     query tokens on kv_decode, 8 bits, writing the target's K / V at L .. L+k
  4. accept the longest prefix with target argmax == draft token, plus the target's next
     token; rewind to L + accepted + 1

Greedy only, batch 1. The tokens are those of plain greedy decoding on the 8-bit read of the
same cache, up to floating-point order (the target scores k+1 tokens in one pass, greedy one at
a time): where its top two logits nearly tie the two may pick differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SpeculativeStats:
    """What a run did: rounds (target passes), drafted and accepted draft tokens."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def accept_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def _logits(model, ids, cache):
    """Logits [n, vocab] of ids [1, n] appended to the cache."""
    return model(input_ids=ids, cache=cache, use_cache=True).logits[0].float()



@torch.no_grad()
def generate_speculative(model, input_ids: torch.Tensor, cache, max_new_tokens: int, draft_tokens: int = 4,
                         draft_weights: str | None = None, eos_token_id: int | None = None,
                         return_logits: bool = False):
    """Greedy decoding of `max_new_tokens` after input_ids [1, n] (an empty "int4+int8"
    AttnoptCache, attn_implementation="attnopt"). draft_weights "w4a16": the draft steps also
    run the decoder linears on int4 weights (draft_weights.py). Returns (new tokens [1, m],
    SpeculativeStats), and with return_logits the target's logits per new token [m, vocab]."""
    if input_ids.shape[0] != 1:
        raise NotImplementedError("generate_speculative: batch 1 only (acceptance is per sequence)")
    if not 1 <= draft_tokens < cache.layout.residual:
        raise ValueError(f"draft_tokens must be in [1, residual), got {draft_tokens}")
    if draft_weights not in (None, "w4a16"):
        raise ValueError(f"draft_weights must be None or 'w4a16', got {draft_weights!r}")
    cache.set_draft(True)  # raises for a cache without the 4-bit plane
    cache.set_draft(False)
    drafter = model
    if draft_weights == "w4a16":
        from .draft_weights import w4_draft

        drafter = w4_draft(model)
    logits = _logits(model, input_ids, cache)[-1:]
    out, out_logits = [int(logits[-1].argmax())], [logits[-1]]
    stats = SpeculativeStats()
    dev = input_ids.device
    while len(out) < max_new_tokens and out[-1] != eos_token_id:
        k = min(draft_tokens, max_new_tokens - len(out))
        start = int(cache.layers[0].cumulative_length)
        if start + k + 1 > cache.max_cache_len:
            raise ValueError(f"generate_speculative: the cache holds {cache.max_cache_len} tokens")
        cache.mark(k + 1)
        cache.set_draft(True)
        draft, prev = [], out[-1]
        try:
            for _ in range(k):
                prev = int(_logits(drafter, torch.tensor([[prev]], device=dev), cache)[-1].argmax())
                draft.append(prev)
        finally:
            cache.set_draft(False)
        cache.rewind(start)
        verify = _logits(model, torch.tensor([[out[-1]] + draft], device=dev), cache)  # [k+1, vocab]
        target = verify.argmax(-1).tolist()
        a = 0
        while a < k and draft[a] == target[a] and draft[a] != eos_token_id:
            a += 1
        stats.rounds, stats.drafted, stats.accepted = stats.rounds + 1, stats.drafted + k, stats.accepted + a
        out += draft[:a] + [target[a]]
        out_logits += list(verify[: a + 1])
        cache.rewind(start + a + 1)
    if eos_token_id is not None and eos_token_id in out:
        out = out[: out.index(eos_token_id) + 1]
    out, out_logits = out[:max_new_tokens], out_logits[:max_new_tokens]
    tokens = torch.tensor([out], device=dev)
    if return_logits:
        return tokens, stats, torch.stack(out_logits)
    return tokens, stats
