"""OpenAI's API as the official `openai` client sees it: every request field odlora serves either
honoured (checked against `Runtime.generate` with the same settings) or refused by name.

    python -m pytest -q tests/test_openai_api.py        # the tiny ONNX export of test_serve, a server on a free port
"""

from __future__ import annotations

import http.client
import json
import urllib.parse

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ondevice_lora.config import SamplingConfig  # noqa: E402
from ondevice_lora.generate import TokenChooser, generate_text  # noqa: E402
from ondevice_lora.grammar import json_grammar  # noqa: E402
from ondevice_lora.prompts import stop_token_ids  # noqa: E402
from ondevice_lora.runtime.access import Access  # noqa: E402
from test_serve import MESSAGES, PROMPT, rt, serving, tiny_export  # noqa: E402,F401  (fixtures)


N = 6  # tokens per answer: enough to differ, few enough to stay fast
# The name in ASCII letters: any other 12 characters could take 4 byte tokens each, more than the
# tiny export's 64-token cache leaves for the answer.
CONTACT = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
                                            "city": {"enum": ["Oslo", "Lima", "Hanoi"]},
                                            "known": {"type": "boolean"}},
           "required": ["name", "city", "known"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(rt):
    with serving(rt) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=30)


def want(rt, prompt=MESSAGES, adapter="a", chat=True, logprobs=None, **sampling):
    return rt.generate(prompt, adapter=adapter, chat=chat, logprobs=logprobs,
                       sampling=SamplingConfig(**{"max_new_tokens": N, **sampling}))


def chat(client, stream=False, **fields):
    length = {} if "max_completion_tokens" in fields else {"max_tokens": N}
    return client.chat.completions.create(**{"model": "a", "messages": MESSAGES, "stream": stream, **length, **fields})


def streamed(chunks) -> dict:
    """index -> (text, finish_reason, logprob entries) of a stream's choices."""
    out: dict = {}
    for chunk in chunks:
        for c in chunk.choices:
            text, finish, entries = out.get(c.index, ("", None, []))
            piece = c.delta.content if hasattr(c, "delta") else c.text
            logprobs = (c.logprobs.content if hasattr(c, "delta") else c.logprobs.token_logprobs) if c.logprobs else []
            out[c.index] = (text + (piece or ""), c.finish_reason or finish, entries + list(logprobs or []))
    return out


# -- sampling fields ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,sampling", [
    ({"max_completion_tokens": 3}, {"max_new_tokens": 3}),
    ({"temperature": 1.3, "seed": 7, "extra_body": {"top_k": 5}}, {"temperature": 1.3, "seed": 7, "top_k": 5}),
    ({"temperature": 0.9, "top_p": 0.5, "seed": 3}, {"temperature": 0.9, "top_p": 0.5, "seed": 3}),
    ({"presence_penalty": 1.5, "frequency_penalty": 2.0}, {"presence_penalty": 1.5, "frequency_penalty": 2.0}),
    ({"logit_bias": {"5": 100}}, {"logit_bias": {5: 100.0}}),
])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_sampling_fields_are_honoured(client, rt, fields, sampling, stream):
    expected = want(rt, **sampling)
    response = chat(client, stream, **fields)
    if stream:
        text, finish, _ = streamed(response)[0]
    else:
        text, finish = response.choices[0].message.content, response.choices[0].finish_reason
        assert response.usage.completion_tokens == len(expected.token_ids)
    assert (text, finish) == (expected.text, expected.finish_reason)


def test_penalties_change_the_logits_by_openais_formula():
    chooser = TokenChooser(SamplingConfig(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={1: -3.0}))
    chooser.counts = {2: 3, 4: 1}
    got = chooser.adjusted(np.zeros(6, dtype=np.float32))
    assert got.tolist() == [0.0, -3.0, -(3 * 0.25 + 0.5), 0.0, -(0.25 + 0.5), 0.0]


def test_content_parts_are_the_same_text(client, rt):
    parts = [{"type": "text", "text": PROMPT[:10]}, {"type": "text", "text": PROMPT[10:]}]
    response = client.chat.completions.create(model="a", messages=[{"role": "user", "content": parts}], max_tokens=N)
    assert response.choices[0].message.content == want(rt).text


def test_n_choices_each_with_its_own_seed(client, rt):
    response = chat(client, n=3, temperature=1.5, seed=11)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.message.content for c in response.choices] == [want(rt, temperature=1.5, seed=11 + i).text for i in range(3)]
    assert response.usage.prompt_tokens == want(rt).prompt_tokens  # the prompt counts once
    stream = streamed(chat(client, True, n=2, temperature=1.5, seed=11))
    assert [stream[i][0] for i in (0, 1)] == [c.message.content for c in response.choices[:2]]


def test_completions_take_a_list_of_prompts_and_token_ids(client, rt):
    ids = rt.encode(PROMPT, chat=False)
    response = client.completions.create(model="a", prompt=[PROMPT, ids], max_tokens=N, n=2)
    expected = want(rt, PROMPT, chat=False).text
    assert [(c.index, c.text) for c in response.choices] == [(i, expected) for i in range(4)]
    echoed = client.completions.create(model="a", prompt=PROMPT, max_tokens=N, echo=True)
    assert echoed.choices[0].text == PROMPT + expected
    stream = streamed(client.completions.create(model="a", prompt=PROMPT, max_tokens=N, echo=True, stream=True))
    assert stream[0][0] == PROMPT + expected


# -- log-probabilities ------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs(client, rt, stream):
    expected = want(rt, logprobs=3)
    response = chat(client, stream, logprobs=True, top_logprobs=3)
    if stream:
        entries = streamed(response)[0][2]
    else:
        entries = response.choices[0].logprobs.content
    assert len(entries) == len(expected.token_ids) == N
    for entry, token in zip(entries, expected.logprobs):
        assert entry.token == rt.token_text(token.token) and entry.logprob == pytest.approx(token.logprob)
    assert b"".join(bytes(entry.bytes) for entry in entries).decode(errors="replace") == expected.text
    for entry in entries:
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: the top one
        assert entry.top_logprobs[0].logprob <= 0


def test_completion_logprobs(client, rt):
    response = client.completions.create(model="a", prompt=PROMPT, max_tokens=N, logprobs=2)
    choice = response.choices[0]
    lp = choice.logprobs
    expected = want(rt, PROMPT, chat=False, logprobs=2)
    assert choice.text == expected.text and lp.tokens == [rt.token_text(t.token) for t in expected.logprobs]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in expected.logprobs])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(N)]
    for top, entry in zip(lp.top_logprobs, expected.logprobs):
        assert top == pytest.approx({rt.token_text(t): p for t, p in entry.top})  # text keys: pieces may collide
        assert len(entry.top) == 2 and entry.top[0] == (entry.token, pytest.approx(entry.logprob))  # greedy


# -- response_format ---------------------------------------------------------------------------------------

def valid_contact(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"name", "city", "known"} and isinstance(value["name"], str) and len(value["name"]) <= 12
            and value["city"] in ("Oslo", "Lima", "Hanoi") and isinstance(value["known"], bool))


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_a_json_schema_holds_whatever_the_model_would_say(client, rt, seed):
    """The tiny model is random: only the grammar makes its answer JSON at all."""
    response_format = {"type": "json_schema", "json_schema": {"name": "contact", "schema": CONTACT, "strict": True}}
    sampling = {} if seed is None else {"temperature": 1.0, "seed": seed}
    response = chat(client, response_format=response_format, max_tokens=48, **sampling)
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and valid_contact(choice.message.content), choice.message.content
    free = chat(client, max_tokens=48, **sampling).choices[0].message.content
    assert not is_json(free)


def is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_json_object_and_the_reference_generator_agree(client, rt, tiny_model_factory):
    response = chat(client, response_format={"type": "json_object"}, max_tokens=40, model="base")
    assert isinstance(json.loads(response.choices[0].message.content), dict)
    from ondevice_lora.base import load_base

    base = load_base(str(tiny_model_factory("llama")))  # PyTorch, greedy, the same grammar: the same answer
    ids = rt.encode(MESSAGES)
    cfg = SamplingConfig(max_new_tokens=40, grammar=json_grammar(None))
    assert generate_text(base.model, base.tokenizer, ids, cfg, stop_token_ids(base.tokenizer, base.config)) == \
        response.choices[0].message.content


def test_a_bad_schema_is_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert e.value.body["param"] == "response_format.json_schema.schema"


# -- errors and models --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,param,code", [
    ({"temperature": 5}, "temperature", "invalid_value"),
    ({"presence_penalty": 3}, "presence_penalty", "invalid_value"),
    ({"top_logprobs": 2}, "top_logprobs", "unsupported_value"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"logit_bias": {"5": 101}}, 'logit_bias["5"]', "invalid_value"),
    ({"logit_bias": {"999999": 1}}, "logit_bias", "invalid_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type", "invalid_value"),
    ({"messages": [{"role": "user", "content": PROMPT * 30}]}, "messages", "context_length_exceeded"),
])
def test_refusals_name_the_field(client, fields, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, **fields)
    assert (e.value.body["param"], e.value.body["code"]) == (param, code), e.value.body


def test_models_and_system_fingerprint(client, rt):
    assert [m.id for m in client.models.list()] == ["base", "a", "b"]
    assert client.models.retrieve("a").id == "a"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("zzz")
    assert chat(client).system_fingerprint == f"odlora-{rt.manifest['base_fingerprint'][:16]}"


# -- HTTP: keep-alive, HEAD, OPTIONS, CORS ----------------------------------------------------------------

def connection(url: str) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)


def test_keep_alive_head_and_options(server):
    conn = connection(server)
    for method in ("GET", "HEAD", "OPTIONS", "GET"):  # one connection for all four
        conn.request(method, "/v1/models")
        response = conn.getresponse()
        body = response.read()
        assert response.version == 11 and response.getheader("Connection") != "close"
        if method == "OPTIONS":
            assert response.status == 204 and "GET" in response.getheader("Allow")
        else:
            assert response.status == 200 and (body == b"") == (method == "HEAD")
    conn.close()


def test_cors_is_off_by_default_and_allows_the_sites_named(rt, server):
    site = "https://app.example"
    conn = connection(server)
    conn.request("GET", "/v1/models", headers={"Origin": site})
    assert conn.getresponse().status == 403
    with serving(rt, access=Access.build("127.0.0.1", cors_origins=[site])) as url:
        conn = connection(url)
        conn.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": site, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
        preflight = conn.getresponse()
        preflight.read()
        assert preflight.status == 200 and preflight.getheader("Access-Control-Allow-Origin") == site
        conn.request("GET", "/v1/models", headers={"Origin": site})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Access-Control-Allow-Origin") == site
        response.read()
        conn.request("GET", "/v1/models", headers={"Origin": "https://other.example"})
        assert conn.getresponse().status == 403


# -- the default base: the contacts sample's test split ----------------------------------------------------

CONTACTS_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
                   "required": ["name", "city"], "additionalProperties": False}


@pytest.mark.slow
def test_contacts_answers_are_always_valid_json(default_export):
    """Every question of the contacts test split, asked of the default base (no adapter) with the
    sample's schema as response_format: each answer parses and matches it."""
    from ondevice_lora.runtime import Runtime
    from ondevice_lora.samples import load_examples

    rt = Runtime.open(default_export("onnx", "int4"), threads=2)
    questions = [example["messages"][:1] for example in load_examples("contacts", "test")]
    response_format = {"type": "json_schema", "json_schema": {"name": "contact", "schema": CONTACTS_SCHEMA}}
    with serving(rt) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        answers = [client.chat.completions.create(model="base", messages=q, max_tokens=64,
                                                  response_format=response_format).choices[0] for q in questions]
    assert len(answers) == 100
    for choice in answers:
        value = json.loads(choice.message.content)
        assert choice.finish_reason == "stop" and set(value) == {"name", "city"}
        assert all(isinstance(v, str) for v in value.values())
