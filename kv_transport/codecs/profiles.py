"""Codec profiles: one transform -> quantize -> lossless pipeline and its parameters.

A profile is data, not code: a frozen pydantic model with a name and a version, serialisable
to a plain dict / JSON, so that the offline profiler can search the space, store its pick,
and the online controller can switch between named profiles. Encoded blobs carry the stage
parameters they were made with (see `container`), so decode never looks a profile up.

    transform  none | hadamard (randomized Hadamard rotation over head_dim, seeded per layer/head)
    quantize   per tensor (K, V): none | fp8 e4m3 with per-group scales | asymmetric min-max
               to k bits with a grouping axis and group size; optional overrides for the
               first layers and for the most recent tokens
    lossless   none | lz4 | zstd(level), optionally after a byte-plane split
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kv_transport.codecs.errors import CodecError

MINMAX_BITS = (8, 6, 4, 3, 2)
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Half an ulp of e4m3 relative to the value (3 mantissa bits), and half the subnormal step
# (2^-9) in scaled units: the two terms of fp8's rounding error.
FP8_REL_ERROR = 2.0**-4
FP8_SUBNORMAL_HALF_STEP = 2.0**-10

Tensor = Literal["k", "v"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TransformSpec(_Frozen):
    kind: Literal["none", "hadamard"] = "none"
    # Base seed of the random signs; the signs of (layer, head) are derived from it, so the
    # decoder re-derives them from the header alone.
    seed: int = Field(0, ge=0, lt=2**63)
    # Which tensors to rotate. On real KV, rotation helps values and per-token keys, but
    # slightly hurts keys quantised per channel (KIVI), whose outliers the axis already
    # isolates: "v" is the pairing for KIVI axes.
    tensors: Literal["kv", "k", "v"] = "kv"

    def applies(self, tensor: str, quant: QuantSpec) -> bool:
        """Whether a part of `tensor` quantised with `quant` is rotated (raw parts never are)."""
        return self.kind == "hadamard" and tensor in self.tensors and quant.method != "none"


class QuantSpec(_Frozen):
    """How one tensor (K or V) of one token range is quantised."""

    method: Literal["none", "fp8", "minmax"] = "none"
    # none: 16 (the source dtype's bytes, bit-exact); fp8: 8; minmax: one of MINMAX_BITS.
    bits: int = 16
    # Groups run along `axis`: "channel" groups consecutive tokens of one (head, channel),
    # as KIVI does for keys (their outliers live in fixed channels); "token" groups
    # consecutive channels of one (token, head) vector, as KIVI does for values.
    axis: Literal["channel", "token"] = "token"
    group_size: int = 64
    # dtype of the per-group scale/min. The encoder silently upgrades a part to float32
    # when its values would overflow float16, and records what it used in the blob.
    param_dtype: Literal["float16", "float32"] = "float16"

    @model_validator(mode="before")
    @classmethod
    def _default_bits(cls, data: Any) -> Any:
        if isinstance(data, dict) and "bits" not in data:
            method = data.get("method", "none")
            if method in ("none", "fp8"):
                data = {**data, "bits": 16 if method == "none" else 8}
        return data

    @model_validator(mode="after")
    def _check(self) -> QuantSpec:
        allowed = {"none": (16,), "fp8": (8,), "minmax": MINMAX_BITS}[self.method]
        if self.bits not in allowed:
            raise ValueError(f"{self.method} quantisation takes bits in {allowed}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size}")
        return self

    @classmethod
    def none(cls) -> QuantSpec:
        return cls()

    @classmethod
    def fp8(cls, axis: str = "token", group_size: int = 64) -> QuantSpec:
        return cls(method="fp8", axis=axis, group_size=group_size)

    @classmethod
    def minmax(cls, bits: int, axis: str = "token", group_size: int = 64) -> QuantSpec:
        return cls(method="minmax", bits=bits, axis=axis, group_size=group_size)

    @property
    def is_lossless(self) -> bool:
        return self.method == "none"

    @property
    def levels(self) -> int:
        """Largest code of min-max quantisation (2^bits - 1)."""
        return (1 << self.bits) - 1

    def short(self) -> str:
        if self.method == "none":
            return "raw"
        kind = "fp8" if self.method == "fp8" else f"int{self.bits}"
        return f"{kind}{self.axis[0]}{self.group_size}"

    def stated_bound(self) -> dict[str, Any]:
        """The per-element error this spec promises, in the domain it quantises."""
        if self.method == "none":
            return {"metric": "exact", "value": 0.0}
        if self.method == "fp8":
            return {
                "metric": "abs_error_over_abs_value",
                "value": FP8_REL_ERROR,
                "plus": "2^-10 * group_amax / 448 (subnormals)",
            }
        return {"metric": "abs_error_over_group_range", "value": 0.5 / self.levels}


RAW = QuantSpec()


class KVQuant(_Frozen):
    key: QuantSpec = RAW
    value: QuantSpec = RAW

    def spec(self, tensor: Tensor) -> QuantSpec:
        return self.key if tensor == "k" else self.value

    @property
    def is_lossless(self) -> bool:
        return self.key.is_lossless and self.value.is_lossless


class QuantizeSpec(_Frozen):
    main: KVQuant = KVQuant()
    # Layers [0, first_layers) use first_layers_quant: early layers are often the most
    # sensitive to KV error.
    first_layers: int = Field(0, ge=0, le=4096)
    first_layers_quant: KVQuant = KVQuant()
    # The last recent_tokens tokens of a request use recent_quant (KIVI keeps a full-precision
    # window of recent tokens: they get the most attention from the next tokens).
    recent_tokens: int = Field(0, ge=0, le=1 << 20)
    recent_quant: KVQuant = KVQuant()

    def specs(self) -> list[tuple[Tensor, QuantSpec]]:
        """Every (tensor, spec) this pipeline can use in some layer or token range."""
        used = [self.main] + ([self.first_layers_quant] if self.first_layers else [])
        used += [self.recent_quant] if self.recent_tokens else []
        return [(tensor, kv.spec(tensor)) for kv in used for tensor in ("k", "v")]

    def for_layer(self, layer_index: int) -> KVQuant:
        return self.first_layers_quant if layer_index < self.first_layers else self.main

    @property
    def is_lossless(self) -> bool:
        return (
            self.main.is_lossless
            and (self.first_layers == 0 or self.first_layers_quant.is_lossless)
            and (self.recent_tokens == 0 or self.recent_quant.is_lossless)
        )


class LosslessSpec(_Frozen):
    codec: Literal["none", "lz4", "zstd"] = "none"
    # zstd: 1..22 (negative "fast" levels -5..-1 too); lz4 frame: 0..16 (3+ is HC).
    level: int = 0
    # Split multi-byte values into byte planes before compressing: the high byte of a bf16
    # (sign, exponent) repeats a lot, the low mantissa byte is noise; apart they compress
    # better. Applies to every section with elements wider than one byte.
    byteplane: bool = False

    @model_validator(mode="after")
    def _check(self) -> LosslessSpec:
        bounds = {"none": (0, 0), "lz4": (0, 16), "zstd": (-5, 22)}[self.codec]
        if not bounds[0] <= self.level <= bounds[1]:
            raise ValueError(f"{self.codec} level must be in {bounds}, got {self.level}")
        if self.codec == "none" and self.byteplane:
            raise ValueError("byteplane only helps before a compressor; set codec too")
        return self

    def short(self) -> str:
        if self.codec == "none":
            return "raw"
        return f"{self.codec}{self.level}" + ("-bp" if self.byteplane else "")


class Profile(_Frozen):
    """A named, versioned codec pipeline. Bump `version` whenever the parameters change."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._:+-]{0,127}$")
    version: int = Field(1, ge=1)
    description: str = ""
    transform: TransformSpec = TransformSpec()
    quantize: QuantizeSpec = QuantizeSpec()
    lossless: LosslessSpec = LosslessSpec()

    @model_validator(mode="after")
    def _check(self) -> Profile:
        if self.transform.kind != "none" and not any(
            self.transform.applies(tensor, spec) for tensor, spec in self.quantize.specs()
        ):
            # A rotation is only worth its cost before quantisation; raw parts are never
            # rotated, so such a profile would be a slower alias of its transform-free twin.
            raise ValueError("the transform has no quantised tensor to rotate")
        return self

    # -- serialisation --

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        try:
            return cls.model_validate(dict(data))
        except (ValidationError, TypeError) as exc:
            raise CodecError(f"invalid codec profile: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Profile:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CodecError(f"invalid codec profile JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CodecError("a codec profile must be a JSON object")
        return cls.from_dict(data)

    @property
    def params_key(self) -> str:
        """The pipeline's parameters without name/version: equal keys encode identically."""
        return json.dumps(self.model_dump(mode="json", exclude={"name", "version", "description"}), sort_keys=True)

    # -- properties the pipeline and the controller ask for --

    @property
    def is_lossless(self) -> bool:
        return self.quantize.is_lossless

    def supports(self, head_dim: int) -> bool:
        """Whether tensors with this head_dim can be encoded (the FWHT needs a power of two)."""
        return self.transform.kind == "none" or (head_dim > 0 and head_dim & (head_dim - 1) == 0)

    def stated_bound(self) -> dict[str, Any]:
        """The error bound this profile promises, per quantised part.

        Element-wise bounds hold in the quantised domain. Under the Hadamard transform that
        domain is rotated: the rotation is orthonormal, so the promise carries over as a bound
        on the L2 error of each (token, head) vector. Decoding to bf16/fp16 adds half an ulp
        of the output dtype on top; `quality.bound_ratio` checks all of it.
        """
        q = self.quantize
        parts: dict[str, Any] = {
            "key": q.main.key.stated_bound(),
            "value": q.main.value.stated_bound(),
        }
        if q.first_layers:
            parts["first_layers"] = {
                "layers": q.first_layers,
                "key": q.first_layers_quant.key.stated_bound(),
                "value": q.first_layers_quant.value.stated_bound(),
            }
        if q.recent_tokens:
            parts["recent_tokens"] = {
                "tokens": q.recent_tokens,
                "key": q.recent_quant.key.stated_bound(),
                "value": q.recent_quant.value.stated_bound(),
            }
        domain = (
            f"rotated {self.transform.tensors} (per-vector L2 in the original domain)"
            if self.transform.kind != "none"
            else "original"
        )
        return {"lossless": self.is_lossless, "domain": domain, **parts}

    def nominal_bits_per_value(self, tensor: Tensor = "k", source_bits: int = 16) -> float:
        """Bits per element of the main precision, group parameters included, before lossless."""
        spec = self.quantize.main.spec(tensor)
        if spec.method == "none":
            return float(source_bits)
        params = 1 if spec.method == "fp8" else 2
        param_bits = 16 if spec.param_dtype == "float16" else 32
        return spec.bits + params * param_bits / spec.group_size

    def auto_name(self) -> str:
        """A name derived from the parameters (used for profiles built from a search)."""
        q = self.quantize
        parts = [f"h{self.transform.tensors}" if self.transform.kind == "hadamard" else "id"]
        parts.append(f"k{q.main.key.short()}")
        parts.append(f"v{q.main.value.short()}")
        if q.first_layers:
            parts.append(f"f{q.first_layers}:{q.first_layers_quant.key.short()}+{q.first_layers_quant.value.short()}")
        if q.recent_tokens:
            parts.append(f"r{q.recent_tokens}:{q.recent_quant.key.short()}+{q.recent_quant.value.short()}")
        parts.append(self.lossless.short())
        return "-".join(parts).lower()


# -- built-in profiles --------------------------------------------------------------------

def _kivi(bits: int, group_size: int) -> KVQuant:
    return KVQuant(
        key=QuantSpec.minmax(bits, axis="channel", group_size=group_size),
        value=QuantSpec.minmax(bits, axis="token", group_size=group_size),
    )


_INT8_TOKEN = KVQuant(key=QuantSpec.minmax(8, "token", 64), value=QuantSpec.minmax(8, "token", 64))

_BUILTINS = [
    Profile(name="identity", description="raw bytes of the source dtype"),
    Profile(name="lz4", description="lz4 frame over the raw bytes", lossless=LosslessSpec(codec="lz4")),
    Profile(
        name="lz4-byteplane",
        description="lz4 over byte planes of the raw values",
        lossless=LosslessSpec(codec="lz4", byteplane=True),
    ),
    Profile(name="zstd3", description="zstd level 3 over the raw bytes", lossless=LosslessSpec(codec="zstd", level=3)),
    Profile(
        name="zstd3-byteplane",
        description="zstd level 3 over byte planes of the raw values",
        lossless=LosslessSpec(codec="zstd", level=3, byteplane=True),
    ),
    Profile(
        name="fp8",
        description="fp8 e4m3 with a scale per 64 values; keys per channel, values per token",
        quantize=QuantizeSpec(main=KVQuant(key=QuantSpec.fp8("channel", 64), value=QuantSpec.fp8("token", 64))),
    ),
    Profile(
        name="int8-kivi",
        description="8-bit min-max, KIVI axes (keys per channel, values per token), groups of 64",
        quantize=QuantizeSpec(main=_kivi(8, 64)),
    ),
    Profile(
        name="int8-token-g32",
        description="8-bit min-max per token for keys and values, groups of 32: the most "
        "accurate plain 8-bit profile",
        quantize=QuantizeSpec(
            main=KVQuant(key=QuantSpec.minmax(8, "token", 32), value=QuantSpec.minmax(8, "token", 32))
        ),
    ),
    Profile(
        name="int8-token-g32-recent32",
        description="as int8-token-g32, the last 32 tokens raw (KIVI's full-precision window): "
        "robust to the near-ties where plain int8 can flip a greedy token of a small model",
        quantize=QuantizeSpec(
            main=KVQuant(key=QuantSpec.minmax(8, "token", 32), value=QuantSpec.minmax(8, "token", 32)),
            recent_tokens=32,
        ),
    ),
    Profile(name="int6-kivi-g64", description="6-bit min-max, KIVI axes, groups of 64", quantize=QuantizeSpec(main=_kivi(6, 64))),
    Profile(name="int4-kivi-g64", description="4-bit min-max, KIVI axes, groups of 64", quantize=QuantizeSpec(main=_kivi(4, 64))),
    Profile(
        name="int4-hadamard-g64",
        description="Hadamard rotation, then 4-bit min-max per token (both K and V), groups of 64",
        transform=TransformSpec(kind="hadamard"),
        quantize=QuantizeSpec(
            main=KVQuant(key=QuantSpec.minmax(4, "token", 64), value=QuantSpec.minmax(4, "token", 64))
        ),
    ),
    Profile(
        name="int4-kivi-g64-hadamard-v",
        description="4-bit min-max, KIVI axes, groups of 64, values rotated first",
        transform=TransformSpec(kind="hadamard", tensors="v"),
        quantize=QuantizeSpec(main=_kivi(4, 64)),
    ),
    Profile(name="int3-kivi-g32", description="3-bit min-max, KIVI axes, groups of 32", quantize=QuantizeSpec(main=_kivi(3, 32))),
    Profile(
        name="int2-kivi-g32-recent128",
        description="2-bit min-max, KIVI axes, groups of 32; the last 128 tokens stay raw",
        quantize=QuantizeSpec(main=_kivi(2, 32), recent_tokens=128),
    ),
    Profile(
        name="int2-kivi-g32-recent128-first2",
        description="as int2-kivi-g32-recent128, and the first 2 layers in 8 bits per token",
        quantize=QuantizeSpec(
            main=_kivi(2, 32), recent_tokens=128, first_layers=2, first_layers_quant=_INT8_TOKEN
        ),
    ),
]

_REGISTRY: dict[str, Profile] = {profile.name: profile for profile in _BUILTINS}
BUILTIN_PROFILE_NAMES = tuple(_REGISTRY)


def get_profile(name: str) -> Profile:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CodecError(f"unknown codec profile {name!r}; known: {sorted(_REGISTRY)}") from None


def list_profiles() -> list[Profile]:
    return list(_REGISTRY.values())


def register_profile(profile: Profile, *, replace: bool = False) -> Profile:
    """Add a profile (e.g. the profiler's pick) under its name.

    Re-registering the same name needs a higher version or `replace=True`: a name+version
    pair always means the same parameters, since blobs and telemetry record only that pair.
    """
    existing = _REGISTRY.get(profile.name)
    if existing is not None and not replace:
        if existing.params_key == profile.params_key and existing.version == profile.version:
            return existing
        if profile.version <= existing.version:
            raise CodecError(
                f"profile {profile.name!r} v{existing.version} exists with other parameters; "
                "bump the version or pass replace=True"
            )
    _REGISTRY[profile.name] = profile
    return profile


# -- the search space ---------------------------------------------------------------------

# Each dimension is categorical (what optuna's suggest_categorical takes). The names of
# the quantisers: raw (source dtype), fp8, int8/6/4/3/2 (min-max).
QUANTIZERS = ("raw", "fp8", "int8", "int6", "int4", "int3", "int2")
SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "transform": ("none", "hadamard", "hadamard-k", "hadamard-v"),
    "key_quant": QUANTIZERS,
    "value_quant": QUANTIZERS,
    "key_axis": ("channel", "token"),
    "value_axis": ("token", "channel"),
    "group_size": (32, 64, 128),
    "first_layers": (0, 1, 2, 4),
    "first_layers_quant": ("raw", "int8"),
    "recent_tokens": (0, 32, 128),
    "recent_quant": ("raw", "int8"),
    "lossless": ("none", "lz4", "zstd1", "zstd3", "zstd9"),
    "byteplane": (False, True),
}


def _quant_from_name(name: str, axis: str, group_size: int) -> QuantSpec:
    if name == "raw":
        return RAW
    if name == "fp8":
        return QuantSpec.fp8(axis, group_size)
    if name.startswith("int") and name[3:].isdigit():
        return QuantSpec.minmax(int(name[3:]), axis, group_size)
    raise CodecError(f"unknown quantiser {name!r}; expected one of {QUANTIZERS}")


def _transform_from_name(name: str) -> TransformSpec:
    kind, _, tensors = name.partition("-")
    if kind not in ("none", "hadamard") or tensors not in ("", "k", "v"):
        raise CodecError(f"unknown transform {name!r}")
    return TransformSpec(kind=kind, tensors=tensors or "kv")


def profile_from_choices(choices: Mapping[str, Any], name: str | None = None, version: int = 1) -> Profile:
    """Build the profile for one point of SEARCH_SPACE (e.g. an optuna trial's params).

    Raises CodecError for a combination that is not a valid profile (a transform with
    nothing quantised, byteplane without a compressor).
    """
    missing = set(SEARCH_SPACE) - set(choices)
    if missing:
        raise CodecError(f"missing search dimensions: {sorted(missing)}")
    group = int(choices["group_size"])
    lossless_name = str(choices["lossless"])
    if lossless_name == "none":
        lossless = {"codec": "none"}
    elif lossless_name == "lz4":
        lossless = {"codec": "lz4", "level": 0}
    elif lossless_name.startswith("zstd"):
        lossless = {"codec": "zstd", "level": int(lossless_name[4:])}
    else:
        raise CodecError(f"unknown lossless stage {lossless_name!r}")
    # Overrides are 8-bit per token (the precise, axis-agnostic choice) or raw.
    def override(quant: str) -> KVQuant:
        spec = _quant_from_name(quant, "token", 64)
        return KVQuant(key=spec, value=spec)

    first_layers = int(choices["first_layers"])
    recent_tokens = int(choices["recent_tokens"])
    try:
        profile = Profile(
            name=name or "search",
            version=version,
            transform=_transform_from_name(str(choices["transform"])),
            quantize=QuantizeSpec(
                main=KVQuant(
                    key=_quant_from_name(choices["key_quant"], choices["key_axis"], group),
                    value=_quant_from_name(choices["value_quant"], choices["value_axis"], group),
                ),
                first_layers=first_layers,
                first_layers_quant=override(choices["first_layers_quant"]) if first_layers else KVQuant(),
                recent_tokens=recent_tokens,
                recent_quant=override(choices["recent_quant"]) if recent_tokens else KVQuant(),
            ),
            lossless=LosslessSpec(**lossless, byteplane=bool(choices["byteplane"])),
        )
    except ValidationError as exc:
        raise CodecError(f"invalid profile choices: {exc.errors()[0]['msg']}") from None
    return profile if name else profile.model_copy(update={"name": profile.auto_name()})


def search_space_size() -> int:
    """Points in the raw grid (before dropping invalid and duplicate combinations)."""
    return math.prod(len(v) for v in SEARCH_SPACE.values())


def _is_canonical(choices: Mapping[str, Any], space: Mapping[str, tuple[Any, ...]]) -> bool:
    """False when a dimension without effect is not at its first value (a duplicate point)."""
    irrelevant = []
    if choices["key_quant"] == "raw":
        irrelevant.append("key_axis")
    if choices["value_quant"] == "raw":
        irrelevant.append("value_axis")
    if choices["key_quant"] == "raw" and choices["value_quant"] == "raw":
        irrelevant.append("group_size")
    if not choices["first_layers"]:
        irrelevant.append("first_layers_quant")
    if not choices["recent_tokens"]:
        irrelevant.append("recent_quant")
    return all(choices[name] == space[name][0] for name in irrelevant)


def iter_profiles(space: Mapping[str, tuple[Any, ...]] = SEARCH_SPACE) -> Iterator[Profile]:
    """Every distinct valid profile of the grid, lazily, named by `Profile.auto_name`.

    Points that differ only in a parameter without effect (the axis or group size of a raw
    tensor, an override quantiser for zero layers/tokens) are yielded once; invalid ones
    (a transform with nothing quantised, byteplane without a compressor) not at all.
    """
    keys = list(space)
    for values in itertools.product(*(space[k] for k in keys)):
        choices = dict(zip(keys, values, strict=True))
        if not _is_canonical(choices, space):
            continue
        try:
            yield profile_from_choices(choices)
        except CodecError:
            continue
