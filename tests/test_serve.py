"""The OpenAI-compatible server, driven by the official `openai` client: outputs equal `generate`
(greedy), concurrent streams equal their solo runs, errors in OpenAI's shape, API keys, disconnects,
Prometheus metrics."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from moe_offload import runtime
from moe_offload.serve import ServeConfig, create_app, uvicorn_config
from moe_offload.serve.chat import ChatTemplate

PROMPTS = ["In the beginning God", "And the LORD said unto Moses", "Blessed are the", "The earth was"]


class Server:
    def __init__(self, om, cfg):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = create_app(om, cfg)
        self.server = uvicorn.Server(uvicorn_config(self.app, "127.0.0.1", self.port, cfg.header_timeout_s,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def om():
    return runtime.load(device="cpu", cache_per_layer=4)


@pytest.fixture(scope="module")
def server(om):
    s = Server(om, ServeConfig(max_batch=4))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def solo():
    plain = runtime.load(device="cpu", offload=False)
    return lambda prompt, n=12: plain.generate(prompt, max_new_tokens=n)


def test_models_and_health(server):
    ids = [m.id for m in server.client().models.list().data]
    assert ids == ["moe-offload"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_completion_equals_generate_streaming_or_not(server, solo):
    c = server.client()
    want = solo(PROMPTS[0])
    r = c.completions.create(model="moe-offload", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text
    assert r.usage.completion_tokens == len(want.token_ids) and r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.choices[0].finish_reason == "length"
    chunks = list(c.completions.create(model="moe-offload", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_equals_generate_on_the_rendered_template(server, om, solo):
    c = server.client()
    msgs = [{"role": "user", "content": "Who made the heaven and the earth?"}]
    text = ChatTemplate.from_model_dir(om.path).render(msgs)
    want = solo(om.encode(text))
    r = c.chat.completions.create(model="moe-offload", messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="moe-offload", messages=msgs, max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text


def test_stop_strings_end_the_completion(server, solo):
    want = solo(PROMPTS[1], 24).text
    stop = want[5:9]
    r = server.client().completions.create(model="moe-offload", prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                           stop=[stop])
    assert r.choices[0].text == want[: want.index(stop)] and r.choices[0].finish_reason == "stop"


def test_four_concurrent_streams_each_equal_their_solo_run(server, solo):
    c = server.client()

    def run(p):
        return "".join(ch.choices[0].text for ch in c.completions.create(
            model="moe-offload", prompt=p, max_tokens=16, temperature=0, stream=True))

    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(run, PROMPTS))
    assert got == [solo(p, 16).text for p in PROMPTS]


def test_errors_have_the_openai_shape(server, om):
    c = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    for kw, param in ((dict(temperature=-1), "temperature"), (dict(top_p=1.5), "top_p"), (dict(n=0), "n"),
                      (dict(max_tokens=-3), "max_tokens"), (dict(stop=[""]), "stop")):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="moe-offload", prompt="x", **{"max_tokens": 2, **kw})
        assert e.value.body["param"] == param, kw
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="moe-offload", prompt="In " * (om.runtime.max_seq_len + 5), max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(server.url + "/v1/completions", content=b"{not json")
    assert r.status_code == 400 and "error" in r.json()


def test_a_model_without_chat_template_answers_400(om, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(om.path, d)
    (d / "tokenizer_config.json").unlink()
    bare = runtime.load(d, device="cpu", offload=False)
    s = Server(bare, ServeConfig(model_id="m"))
    try:
        with pytest.raises(openai.BadRequestError) as e:
            s.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.body["code"] == "missing_chat_template" and "chat_template" in e.value.body["message"]
    finally:
        s.stop()


def test_api_key(om):
    s = Server(om, ServeConfig(api_key="sesame"))
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert [m.id for m in s.client("sesame").models.list().data] == ["moe-offload"]
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, solo):
    engine = server.app.state.engine
    before = engine.counters.cancelled
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"model": "moe-offload", "prompt": PROMPTS[2], "max_tokens": 200, "temperature": 0,
                            "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(l.startswith("data: ") for l in got)
    deadline = time.time() + 20
    while engine.active or engine.counters.cancelled == before:
        assert time.time() < deadline, "the disconnected request still holds its row"
        time.sleep(0.05)
    r = server.client().completions.create(model="moe-offload", prompt=PROMPTS[3], max_tokens=8, temperature=0)
    assert r.choices[0].text == solo(PROMPTS[3], 8).text


def test_metrics_parse_as_prometheus_text(server):
    server.client().completions.create(model="moe-offload", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            samples[name_labels] = float(value)
            name = name_labels.split("{")[0]
            assert name in types or name.rsplit("_", 1)[0] in types, line  # histograms: _bucket/_sum/_count
    assert samples["moe_offload_generation_tokens_total"] >= 4
    assert samples["moe_offload_expert_cache_misses_total"] > 0
    assert 'moe_offload_requests_total{route="/v1/completions",status="200"}' in samples
    for name in ("tokens_per_second", "queue_length", "expert_cache_hits_total", "expert_cache_bytes_h2d_total",
                 "expert_prefetch_hits_total"):
        assert "moe_offload_" + name in types
