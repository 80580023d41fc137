"""A checkpoint's generation_config.json gives the sampling defaults of LLM, the CLI and the server."""
import argparse
import json
import shutil

import pytest

from dsv3.commands._common import add_sampling_args, sampling_params
from dsv3.engine.gen_defaults import apply_defaults, read_generation_defaults, with_defaults
from dsv3.engine.sampling import SamplingParams


def _write(d, data):
    d.mkdir(parents=True, exist_ok=True)
    (d / "generation_config.json").write_text(json.dumps(data) if not isinstance(data, str) else data)
    return d


def test_reads_the_sampling_keys_only(tmp_path):
    d = _write(tmp_path / "c", {"bos_token_id": 0, "eos_token_id": [1, 2], "do_sample": True, "temperature": 0.7,
                                "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1, "max_length": 99})
    assert read_generation_defaults(d) == {"temperature": 0.7, "top_p": 0.9, "top_k": 40,
                                           "repetition_penalty": 1.1}
    assert read_generation_defaults(tmp_path / "missing") == {}
    assert read_generation_defaults(None) == {}
    assert read_generation_defaults(tmp_path / "model.gguf") == {}


def test_do_sample_false_means_greedy(tmp_path):
    d = _write(tmp_path / "c", {"do_sample": False, "temperature": 0.6, "top_p": 0.95})
    assert read_generation_defaults(d)["temperature"] == 0.0


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": True}, "top_k must be a number"),
])
def test_bad_files_name_the_file_and_key(tmp_path, content, needle):
    d = _write(tmp_path / "c", content)
    with pytest.raises(ValueError, match=needle) as e:
        read_generation_defaults(d)
    assert "generation_config.json" in str(e.value)


def test_given_fields_win_over_defaults():
    defaults = {"temperature": 0.6, "top_p": 0.95}
    p = with_defaults(defaults, temperature=None, top_p=0.5, max_tokens=7)
    assert (p.temperature, p.top_p, p.max_tokens) == (0.6, 0.5, 7)
    assert apply_defaults(None, defaults).temperature == 0.6
    explicit = SamplingParams(temperature=1.0)
    assert apply_defaults(explicit, defaults) is explicit
    assert apply_defaults(None, {}) == SamplingParams()


def _args(argv):
    p = argparse.ArgumentParser()
    add_sampling_args(p)
    return p.parse_args(argv)


def test_cli_flags_left_out_take_the_checkpoint_values():
    defaults = {"temperature": 0.6, "top_p": 0.95, "frequency_penalty": 0.3}
    p = sampling_params(_args([]), defaults)
    assert (p.temperature, p.top_p, p.frequency_penalty, p.top_k) == (0.6, 0.95, 0.3, 0)
    p = sampling_params(_args(["--temperature", "0.2", "--frequency-penalty", "0"]), defaults)
    assert (p.temperature, p.top_p, p.frequency_penalty) == (0.2, 0.95, 0.0)
    assert sampling_params(_args(["--greedy"]), defaults).greedy
    assert sampling_params(_args([]), {}).greedy  # the CLI without checkpoint defaults stays greedy
    with pytest.raises(SystemExit, match="disagree"):
        sampling_params(_args(["--greedy", "--temperature", "0.5"]), defaults)


def test_server_requests_take_the_defaults_for_what_they_leave_out():
    from dsv3.server.protocol import ChatCompletionRequest

    defaults = {"temperature": 0.25, "top_p": 0.5, "repetition_penalty": 1.2}
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    p = req.sampling_params(8, None, defaults=defaults)
    assert (p.temperature, p.top_p, p.repetition_penalty) == (0.25, 0.5, 1.2)
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], temperature=1.0, top_p=None)
    p = req.sampling_params(8, None, defaults=defaults)
    assert (p.temperature, p.top_p) == (1.0, 0.5)
    p = req.sampling_params(8, None)  # no checkpoint defaults: OpenAI's
    assert (p.temperature, p.top_p, p.repetition_penalty) == (1.0, 1.0, 1.0)


def test_llm_uses_the_checkpoint_defaults_when_params_is_none(tiny_ckpt, tmp_path):
    from dsv3 import LLM

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen.update(do_sample=False)  # greedy by default
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(ckpt, max_model_len=64)
    assert llm.generation_defaults["temperature"] == 0.0
    default = llm.generate("def f(x):")[0]
    greedy = llm.generate("def f(x):", SamplingParams(temperature=0.0))[0]
    assert default.token_ids == greedy.token_ids
    streamed = [o for o in llm.stream("def f(x):")][-1]
    assert streamed.token_ids == greedy.token_ids
    assert llm.default_sampling_params(top_p=0.5).top_p == 0.5
    assert llm.default_sampling_params().temperature == 0.0


def test_a_bad_generation_config_fails_before_the_weights_load(tiny_ckpt, tmp_path):
    from dsv3 import LLM

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="generation_config.json: temperature"):
        LLM(ckpt, max_model_len=64)
