"""The server's OpenAI surface as clients use it (raw HTTP and the official openai client): nothing
silently dropped, errors in OpenAI's shape, stop strings held back while streaming, prompt forms, echo
and logprobs (against transformers' own logits), n, penalties / logit_bias / min_tokens / stop token ids
(against a reference computation), usage in streams, seeds, metrics, disconnects, timeouts, tokenization."""

import json
import math
import shutil
import socket
import time

import httpx
import openai
import pytest
import torch

from moe_offload import runtime
from moe_offload.serve import ServeConfig
from moe_offload.serve.chat import ChatTemplate
from test_serve import PROMPTS, Server

M = "moe-offload"


@pytest.fixture(scope="module")
def plain():
    return runtime.load(device="cpu", offload=False)


@pytest.fixture(scope="module")
def server(plain):
    s = Server(plain, ServeConfig(max_batch=4))
    yield s
    s.stop()


def post(server, path, **body):
    return httpx.post(server.url + path, json={"model": M, **body}, timeout=60)


def ok(server, path, **body):
    r = post(server, path, **body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(server, path, **body):
    chunks = []
    with httpx.stream("POST", server.url + path, json={"model": M, "stream": True, **body}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    return chunks


def shape(r, status, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


# --- 1. nothing silently dropped, errors in OpenAI's shape -----------------------------------------

@pytest.mark.parametrize("path,extra,param", [
    ("/v1/completions", {"foo": 1}, "foo"),
    ("/v1/completions", {"max_completion_tokens": 3}, "max_completion_tokens"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": "x"}, "suffix"),
    ("/v1/completions", {"stream": "yes"}, "stream"),
    ("/v1/completions", {"echo": "true"}, "echo"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"stream": True, "stream_options": {"continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"frequency_penalty": 3}, "frequency_penalty"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"stop_token_ids": [99999]}, "stop_token_ids"),
    ("/v1/completions", {"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"seed": -1}, "seed"),
    ("/v1/completions", {"prompt": [[1, 2], "x"]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [True]}, "prompt"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ("/v1/chat/completions", {"echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     "messages[0].tool_calls"),
])
def test_unknown_or_unsupported_fields_are_400_naming_them(server, path, extra, param):
    body = {"prompt": "In the", "max_tokens": 2} if path == "/v1/completions" else \
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    shape(post(server, path, **{**body, **extra}), 400, param)


def test_nulls_mean_unset(server):
    r = ok(server, "/v1/chat/completions", messages=[{"role": "user", "content": "Who?"}],
           max_completion_tokens=None, max_tokens=5, temperature=0)
    assert r["usage"]["completion_tokens"] <= 5
    nulls = {k: None for k in ("temperature", "top_p", "n", "stop", "seed", "logprobs", "echo", "presence_penalty",
                               "frequency_penalty", "logit_bias", "stream", "stream_options", "best_of", "suffix",
                               "user", "top_k", "min_tokens", "stop_token_ids", "repetition_penalty")}
    r = ok(server, "/v1/completions", prompt=PROMPTS[0], max_tokens=4, **nulls)
    assert r["usage"]["completion_tokens"] == 4 and r["choices"][0]["logprobs"] is None


def test_chat_default_max_tokens_runs_to_the_context(server, plain):
    ctx = plain.runtime.max_seq_len
    msgs = [{"role": "user", "content": "Who?"}]
    r = ok(server, "/v1/chat/completions", messages=msgs, temperature=0)
    u = r["usage"]
    assert u["completion_tokens"] > 16  # not OpenAI's completions default
    assert r["choices"][0]["finish_reason"] == "stop" or u["total_tokens"] == ctx


def test_every_error_has_the_openai_shape(server, plain):
    shape(httpx.get(server.url + "/nope"), 404)
    shape(httpx.get(server.url + '/v1/"}{'), 404)
    shape(httpx.get(server.url + "/v1/completions"), 405)
    shape(httpx.delete(server.url + "/v1/models"), 405)
    shape(httpx.post(server.url + "/v1/completions", content=b'{"model": "moe-offload", "prompt": "\\ud800"}'), 400)
    shape(httpx.post(server.url + "/v1/completions", content=b'{"model": "moe-offload", "prompt": "\xff\xfe"}'), 400)
    shape(httpx.post(server.url + "/v1/completions", content=b"[1, 2]"), 400)
    err = shape(post(server, "/v1/completions", prompt="x", max_tokens=plain.runtime.max_seq_len), 400, "max_tokens")
    assert err["code"] == "context_length_exceeded"

    def chunks():  # chunked (no Content-Length): the limit applies while reading
        for _ in range(40):
            yield b" " * 65536
    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert shape(r, 413)["code"] == "request_too_large"


def test_models_by_id(server):
    c = server.client()
    assert c.models.retrieve(M).id == M
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")
    shape(httpx.get(server.url + "/v1/models/gpt-4"), 404, "model")


def test_chat_content_parts_equal_the_joined_string(server):
    a = ok(server, "/v1/chat/completions", max_tokens=8, temperature=0,
           messages=[{"role": "user", "content": [{"type": "text", "text": "Who made"},
                                                  {"type": "text", "text": "the earth?"}]}])
    b = ok(server, "/v1/chat/completions", max_tokens=8, temperature=0,
           messages=[{"role": "user", "content": "Who made\nthe earth?"}])
    assert a["choices"][0]["message"] == b["choices"][0]["message"] and a["usage"] == b["usage"]


def test_an_engine_failure_is_a_500_in_shape(plain):
    s = Server(plain, ServeConfig(model_id="m"))
    try:
        sched = s.app.state.engine.scheduler
        real = sched._decode

        def broken():
            sched._decode = real
            raise RuntimeError("injected")
        sched._decode = broken
        r = httpx.post(s.url + "/v1/completions", json={"model": "m", "prompt": "In the", "max_tokens": 4}, timeout=30)
        assert shape(r, 500)["type"] == "server_error"
        r = httpx.post(s.url + "/v1/completions", json={"model": "m", "prompt": "In the", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200  # keeps serving
    finally:
        s.stop()


# --- 2. streaming holds back possible stop strings --------------------------------------------------

def test_streamed_text_equals_non_streamed_with_multi_token_stops_and_seeds(server, plain):
    cases = 0
    for prompt in PROMPTS[:3]:
        for seed, temp in ((None, 0), (7, 0.9), (123, 1.3)):
            base = {"prompt": prompt, "max_tokens": 24, "temperature": temp, "seed": seed}
            full = ok(server, "/v1/completions", **base)["choices"][0]["text"]
            toks = plain.encode(full)
            spans = [full[3:9], full[10:17] + "\u2603", full[-5:], "xq" + full[2:4], full[5:6] + " zz"]
            for stop in [s for s in spans if s.strip()]:
                assert len(plain.tokenizer.encode(stop, add_special_tokens=False).ids) >= 1
                body = {**base, "stop": [stop, "\u2603never"]}
                want = ok(server, "/v1/completions", **body)
                got = stream(server, "/v1/completions", **body)
                text = "".join(c["choices"][0]["text"] for c in got)
                assert text == want["choices"][0]["text"], (prompt, seed, stop)
                assert got[-1]["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]
                if stop in full:
                    assert text == full[:full.index(stop)]
                cases += 1
            assert toks
    # chat streams too, n = 2
    body = {"messages": [{"role": "user", "content": "Who made the heaven?"}], "max_tokens": 16, "temperature": 1.0,
            "seed": 5, "n": 2}
    full = ok(server, "/v1/chat/completions", **body)
    stop = full["choices"][0]["message"]["content"][4:10]
    body["stop"] = stop
    want = ok(server, "/v1/chat/completions", **body)
    got = stream(server, "/v1/chat/completions", **body)
    for i in range(2):
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in got if c["choices"][0]["index"] == i)
        assert text == want["choices"][i]["message"]["content"]
    assert cases >= 20


def test_seeded_sampling_equals_generate(server, plain):
    r = ok(server, "/v1/completions", prompt=PROMPTS[1], max_tokens=12, temperature=0.8, seed=42)
    g = plain.generate(PROMPTS[1], max_new_tokens=12, temperature=0.8, seed=42)
    assert r["choices"][0]["text"] == g.text
    a = ok(server, "/v1/completions", prompt=PROMPTS[1], max_tokens=12, temperature=0.8, seed=42, n=3)
    assert a["choices"][0]["text"] == g.text and len({c["text"] for c in a["choices"]}) > 1
    b = ok(server, "/v1/completions", prompt=PROMPTS[1], max_tokens=12, temperature=0.8, seed=42, n=3)
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]


# --- 3. prompt forms, echo, logprobs, n --------------------------------------------------------------

def test_prompt_forms_and_n(server, plain):
    ids = [plain.encode(p) for p in PROMPTS[:2]]
    solo = [plain.generate(p, max_new_tokens=6).text for p in PROMPTS[:2]]
    for prompt in (PROMPTS[:2], ids):
        r = ok(server, "/v1/completions", prompt=prompt, max_tokens=6, temperature=0, n=2)
        assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in r["choices"]] == [solo[0], solo[0], solo[1], solo[1]]
        assert r["usage"]["prompt_tokens"] == sum(map(len, ids)) and r["usage"]["completion_tokens"] == 24
    assert ok(server, "/v1/completions", prompt=ids[0], max_tokens=6, temperature=0)["choices"][0]["text"] == solo[0]
    c = server.client().completions.create(model=M, prompt=[ids[1]], max_tokens=6, temperature=0)
    assert c.choices[0].text == solo[1]


def _ref_logprobs(ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(runtime.load(device="cpu", offload=False).path),
                                             dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), -1)  # [T, V]


def test_echo_prompt_logprobs_equal_transformers_logits(server, plain):
    """lm-eval's loglikelihood request ({echo, logprobs: 1, max_tokens: 1, prompt: [[ids]]}) with raw HTTP:
    each continuation's summed logprob and greedy flag equal those from transformers' own logits."""
    ctx = plain.encode("In the beginning God created")
    conts = [plain.tokenizer.encode(s, add_special_tokens=False).ids
             for s in (" the heaven and the earth", " a great fish", " seven loaves")]
    r = ok(server, "/v1/completions", prompt=[ctx + c for c in conts], max_tokens=1, logprobs=1, echo=True,
           temperature=0, seed=1234)
    scores = []
    for c, ch in zip(conts, sorted(r["choices"], key=lambda x: x["index"])):
        lp = ch["logprobs"]
        full = ctx + c
        assert len(lp["token_logprobs"]) == len(full) + 1 and lp["token_logprobs"][0] is None
        ref = _ref_logprobs(full)
        want = [float(ref[i - 1, full[i]]) for i in range(1, len(full))]
        assert lp["token_logprobs"][1:len(full)] == pytest.approx(want, abs=1e-4)
        got_sum = sum(lp["token_logprobs"][len(ctx):-1])
        want_sum = sum(want[len(ctx) - 1:])
        assert got_sum == pytest.approx(want_sum, abs=1e-3)
        greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][len(ctx):-1],
                                                               lp["top_logprobs"][len(ctx):-1]))
        ref_greedy = all(int(ref[i - 1].argmax()) == full[i] for i in range(len(ctx), len(full)))
        assert greedy == ref_greedy
        scores.append(got_sum)
    assert max(range(3), key=scores.__getitem__) == 0  # the right continuation wins
    # max_tokens 0 with echo: the prompt only, with its logprobs
    r = ok(server, "/v1/completions", prompt="In the beginning", max_tokens=0, echo=True, logprobs=3)
    ch = r["choices"][0]
    assert ch["text"] == "In the beginning" and r["usage"]["completion_tokens"] == 0
    assert len(ch["logprobs"]["tokens"]) == len(plain.encode("In the beginning"))
    assert all(len(t) >= 3 for t in ch["logprobs"]["top_logprobs"][1:])


def test_generated_logprobs_and_chat_top_logprobs(server, plain):
    r = ok(server, "/v1/completions", prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=5)
    lp = r["choices"][0]["logprobs"]
    ids = plain.encode(PROMPTS[0]) + plain.generate(PROMPTS[0], max_new_tokens=5).token_ids
    ref = torch.log_softmax(plain.logits(ids), -1)
    P = len(plain.encode(PROMPTS[0]))
    assert lp["token_logprobs"] == pytest.approx([float(ref[P - 1 + i, ids[P + i]]) for i in range(5)], abs=1e-4)
    assert all(len(t) == 5 and max(t.values()) == pytest.approx(float(ref[P - 1 + i].max()), abs=1e-4)
               for i, t in enumerate(lp["top_logprobs"]))
    assert "".join(lp["tokens"]) == r["choices"][0]["text"]
    c = server.client().chat.completions.create(model=M, messages=[{"role": "user", "content": "Who?"}],
                                                max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)
    # streamed logprobs concatenate to the non-streamed ones
    got = stream(server, "/v1/completions", prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=5)
    assert sum((c["choices"][0]["logprobs"]["token_logprobs"] for c in got), []) == lp["token_logprobs"]


# --- 4. penalties, logit_bias, min_tokens, stop token ids, usage in streams ------------------------

def _reference(plain, prompt_ids, n, *, rep=1.0, freq=0.0, pres=0.0, bias=None, min_tokens=0, stop_ids=()):
    """Greedy decoding with vLLM's logits processing, written independently of the server (plain loops)."""
    out = []
    eos = set(plain.config.eos_token_ids)
    for _ in range(n):
        logits = plain.logits(prompt_ids + out)[-1].tolist()
        for t, b in (bias or {}).items():
            logits[t] += b
        if len(out) < min_tokens:
            for t in eos | set(stop_ids):
                logits[t] = -math.inf
        seen = set(prompt_ids) | set(out)
        for t in seen:
            if rep != 1.0:
                logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        for t in set(out):
            logits[t] -= freq * out.count(t) + pres
        tok = max(range(len(logits)), key=logits.__getitem__)
        out.append(tok)
        if tok in eos or tok in stop_ids:
            break
    return out


@pytest.mark.parametrize("kw", [dict(frequency_penalty=1.5), dict(presence_penalty=1.8),
                                dict(repetition_penalty=1.6), dict(frequency_penalty=0.8, presence_penalty=0.9),
                                dict(logit_bias={"261": 6.0, "285": -100})])
def test_penalties_and_logit_bias_equal_a_reference(server, plain, kw):
    prompt = PROMPTS[1]
    ids = plain.encode(prompt)
    ref = _reference(plain, ids, 20, rep=kw.get("repetition_penalty", 1.0), freq=kw.get("frequency_penalty", 0.0),
                     pres=kw.get("presence_penalty", 0.0),
                     bias={int(k): v for k, v in kw.get("logit_bias", {}).items()})
    r = ok(server, "/v1/completions", prompt=prompt, max_tokens=20, temperature=0, **kw)
    assert r["choices"][0]["text"] == plain.decode(ref)
    assert r["choices"][0]["text"] != plain.generate(prompt, max_new_tokens=20).text  # it changed something
    got = stream(server, "/v1/completions", prompt=prompt, max_tokens=20, temperature=0, **kw)
    assert "".join(c["choices"][0]["text"] for c in got) == r["choices"][0]["text"]


def test_min_tokens_and_stop_token_ids(server, plain):
    # find a prompt whose greedy answer ends early with EOS
    msgs = [{"role": "user", "content": "Who?"}]
    r = ok(server, "/v1/chat/completions", messages=msgs, temperature=0, max_tokens=200)
    ids = plain.encode(ChatTemplate.from_model_dir(plain.path).render(msgs))
    if r["choices"][0]["finish_reason"] == "stop":
        n = r["usage"]["completion_tokens"]
        m = ok(server, "/v1/chat/completions", messages=msgs, temperature=0, max_tokens=n + 10, min_tokens=n + 3)
        assert m["usage"]["completion_tokens"] >= n + 3
        want = _reference(plain, ids, n + 10, min_tokens=n + 3)
        assert m["choices"][0]["message"]["content"] == plain.decode(want)
    gen = plain.generate(PROMPTS[0], max_new_tokens=12).token_ids
    k = 5
    r = ok(server, "/v1/completions", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop_token_ids=[gen[k]])
    first = gen.index(gen[k])
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == first + 1
    assert r["choices"][0]["text"] == plain.decode(gen[:first])
    # min_tokens masks stop token ids too
    r = ok(server, "/v1/completions", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop_token_ids=[gen[k]],
           min_tokens=first + 2)
    assert r["usage"]["completion_tokens"] > first + 1
    assert plain.decode(_reference(plain, plain.encode(PROMPTS[0]), 12, min_tokens=first + 2,
                                   stop_ids=(gen[k],))) == r["choices"][0]["text"]


def test_stream_options_include_usage(server):
    for path, body in (("/v1/completions", {"prompt": [PROMPTS[0], PROMPTS[1]], "n": 2}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Who?"}]})):
        body = {**body, "max_tokens": 6, "temperature": 0}
        want = ok(server, path, **body)["usage"]
        got = stream(server, path, **body, stream_options={"include_usage": True})
        assert got[-1]["choices"] == [] and got[-1]["usage"] == want
        assert all(c["usage"] is None for c in got[:-1])
        plain_chunks = stream(server, path, **body)
        assert all("usage" not in c for c in plain_chunks)
    with server.client().completions.create(model=M, prompt=PROMPTS[2], max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}) as s:
        last = list(s)[-1]
    assert last.usage.completion_tokens == 3


# --- 5. metrics, disconnects, timeouts -------------------------------------------------------------

def test_metrics_have_bounded_route_labels_and_parse(server):
    ok(server, "/v1/completions", prompt=PROMPTS[0], max_tokens=3)
    for i in range(30):
        httpx.get(server.url + f'/x{i}/"quote"/{{brace}}')
    text = httpx.get(server.url + "/metrics").text
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        text_string_to_metric_families = None
    if text_string_to_metric_families is not None:
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        routes = {s.labels["route"] for s in fams["moe_offload_requests"].samples if "route" in s.labels}
        assert "moe_offload_time_to_first_token_seconds" in fams and "moe_offload_inter_token_latency_seconds" in fams
    else:
        routes = set()
        import re
        for line in text.splitlines():
            if line.startswith("#"):
                assert re.fullmatch(r"# (HELP|TYPE) [a-z_]+ .+", line), line
                continue
            m = re.fullmatch(r'([a-z_]+)(\{([a-z_]+="(?:[^"\\\n]|\\.)*",?)+\})? (-?[0-9.e+]+|\+Inf|NaN)', line)
            assert m, line
            if line.startswith("moe_offload_requests_total{"):
                routes.add(re.search(r'route="([^"]*)"', line).group(1))
    assert routes <= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model_id:path}",
                      "/health", "/metrics", "unmatched"}, routes
    assert "unmatched" in routes and "/v1/completions" in routes


def _raw(server, data: bytes, timeout=10):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    s.sendall(data)
    return s


def test_a_non_streaming_client_that_disconnects_frees_its_row(server, plain):
    engine = server.app.state.engine
    before = engine.counters.cancelled
    body = json.dumps({"model": M, "prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0}).encode()
    s = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.time() + 20
    while not engine.active:
        assert time.time() < deadline
        time.sleep(0.01)
    steps = engine.scheduler.steps
    s.close()
    while engine.active or engine.counters.cancelled == before:
        assert time.time() < deadline, "the disconnected request still holds its row"
        time.sleep(0.01)
    assert engine.scheduler.steps - steps < 400 - 1  # it did not run to the end
    r = ok(server, "/v1/completions", prompt=PROMPTS[3], max_tokens=8, temperature=0)
    assert r["choices"][0]["text"] == plain.generate(PROMPTS[3], max_new_tokens=8).text


def _read_all(c, until: float) -> bytes:
    reply = b""
    while time.time() < until:
        try:
            chunk = c.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        reply += chunk
    return reply


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le"])
def test_slow_headers_are_cut_by_the_header_timeout(plain, sent):
    """A client that sends nothing, or half its headers, gets a 408 in OpenAI's shape and is disconnected."""
    s = Server(plain, ServeConfig(header_timeout_s=1.0))
    try:
        t0 = time.time()
        c = _raw(s, sent)
        reply = _read_all(c, t0 + 8).decode()
        c.close()
        assert reply.startswith("HTTP/1.1 408"), reply
        assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        assert 0.9 < time.time() - t0 < 8
        # the server still answers
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


def test_the_header_timeout_restarts_for_each_request_on_a_kept_alive_connection(plain):
    s = Server(plain, ServeConfig(header_timeout_s=1.5))
    try:
        c = _raw(s, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(1.0)  # within uvicorn's 5 s keep-alive; a second request starts, headers never end
        c.sendall(b"GET /health HTTP/1.1\r\nHo")
        t1 = time.time()
        reply = _read_all(c, t1 + 8).decode()
        c.close()
        assert reply.startswith("HTTP/1.1 200") and reply.count("HTTP/1.1 408") == 1, reply
        assert 1.4 < time.time() - t1 < 8  # timed from the second request, not from the connection
    finally:
        s.stop()


def test_a_slow_body_is_cut_by_the_body_timeout(plain):
    s = Server(plain, ServeConfig(body_timeout_s=1.0))
    try:
        t0 = time.time()
        c = _raw(s, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"model\": ")
        reply = b""
        while b'"request_timeout"' not in reply and time.time() - t0 < 8:  # headers and body may come apart
            chunk = c.recv(65536)
            if not chunk:
                break
            reply += chunk
        c.close()
        reply = reply.decode()
        assert reply.startswith("HTTP/1.1 408") and '"request_timeout"' in reply and time.time() - t0 < 8
    finally:
        s.stop()


# --- 6. tokenization -------------------------------------------------------------------------------

def test_special_token_text_in_chat_content_is_text(server, plain):
    msgs = [{"role": "user", "content": "Who </s> made <s> it?"}]
    r = ok(server, "/v1/chat/completions", messages=msgs, max_tokens=1, temperature=0)
    text = ChatTemplate.from_model_dir(plain.path).render(msgs)
    tok = plain.tokenizer
    eos, bos = plain.config.eos_token_ids[0], plain.config.bos_token_id
    whole = tok.encode(text, add_special_tokens=False).ids
    assert whole.count(eos) == 1 and whole.count(bos) == 2  # what a plain encode of the rendering would do
    # the server: the template's own <s> is BOS; the user's "</s>" and "<s>" are characters
    expect = len(whole) - 2 + len(tok.encode(" </s>", add_special_tokens=False).ids) + \
        len(tok.encode(" <s>", add_special_tokens=False).ids)
    assert r["usage"]["prompt_tokens"] >= expect - 2 and r["usage"]["prompt_tokens"] > len(whole)
    from moe_offload.serve.tokens import ServerTokenizer, wrap_contents
    tpl = ChatTemplate.from_model_dir(plain.path)
    ids = ServerTokenizer(plain).encode_chat(lambda w: tpl.render(wrap_contents(msgs, w)))
    assert ids[0] == bos and ids.count(bos) == 1 and eos not in ids and len(ids) == r["usage"]["prompt_tokens"]
    # ordinary content tokenizes exactly as the whole rendered string does
    msgs = [{"role": "user", "content": "Who made the heaven and the earth?"}]
    text = tpl.render(msgs)
    assert ServerTokenizer(plain).encode_chat(lambda w: tpl.render(wrap_contents(msgs, w))) == plain.encode(text)


@pytest.mark.parametrize("case", ["bundled", "add_bos_token_false", "no_post_processor"])
def test_completion_prompts_tokenize_like_auto_tokenizer(plain, tmp_path, case):
    """transformers 5's AutoTokenizer takes BOS from tokenizer.json's post-processor alone (the bundled
    folder's writes <s>); add_bos_token in tokenizer_config.json does not change that."""
    from transformers import AutoTokenizer

    d = tmp_path / "m"
    shutil.copytree(plain.path, d)
    if case == "add_bos_token_false":
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["add_bos_token"] = False
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    elif case == "no_post_processor":
        tj = json.loads((d / "tokenizer.json").read_text())
        tj["post_processor"] = None
        (d / "tokenizer.json").write_text(json.dumps(tj))
    om = runtime.load(d, device="cpu", offload=False)
    want = AutoTokenizer.from_pretrained(str(d))("In the beginning </s> x").input_ids
    assert (want[0] == plain.config.bos_token_id) == (case != "no_post_processor")
    from moe_offload.serve.tokens import ServerTokenizer
    assert ServerTokenizer(om).encode_prompt("In the beginning </s> x") == want
    s = Server(om, ServeConfig(model_id="m"))
    try:
        r = httpx.post(s.url + "/v1/completions", json={"model": "m", "prompt": "In the beginning </s> x",
                                                        "max_tokens": 0, "echo": True, "logprobs": 0}).json()
        assert r["usage"]["prompt_tokens"] == len(want)
    finally:
        s.stop()
