"""Why 8-bit KV keeps greedy output identical in float32 and not in bf16: exact logit ties.

For each calibration prompt, in one compute dtype (bf16 as the engines run by default, and
float32): prefill the prompt minus its last token, keep the KV in bf16 (the wire's bytes),
decode 32 greedy tokens from it, then again from the same KV after a perturbation:

  * 8-bit profiles of the strategy space (encode, decode);
  * a control far smaller than any codec: the last mantissa bit of 1% of the bf16 values
    flipped (+-1 ulp).

Reported per (dtype, perturbation): how many prompts keep all 32 tokens, the mean number of
tokens kept, the relative L2 error of K and V, and per prompt the smallest top-1 - top-2
logit gap along the reference answer (0 = an exact tie, decided by rounding).

Transformers on CPU, no Ray, no engines. Writes bench/results/greedy_ties.{json,csv,png}.

    python -m bench.greedy_ties [--tokens 32]
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import typer
from rich.console import Console

from bench.common import RESULTS, markdown_table, write_results

console = Console()
PROFILES = ["int8-kivi", "int8-token-g32", "int8-token-g32-recent32"]
CONTROL = "last bit of 1% flipped"
LAST_BIT_FRACTION = 0.01
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _flip_last_bits(x: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """The last mantissa bit of a random `fraction` of a bf16 tensor's values flipped: a
    change of one ulp that never touches sign or exponent (so never a NaN or inf)."""
    generator = torch.Generator().manual_seed(seed)
    bits = x.contiguous().view(torch.int16).clone()
    chosen = torch.rand(bits.shape, generator=generator) < fraction
    bits[chosen] ^= 1
    return bits.view(torch.bfloat16)


def _rel_l2(exact: torch.Tensor, approx: torch.Tensor) -> float:
    exact = exact.float()
    return float((approx.float() - exact).norm() / exact.norm())


def _greedy(model: Any, dtype: torch.dtype, kv: list, last: torch.Tensor, tokens: int) -> tuple[list[int], float]:
    """`tokens` greedy tokens after `last` from a bf16 canonical KV, and the smallest
    top-1 - top-2 logit gap on the way."""
    from transformers import DynamicCache

    from control_plane.profiler.quality import _to_cache_layout

    cache = DynamicCache(
        ddp_cache_data=[(_to_cache_layout(k).to(dtype), _to_cache_layout(v).to(dtype)) for k, v in kv],
        config=model.config,
    )
    token, answer, gaps = last, [], []
    with torch.inference_mode():
        for _ in range(tokens):
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[0, -1].float()
            top = logits.topk(2).values
            gaps.append(float(top[0] - top[1]))
            token = logits.argmax().view(1, 1)
            answer.append(int(token))
    return answer, min(gaps)


def run(tokens: int = 32) -> list[dict[str, Any]]:
    from control_plane.model import resolve_model
    from control_plane.profiler.calibration import load_prompts
    from control_plane.profiler.quality import _from_cache_layout, load_model
    from kv_transport.codecs import decode_layer, encode_layer, get_profile

    torch.set_num_threads(1)
    prompts = load_prompts()

    def perturbations() -> dict[str, Any]:
        def codec(name: str):
            profile = get_profile(name)
            return lambda index, k, v: decode_layer(encode_layer(profile, index, k, v), torch.float32)

        out = {name: codec(name) for name in PROFILES}
        out[CONTROL] = lambda index, k, v: (_flip_last_bits(k, LAST_BIT_FRACTION, index),
                                            _flip_last_bits(v, LAST_BIT_FRACTION, 10_000 + index))
        return out

    rows: list[dict[str, Any]] = []
    for dtype_name, dtype in DTYPES.items():
        # A fresh model per dtype: casting one back and forth would leave its float32
        # buffers (RoPE frequencies) rounded to bf16.
        model, tokenizer = load_model(resolve_model(None))
        model = model.to(dtype)

        kept: dict[str, list[int]] = {name: [] for name in perturbations()}
        errors: dict[str, list[tuple[float, float]]] = {name: [] for name in kept}
        gaps = []
        for prompt in prompts:
            encoded = tokenizer.apply_chat_template(list(prompt.messages), add_generation_prompt=True, return_dict=True)
            ids = torch.tensor([encoded["input_ids"]], dtype=torch.long)
            with torch.inference_mode():
                cache = model(ids[:, :-1], use_cache=True).past_key_values
            kv = [(_from_cache_layout(layer.keys), _from_cache_layout(layer.values)) for layer in cache.layers]
            reference, gap = _greedy(model, dtype, kv, ids[:, -1:], tokens)
            gaps.append(gap)
            for name, perturb in perturbations().items():
                changed = [perturb(index, k, v) for index, (k, v) in enumerate(kv)]
                errors[name].append((
                    statistics.fmean(_rel_l2(k, k2) for (k, _), (k2, _) in zip(kv, changed, strict=True)),
                    statistics.fmean(_rel_l2(v, v2) for (_, v), (_, v2) in zip(kv, changed, strict=True)),
                ))
                answer, _ = _greedy(model, dtype, changed, ids[:, -1:], tokens)
                kept[name].append(next((i for i, (a, b) in enumerate(zip(reference, answer, strict=True)) if a != b), tokens))
            console.print(f"{dtype_name} {prompt.id}: smallest gap {gap:.3f}, tokens kept "
                          + ", ".join(f"{name} {values[-1]}" for name, values in kept.items()))
        for name, values in kept.items():
            rows.append({
                "compute_dtype": dtype_name,
                "perturbation": name,
                "prompts": len(values),
                "identical_prompts": sum(v == tokens for v in values),
                "mean_tokens_kept": statistics.fmean(values),
                "rel_l2_k": statistics.fmean(e[0] for e in errors[name]),
                "rel_l2_v": statistics.fmean(e[1] for e in errors[name]),
                "prompts_with_exact_tie": sum(g == 0.0 for g in gaps),
                "median_smallest_gap": statistics.median(gaps),
            })
    return rows


def _plot(rows: list[dict[str, Any]], tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(row["perturbation"] for row in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for offset, dtype_name in ((-width / 2, "bfloat16"), (width / 2, "float32")):
        values = [next(r["identical_prompts"] for r in rows if r["compute_dtype"] == dtype_name and r["perturbation"] == n)
                  for n in names]
        ax.bar([i + offset for i in range(len(names))], values, width, label=f"{dtype_name} compute")
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_ylabel(f"prompts with all {tokens} greedy tokens identical")
    ax.set_title("Greedy identity after a KV perturbation (SmolLM2-135M, 10 calibration prompts)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "greedy_ties.png", dpi=120)


def main(tokens: int = typer.Option(32, help="Greedy tokens compared per prompt.")) -> None:
    rows = run(tokens)
    write_results("greedy_ties", rows, {"tokens": tokens, "profiles": PROFILES, "control": CONTROL,
                                        "kv_dtype": "bfloat16"})
    _plot(rows, tokens)
    console.print(markdown_table(rows, ["compute_dtype", "perturbation", "identical_prompts", "mean_tokens_kept",
                                        "rel_l2_k", "rel_l2_v", "prompts_with_exact_tie"]))


if __name__ == "__main__":
    typer.run(main)
