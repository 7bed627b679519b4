"""The shared request-validation layer (llmbuild.runtime.requests) and the engine
thread's survival (issue 15, cases 1 and 7): every bad field is a UserError naming the
field, its range and the value; a request that fails inside the engine fails alone."""

from __future__ import annotations

import math
import threading

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmbuild.errors import UserError
from llmbuild.runtime import load
from llmbuild.runtime.generator import Request
from llmbuild.runtime.requests import (
    FIELDS,
    SAMPLING_FIELDS,
    RequestError,
    check_messages,
    check_prompts,
    check_sampling,
    check_stop,
    check_text,
    check_token_ids,
)
from llmbuild.runtime.sampling import SamplingParams
from tests.tiny import compile_tiny, make_tiny_hf

LIMITS = {"max_batch_size": 4, "max_input_len": 16, "max_seq_len": 64}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("requests")
    artifact = compile_tiny(make_tiny_hf(root / "hf", seed=5), root / "out", limits=LIMITS)
    m = load(artifact, backend="onnxruntime")
    yield m
    m.close()


# -- the validator -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"seed": "a"}, r"seed: expected an integer in \[0, 2\*\*64\), got 'a' \(string\)"),
    ({"seed": 1.5}, r"seed: expected an integer in \[0, 2\*\*64\), got 1.5 \(number\)"),
    ({"seed": -1}, r"seed: expected an integer in \[0, 2\*\*64\), got -1"),
    ({"temperature": -1.0}, r"temperature: expected a finite number >= 0, got -1.0"),
    ({"temperature": math.nan}, r"temperature: expected a finite number >= 0, got nan"),
    ({"top_p": 0.0}, r"top_p: expected a finite number in \(0, 1\], got 0.0"),
    ({"top_p": 2}, r"top_p: expected a finite number in \(0, 1\], got 2"),
    ({"top_k": -1}, r"top_k: expected an integer in \[0, 2\*\*31-1\], got -1"),
    ({"top_k": 2.0}, r"top_k: expected an integer .*, got 2.0 \(number\)"),
    ({"min_p": 5}, r"min_p: expected a finite number in \[0, 1\], got 5"),
    ({"repetition_penalty": 0}, r"repetition_penalty: expected a finite number > 0, got 0"),
    ({"repetition_penalty": math.inf}, r"repetition_penalty: expected a finite number > 0, got inf"),
    ({"presence_penalty": math.nan}, r"presence_penalty: expected a finite number, got nan"),
    ({"frequency_penalty": -math.inf}, r"frequency_penalty: expected a finite number, got -inf"),
    ({"temperature": True}, r"temperature: expected a finite number >= 0, got true \(boolean\)"),
])
def test_sampling_fields_are_checked_with_field_range_and_value(kwargs, message):
    with pytest.raises(RequestError, match=message) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert info.value.field == next(iter(kwargs))


def test_numpy_scalars_become_plain_numbers():
    import numpy as np

    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), seed=np.uint64(2**63 + 1))
    assert (type(p.temperature), type(p.top_k), type(p.seed)) == (float, int, int)
    assert p.seed == 2**63 + 1


def test_request_fields_are_checked():
    with pytest.raises(RequestError, match=r"max_new_tokens: expected an integer >= 1, got 2.5 \(number\)"):
        Request((1, 2), max_new_tokens=2.5)
    with pytest.raises(RequestError, match=r"prompt_ids\[1\]: expected an integer >= 0, got 2.0 \(number\)"):
        Request((1, 2.0))
    with pytest.raises(RequestError, match=r"logprobs: expected an integer in \[0, 2\*\*31-1\], got -1"):
        Request((1,), logprobs=-1)
    with pytest.raises(RequestError, match=r"stop\[0\]: expected a non-empty string, got ''"):
        Request((1,), stop=("",))
    with pytest.raises(RequestError, match="prompts: expected a string or a non-empty list of strings"):
        check_prompts([])
    with pytest.raises(RequestError, match=r"prompt: expected valid UTF-8 text, got undecodable bytes at character 2"):
        check_text("prompt", "ab\udcff")
    with pytest.raises(RequestError, match=r"messages\[0\]: expected a mapping"):
        check_messages(["hi"])
    with pytest.raises(RequestError, match=r"messages\[0\].content: expected a string, got nothing"):
        check_messages([{"role": "user"}])
    with pytest.raises(RequestError, match=r"IDS\[0\]: expected an integer in \[0, 256\), got 999"):
        check_token_ids([999], field="IDS", vocab_size=256)
    with pytest.raises(RequestError, match="sampling: expected one of temperature"):
        check_sampling({"temprature": 1.0})


# Property: any value for any field ends in a valid, normalised value or a RequestError.
_ANY = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False), st.text(max_size=8),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(SAMPLING_FIELDS)), _ANY, max_size=8))
@example({"seed": "a", "temperature": 1.0})
@example({"seed": 1.5})
@example({"top_p": math.nan})
def test_property_sampling_params_valid_or_request_error(fields):
    try:
        p = SamplingParams(**fields)
    except RequestError as e:
        assert e.field in fields and str(e).startswith(f"{e.field}: expected ")
        return
    for name, spec in SAMPLING_FIELDS.items():
        value = getattr(p, name)
        assert type(value) is (int if spec.kind == "int" else float)
        assert spec.check(name, value) == value


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.one_of(_ANY, st.lists(_ANY, max_size=4), st.lists(st.fixed_dictionaries({"role": _ANY, "content": _ANY}),
                                                              max_size=3)))
def test_property_text_fields_valid_or_request_error(value):
    for check in (check_prompts, check_messages, check_stop, lambda v: check_token_ids(v, vocab_size=256)):
        try:
            check(value)
        except RequestError as e:
            assert ": expected " in str(e)


def test_field_table_ranges_are_stated():
    assert FIELDS["top_p"].expected == "a finite number in (0, 1]"
    assert FIELDS["threads"].expected == "an integer in [1, 4096]"


# -- the Python API ------------------------------------------------------------------------
def test_api_refuses_bad_requests_before_the_engine(model):
    with pytest.raises(RequestError, match=r"seed: expected an integer in \[0, 2\*\*64\), got 'a'"):
        model.generate(["hi"], temperature=1.0, seed="a")
    with pytest.raises(RequestError, match=r"seed: expected .* got 1.5"):
        model.submit([5, 6], params=_forged(seed=1.5))
    with pytest.raises(RequestError, match=r"max_new_tokens: expected an integer >= 1, got 3.0"):
        model.generate(["hi"], max_new_tokens=3.0)
    with pytest.raises(RequestError, match=r"prompt_ids\[0\]: expected an integer >= 0, got 5.0"):
        model.submit([5.0, 6])
    with pytest.raises(RequestError, match=r"messages\[0\]: expected a mapping"):
        model.chat(["hi"])
    with pytest.raises(RequestError, match=r"prompt: expected valid UTF-8 text"):
        model.generate("caf\udce9")
    with pytest.raises(RequestError, match="sampling: expected one of"):
        model.chat([{"role": "user", "content": "hi"}], temprature=0.5)
    # ... and the engine serves the next request.
    (g,) = model.generate(["hi"], max_new_tokens=3)
    assert g.finish_reason in ("length", "eos")


def test_load_options_are_checked(model):
    with pytest.raises(RequestError, match=r"threads: expected an integer in \[1, 4096\], got -1"):
        load(model.path, backend="onnxruntime", threads=-1)
    with pytest.raises(RequestError, match=r"max_batch_size: expected an integer in \[1, 65536\], got 0"):
        load(model.path, backend="onnxruntime", max_batch_size=0)
    with pytest.raises(RequestError, match=r"max_batch_size: expected .* got 10000000"):
        load(model.path, backend="onnxruntime", max_batch_size=10**7)


def _forged(**fields) -> SamplingParams:
    """A SamplingParams whose fields were changed after the checks (a frozen dataclass can
    still be forged): what a bug in a layer above the engine could hand it."""
    params = SamplingParams(temperature=1.0)
    for k, v in fields.items():
        object.__setattr__(params, k, v)
    return params


def _forged_request(prompt, **fields) -> Request:
    request = Request(tuple(prompt), max_new_tokens=6)
    object.__setattr__(request, "params", _forged(**fields))
    return request


def test_a_failing_request_fails_alone_and_the_engine_keeps_serving(model):
    """Case 1: a request that raises inside the engine thread (at admission: a string
    seed; mid-generation: a string top_k in sampling) fails alone; the requests batched
    with it give their solo outputs; the next request succeeds."""
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [20, 21]]
    params = [SamplingParams(), SamplingParams(temperature=0.9, seed=3), SamplingParams(),
              SamplingParams(temperature=1.2, top_k=8, seed=11)]
    solo = [model.generate_ids([p], max_new_tokens=10, params=sp)[0].token_ids for p, sp in zip(prompts, params)]

    results: dict[int, object] = {}
    bad_admit = model.engine.submit(_forged_request([5, 6], seed="a"))
    bad_sample = model.engine.submit(_forged_request([7, 8], top_k="x"))

    def worker(i):
        results[i] = model.generate_ids([prompts[i]], max_new_tokens=10, params=params[i])[0].token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    with pytest.raises(TypeError):
        bad_admit.result(timeout=60)
    with pytest.raises(TypeError):
        bad_sample.result(timeout=60)
    assert [results[i] for i in range(4)] == solo
    (after,) = model.generate_ids([prompts[0]], max_new_tokens=10)
    assert after.token_ids == solo[0]
    assert model.engine._thread.is_alive()
