"""Request bodies are bounded before they are parsed: the JSON-value count that decides it,
the request models' hard caps, and the memory the worst body the limits allow costs the
ingress's validation path (measured as RSS growth in a fresh process)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from control_plane import settings
from control_plane.settings import AdmissionSettings, TandemSettings
from routing import protocol
from routing.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    TooManyValues,
    forwarded_body,
    json_values_bound,
    parse_body,
)

ROOT = Path(__file__).resolve().parents[2]


# ---- counting JSON values without parsing -------------------------------------------------------


def _values(node: Any) -> tuple[int, int]:
    """(JSON values in the document, empty containers)."""
    if isinstance(node, dict):
        counts = [_values(v) for v in node.values()]
    elif isinstance(node, list):
        counts = [_values(v) for v in node]
    else:
        return 1, 0
    return 1 + sum(c[0] for c in counts), int(not counts) + sum(c[1] for c in counts)


_NASTY = ['"', "\\", ",", "[", "{", "}", "]", ":", "\\\\", '\\"', "é", "\u2028", "\n", "x"]


def _random_string(rng: random.Random) -> str:
    return "".join(rng.choice(_NASTY) for _ in range(rng.randrange(0, 8)))


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 6 else 4)
    if kind == 0:
        return rng.randrange(-1000, 1000)
    if kind == 1:
        return _random_string(rng)
    if kind == 2:
        return rng.choice([True, False, None, 1.5])
    if kind == 3:
        return rng.random()
    if kind in (4, 5):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {_random_string(rng): _random_json(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


@pytest.mark.parametrize("chunk", [1 << 20, 7], ids=["one-chunk", "7-byte-chunks"])
def test_the_bound_is_exact_but_for_empty_containers(monkeypatch, chunk):
    """Separators inside strings (escaped quotes and backslashes included) never count, and
    a string crossing a chunk boundary stays a string."""
    monkeypatch.setattr(protocol, "_SCAN_CHUNK", chunk)
    rng = random.Random(7)
    for _ in range(400):
        document = _random_json(rng)
        raw = json.dumps(document, ensure_ascii=rng.random() < 0.5).encode()
        values, empty = _values(document)
        # A limit under the raw separator count takes the exact path.
        bound = json_values_bound(raw, limit=values + empty)
        assert values <= bound <= values + empty, (raw, values, empty, bound)


def test_the_fast_path_overcounts_only_separators_inside_strings():
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "a, b, [c], {d}"}]}).encode()
    # Under the limit, the raw count: 1 + 5 commas + 3 braces + 2 brackets, strings included.
    assert json_values_bound(raw, limit=10**6) == 11
    # Past it, the exact count: the document holds 6 values.
    assert json_values_bound(raw, limit=6) == 6
    assert json_values_bound(raw, limit=0) > 0  # past the limit either way


def test_too_many_values_are_refused_before_the_parser_sees_them(monkeypatch):
    seen = []
    monkeypatch.setattr(ChatCompletionRequest, "model_validate_json", classmethod(lambda cls, raw: seen.append(raw)))
    raw = json.dumps({"model": "m", "messages": [{"role": "user"}] * 3000}).encode()
    with pytest.raises(TooManyValues, match="more than 4096 JSON values"):
        parse_body(ChatCompletionRequest, raw, 4096)
    assert not seen
    # Separators in text are not values: a long prompt full of commas is fine.
    text = json.dumps({"model": "m", "messages": [{"role": "user", "content": "a, [b], {c}" * 5000}]}).encode()
    monkeypatch.undo()
    assert parse_body(ChatCompletionRequest, text, 4096).messages[0].content.startswith("a, [b]")


def test_parse_body_errors_are_pydantic_errors():
    with pytest.raises(ValidationError) as error:
        parse_body(ChatCompletionRequest, b'{"model": ', 4096)
    assert error.value.errors()[0]["type"] == "json_invalid"
    deep = b'{"model": "m", "messages": [{"role": "user"}], "response_format": {"a": ' + b"[" * 250 + b"]" * 250 + b"}}"
    with pytest.raises(ValidationError, match="recursion limit"):
        parse_body(ChatCompletionRequest, deep, 4096)
    bom = b"\xef\xbb\xbf" + json.dumps({"model": "m", "prompt": [1, 2]}).encode()
    assert parse_body(CompletionRequest, bom, 4096).prompt == [1, 2]


# ---- the models' hard caps --------------------------------------------------------------------


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize(
    ("model", "body", "loc"),
    [
        (ChatCompletionRequest, _chat(messages=[{"role": "user"}] * (protocol.MAX_MESSAGES + 1)), ("messages",)),
        (ChatCompletionRequest, _chat(messages=[{"role": "user", "content": [{"type": "text"}] * (protocol.MAX_CONTENT_PARTS + 1)}]),
         ("messages", 0, "content")),
        (ChatCompletionRequest, _chat(stop=["x"] * (protocol.MAX_STOP + 1)), ("stop",)),
        (ChatCompletionRequest, _chat(tools=[{}] * (protocol.MAX_TOOLS + 1)), ("tools",)),
        (ChatCompletionRequest, _chat(logit_bias={str(i): 1 for i in range(protocol.MAX_LOGIT_BIAS + 1)}), ("logit_bias",)),
        (CompletionRequest, {"model": "m", "prompt": ["x"] * (protocol.MAX_PROMPTS + 1)}, ("prompt",)),
        (CompletionRequest, {"model": "m", "prompt": [[1]] * (protocol.MAX_PROMPTS + 1)}, ("prompt",)),
        (CompletionRequest, {"model": "m", "prompt": [0] * (protocol.MAX_PROMPT_TOKENS + 1)}, ("prompt",)),
        (CompletionRequest, {"model": "m", "prompt": [[1], [0] * (protocol.MAX_PROMPT_TOKENS + 1)]}, ("prompt",)),
    ],
    ids=["messages", "content-parts", "stop", "tools", "logit-bias", "prompts", "token-prompts",
         "prompt-tokens", "batched-prompt-tokens"],
)
def test_lists_past_their_hard_cap_are_refused_at_the_field(model, body, loc):
    with pytest.raises(ValidationError) as error:
        model.model_validate_json(json.dumps(body))
    assert error.value.errors()[0]["loc"] == loc
    at_cap = json.loads(json.dumps(body))
    container = at_cap
    for part in loc[:-1]:
        container = container[part]
    value = container[loc[-1]]
    if isinstance(value, dict):
        container[loc[-1]] = dict(list(value.items())[:-1])
    elif isinstance(value[-1], list) and len(value) == 2:
        container[loc[-1]] = [value[0], value[1][:-1]]
    else:
        container[loc[-1]] = value[:-1]
    model.model_validate_json(json.dumps(at_cap))  # one fewer: accepted


def test_settings_cannot_allow_more_than_the_hard_caps():
    AdmissionSettings(max_messages=protocol.MAX_MESSAGES, max_prompts=protocol.MAX_PROMPTS)
    for field, cap in (("max_messages", protocol.MAX_MESSAGES), ("max_prompts", protocol.MAX_PROMPTS),
                       ("max_n", protocol.MAX_N), ("max_json_values", settings.MAX_JSON_VALUES)):
        with pytest.raises(ValidationError, match="less than or equal"):
            TandemSettings.model_validate({"admission": {field: cap + 1}})


@pytest.mark.parametrize(
    "body",
    [
        _chat(temperature=0, max_tokens="5", stream_options={"include_usage": True}, seed=10**30,
              messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}], "x": [1, {"a": None}]},
                        {"role": "assistant", "content": None, "tool_calls": [{"id": "t"}]}],
              logit_bias={"1": 2}, stop=["a"], response_format={"type": "json_object"}),
        {"model": "m", "prompt": [[1, 2], [3]], "best_of": 1, "top_p": 1},
        {"model": "m", "prompt": "x", "stream_options": {}},
    ],
)
def test_the_forwarded_body_is_what_model_dump_would_give(body):
    model = CompletionRequest if "prompt" in body else ChatCompletionRequest
    request = model.model_validate_json(json.dumps(body))
    forwarded = forwarded_body(request)
    expected = request.model_dump(mode="json", exclude_unset=True)
    assert json.dumps(forwarded) == json.dumps(expected)


# ---- memory: the worst body the limits allow --------------------------------------------------

LIMITS = AdmissionSettings()  # the defaults: 8 MiB bodies, 262,144 JSON values
# The stated bound on what validating one body may add to the ingress's memory (RSS): four
# times the body plus 256 bytes per JSON value the limits allow, 96 MiB at the defaults.
# (Before bodies were bounded, 8 MiB of tiny messages cost 520 MiB.)
RSS_BOUND = 4 * LIMITS.max_body_bytes + 256 * LIMITS.max_json_values

_CHAT_HEAD = '{"model":"m","messages":[{"role":"user","content":"x"}],'


def _filled(prefix: str, item: Any, suffix: str, n_max: int | None = None) -> bytes:
    """prefix + as many items as the limits allow + suffix."""
    one, two = (f"{prefix}{item(0)}{suffix}".encode(), f"{prefix}{item(0)},{item(1)}{suffix}".encode())
    unbounded = 10**12
    per_item = json_values_bound(two, unbounded) - json_values_bound(one, unbounded)
    n = (LIMITS.max_json_values - json_values_bound(one, unbounded)) // per_item + 1
    parts, size = [], len(prefix) + len(suffix)
    for i in range(min(n, n_max or n)):
        text = item(i)
        if size + len(text) + 1 > LIMITS.max_body_bytes:
            break
        parts.append(text)
        size += len(text) + 1
    raw = (prefix + ",".join(parts) + suffix).encode()
    assert json_values_bound(raw, unbounded) <= LIMITS.max_json_values and len(raw) <= LIMITS.max_body_bytes
    return raw


def _parts_per_message() -> int:
    return LIMITS.max_json_values // 2 // LIMITS.max_messages - 2


WORST_BODIES = {
    # Refused by the count, as the body of the issue that cost 520 MiB: 8 MiB of tiny values.
    "tiny-messages": lambda: ('{"model":"m","messages":[' + '{"role":"user"},' * ((LIMITS.max_body_bytes - 64) // 16)
                              + '{"role":"user"}]}').encode(),
    "empty-arrays": lambda: (_CHAT_HEAD + '"response_format":{"a":[' + "[]," * ((LIMITS.max_body_bytes - 128) // 3)
                             + "[]]}}").encode(),
    # Accepted, at the value limit: the costliest values per byte.
    "content-parts": lambda: _filled('{"model":"m","messages":[', lambda i: '{"role":"user","content":['
                                     + ",".join(['{"type":"text"}'] * _parts_per_message()) + "]}", "]}",
                                     LIMITS.max_messages),
    "one-key-objects": lambda: _filled(_CHAT_HEAD + '"response_format":{"a":[', lambda i: '{"t":0}', "]}}"),
    "objects-with-strings": lambda: _filled(_CHAT_HEAD + '"response_format":{"a":[',
                                            lambda i: f'{{"t":"{i:040d}"}}', "]}}"),
    "parts-with-text": lambda: _filled('{"model":"m","messages":[', lambda i: '{"role":"user","content":['
                                       + ",".join([f'{{"type":"text","text":"{i:08d}{j:024d}"}}'
                                                   for j in range(_parts_per_message() * 2 // 3)]) + "]}", "]}",
                                       LIMITS.max_messages),
    "empty-objects": lambda: _filled(_CHAT_HEAD + '"response_format":{"a":[', lambda i: "{}", "]}}"),
    "distinct-keys": lambda: _filled(_CHAT_HEAD + '"chat_template_kwargs":{', lambda i: f'"k{i}":0', "}}"),
    "short-strings": lambda: _filled(_CHAT_HEAD + '"response_format":{"a":[', lambda i: f'"{i:x}"', "]}}"),
    "long-strings": lambda: _filled(_CHAT_HEAD + '"response_format":{"a":[', lambda i: f'"{i:030d}"', "]}}"),
    "floats": lambda: _filled(_CHAT_HEAD + '"response_format":{"a":[', lambda i: f"{i}.5", "]}}"),
    "token-ids": lambda: _filled('{"model":"m","prompt":[', lambda i: str(100000 + i), "]}"),
    "one-long-string": lambda: ('{"model":"m","messages":[{"role":"user","content":"'
                                + "a" * (LIMITS.max_body_bytes - 64) + '"}]}').encode(),
    "escapes": lambda: ('{"model":"m","messages":[{"role":"user","content":"'
                        + "\\u00e9" * ((LIMITS.max_body_bytes - 64) // 6) + '"}]}').encode(),
}

# Run in a fresh interpreter: its peak RSS before and after the validation path, with the
# body already read and everything imported and warmed up. VmHWM, the peak of this process's
# own memory (ru_maxrss would start from the forking parent's).
_MEASURE = """
import json, sys
import numpy

def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
from routing.protocol import ChatCompletionRequest, CompletionRequest, TooManyValues, forwarded_body, parse_body
raw = open(sys.argv[1], "rb").read()
max_values = int(sys.argv[2])
model = CompletionRequest if raw.startswith(b'{"model":"m","prompt"') else ChatCompletionRequest
warm = b'{"model":"m","messages":[{"role":"user","content":[{"type":"text"}]}],"response_format":{"a":[1.5,"x",[],{}]}}'
forwarded_body(parse_body(ChatCompletionRequest, warm, max_values))
before = peak_rss()
try:
    body = forwarded_body(parse_body(model, raw, max_values))
    outcome = "accepted"
except TooManyValues:
    outcome = "refused"
print(json.dumps({"growth": peak_rss() - before, "outcome": outcome}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc")
@pytest.mark.parametrize("name", list(WORST_BODIES))
def test_the_worst_bodies_the_limits_allow_keep_rss_growth_bounded(tmp_path, name):
    raw = WORST_BODIES[name]()
    assert len(raw) <= LIMITS.max_body_bytes
    path = tmp_path / "body.json"
    path.write_bytes(raw)
    del raw
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(LIMITS.max_json_values)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.splitlines()[-1])
    refused = name in ("tiny-messages", "empty-arrays")
    assert measured["outcome"] == ("refused" if refused else "accepted")
    size = path.stat().st_size
    assert measured["growth"] <= RSS_BOUND, (name, measured["growth"] / 2**20)
    if refused:
        # Counted, not parsed: no more than the body's size again.
        assert measured["growth"] <= size, (name, measured["growth"] / 2**20)
