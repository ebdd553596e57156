"""Quality of a codec profile, measured on the real model: what the decode side would
compute from a reconstructed KV cache, compared with what it computes from the exact one.

Per calibration prompt, once:
  * prefill the prompt minus its last token (float32 model) and keep each layer's K and V in
    bf16, canonical [tokens, kv_heads, head_dim]: the bytes the wire carries. These rounded
    tensors are the *reference* cache, so the identity profile measures exactly 0;
  * from the reference cache, generate `generated_tokens` (32) tokens greedily;
  * teacher-force the probe (the prompt's last token + the first 31 generated tokens) over
    the reference cache and keep the 32 next-token log-distributions.

Per profile: encode and decode every layer of every prompt, rebuild a cache from the
decoded tensors, teacher-force the same probe over it (one batched forward: the probe
tokens' own KV is computed fresh, as on a real decode worker) and compare the 32 next-token
distributions with the reference's:

  quality_loss      mean KL(p_ref || p_hat) in nats over the 32 positions and the prompts
  kl_first_token    the same at the prompt's last position only (the first output token)
  greedy_agreement  position-wise: fraction of the 32 positions whose argmax equals the
                    reference's argmax, both fed the reference continuation
  greedy_prefix     tokens before the first disagreement / 32: how much of the reference
                    continuation free-running greedy decoding from the reconstructed cache
                    reproduces exactly (it makes the same choices until it first differs)

plus the cheap proxies the online path can afford (relative L2 error and mean cosine of K
and V, means over layers and prompts, from `kv_transport.codecs.quality`) and the byte
counts that give the compression ratio.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from control_plane.profiler.calibration import CalibrationPrompt
from kv_transport.codecs import Profile, decode_layer, encode_layer, kv_quality

# One layer's canonical K and V: [tokens, kv_heads, head_dim].
LayerKV = tuple[torch.Tensor, torch.Tensor]
WIRE_DTYPE = torch.bfloat16


class ModelMissingError(RuntimeError):
    pass


@dataclass(frozen=True)
class QualityResult:
    quality_loss: float
    kl_first_token: float
    greedy_agreement: float
    greedy_prefix: float
    rel_l2_k: float
    rel_l2_v: float
    cosine_k: float
    cosine_v: float
    raw_bytes: int
    encoded_bytes: int

    @property
    def ratio(self) -> float:
        """Original bytes / encoded bytes (blob headers included)."""
        return self.raw_bytes / self.encoded_bytes if self.encoded_bytes else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class PromptReference:
    prompt_id: str
    prompt_tokens: int
    kv: list[LayerKV]  # the prompt minus its last token, bf16, canonical
    probe_ids: torch.Tensor  # [1, generated]: last prompt token + all but the last generated token
    reference_logprobs: torch.Tensor  # [generated, vocab] float32
    reference_argmax: torch.Tensor  # [generated]


def load_model(model_path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) in float32 on CPU. Raises ModelMissingError if there is no model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(model_path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelMissingError(
            f"no model at {path} (config.json missing): run `tandem model prepare` first"
        )
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, tokenizer


def _to_cache_layout(t: torch.Tensor) -> torch.Tensor:
    # canonical [tokens, heads, dim] -> transformers' [batch=1, heads, tokens, dim]
    return t.permute(1, 0, 2).unsqueeze(0).float().contiguous()


def _from_cache_layout(t: torch.Tensor) -> torch.Tensor:
    return t[0].permute(1, 0, 2).to(WIRE_DTYPE).contiguous()


class ModelQualityProbe:
    """The reference computations of a few calibration prompts, and the comparison of a
    profile's reconstructed KV against them."""

    def __init__(self, model: Any, tokenizer: Any, prompts: Sequence[CalibrationPrompt], generated_tokens: int = 32):
        if generated_tokens < 1:
            raise ValueError("generated_tokens must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.generated_tokens = generated_tokens
        self.references = [self._reference(prompt) for prompt in prompts]

    @classmethod
    def from_path(cls, model_path: str | Path, prompts: Sequence[CalibrationPrompt], generated_tokens: int = 32) -> ModelQualityProbe:
        model, tokenizer = load_model(model_path)
        return cls(model, tokenizer, prompts, generated_tokens)

    # -- shapes --

    @property
    def num_layers(self) -> int:
        return len(self.references[0].kv)

    @property
    def longest(self) -> PromptReference:
        return max(self.references, key=lambda r: r.prompt_tokens)

    def speed_kv(self, tokens: int) -> list[LayerKV]:
        """Real KV of all layers for the first `tokens` tokens of the longest prompt (fewer if
        it is shorter: tiling would make the lossless stage look better than it is)."""
        return [(k[:tokens].contiguous(), v[:tokens].contiguous()) for k, v in self.longest.kv]

    # -- model passes --

    def _cache(self, kv: Sequence[LayerKV]) -> Any:
        from transformers import DynamicCache

        data = [(_to_cache_layout(k), _to_cache_layout(v)) for k, v in kv]
        return DynamicCache(ddp_cache_data=data, config=self.model.config)

    def _probe_logprobs(self, kv: Sequence[LayerKV], probe_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(input_ids=probe_ids, past_key_values=self._cache(kv), use_cache=True).logits
        return torch.log_softmax(logits[0].float(), dim=-1)

    def _reference(self, prompt: CalibrationPrompt) -> PromptReference:
        encoded = self.tokenizer.apply_chat_template(list(prompt.messages), add_generation_prompt=True, return_dict=True)
        ids = torch.tensor([encoded["input_ids"]], dtype=torch.long)
        if ids.shape[1] < 2:
            raise ValueError(f"calibration prompt {prompt.id} is too short")
        with torch.inference_mode():
            cache = self.model(ids[:, :-1], use_cache=True).past_key_values
            kv = [(_from_cache_layout(layer.keys), _from_cache_layout(layer.values)) for layer in cache.layers]
            # Greedy continuation from the bf16 (wire) cache, one token at a time.
            generation_cache = self._cache(kv)
            token = ids[:, -1:]
            generated = []
            for _ in range(self.generated_tokens):
                logits = self.model(input_ids=token, past_key_values=generation_cache, use_cache=True).logits
                token = logits[:, -1:].argmax(-1)
                generated.append(token)
        probe_ids = torch.cat([ids[:, -1:], *generated[:-1]], dim=1)
        # The reference distributions come from the same batched pass a profile gets, so
        # the identity profile reproduces them bit for bit.
        reference = self._probe_logprobs(kv, probe_ids)
        return PromptReference(prompt.id, ids.shape[1], kv, probe_ids, reference, reference.argmax(-1))

    # -- evaluation --

    def evaluate(self, profile: Profile) -> QualityResult:
        kls: list[float] = []
        first_kls: list[float] = []
        agreements: list[float] = []
        prefixes: list[float] = []
        proxies: list[tuple[float, float, float, float]] = []
        raw_bytes = encoded_bytes = 0
        for reference in self.references:
            decoded: list[LayerKV] = []
            for layer_index, (k, v) in enumerate(reference.kv):
                blob = encode_layer(profile, layer_index, k, v)
                k_hat, v_hat = decode_layer(blob, torch.float32)
                raw_bytes += k.numel() * k.element_size() + v.numel() * v.element_size()
                encoded_bytes += len(blob)
                q = kv_quality(k, v, k_hat, v_hat)
                proxies.append((q.k_rel_l2, q.v_rel_l2, q.k_cosine, q.v_cosine))
                decoded.append((k_hat, v_hat))
            logprobs = self._probe_logprobs(decoded, reference.probe_ids)
            ref = reference.reference_logprobs
            kl = (ref.exp() * (ref - logprobs)).sum(-1).clamp_min(0.0)
            kls.append(float(kl.mean()))
            first_kls.append(float(kl[0]))
            agree = logprobs.argmax(-1) == reference.reference_argmax
            agreements.append(float(agree.float().mean()))
            disagreements = (~agree).nonzero()
            prefix = int(disagreements[0, 0]) if disagreements.numel() else len(agree)
            prefixes.append(prefix / len(agree))
        columns = list(zip(*proxies, strict=True))
        return QualityResult(
            quality_loss=statistics.fmean(kls),
            kl_first_token=statistics.fmean(first_kls),
            greedy_agreement=statistics.fmean(agreements),
            greedy_prefix=statistics.fmean(prefixes),
            rel_l2_k=statistics.fmean(columns[0]),
            rel_l2_v=statistics.fmean(columns[1]),
            cosine_k=statistics.fmean(columns[2]),
            cosine_v=statistics.fmean(columns[3]),
            raw_bytes=raw_bytes,
            encoded_bytes=encoded_bytes,
        )
