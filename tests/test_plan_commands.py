"""Every command `dsv3 plan` recommends is one the real CLI accepts: each line goes through dsv3.cli.build_parser()
(the dsv3 part of a `torchrun ... -m dsv3 ...` line), and the flags it marks as not yet available are kept out of the
runnable line and are ones the parser indeed rejects."""
import json
import shlex

import pytest

from dsv3.checkpoint.quantized import Quantization
from dsv3.cli import build_parser, main

# Fixed CPU figures so nothing is measured on this (shared, busy) machine.
CPU_FLAGS = ["--cpu-bandwidth", "200GB/s", "--cpu-tflops", "2"]

CASES = [
    # model, --gpus, --cpu-mem, extra plan flags
    ("deepseek-v3", "none", "512GB", []),  # fits nothing
    ("deepseek-v3", "none", "512GB", ["--precision", "int4"]),
    ("deepseek-v3", "none", "768GB", ["--precision", "int8", "--no-mtp"]),
    ("deepseek-v3", "1xRTX4090", "128GB", ["--precision", "int4"]),  # fits nothing
    ("deepseek-v3", "1xRTX4090", "512GB", ["--precision", "int4"]),  # hybrid: experts in RAM beside the GPU
    ("deepseek-v3", "2xRTX4090", "512GB", ["--precision", "int4", "--context", "4096"]),  # hybrid over 2 GPUs
    ("deepseek-v3", "8xH200", "1TB", ["--context", "32768", "--concurrency", "8"]),
    ("deepseek-v3", "8xH200", "1TB", ["--precision", "int4"]),
    ("deepseek-v3", "8xH200", "1TB", ["--precision", "int8", "--cache-dtype", "fp8"]),
    ("deepseek-v3", "8xH100", "1TB", []),  # hybrid
    ("deepseek-v3", "2xA100-80GB", "512GB", ["--precision", "int4"]),
    ("deepseek-v2-lite", "none", "64GB", []),
    ("deepseek-v2-lite", "none", "64GB", ["--precision", "int4", "--concurrency", "4"]),
    ("deepseek-v2-lite", "1xRTX4090", "128GB", []),
    ("deepseek-v2-lite", "1xRTX4090", "128GB", ["--precision", "int8"]),
    ("deepseek-v2-lite", "1xRTX4090", "128GB", ["--precision", "fp8"]),
    ("deepseek-v2-lite", "2xA100-80GB", "128GB", ["--precision", "int4", "--concurrency", "16"]),
    ("deepseek-v2-lite", "8xH200", "512GB", ["--precision", "int8"]),
    ("moonlight-16b-a3b", "2xA100-80GB", "256GB", ["--context", "16384"]),
]


def _plan(capsys, model: str, gpus: str, cpu_mem: str, extra: list[str]) -> dict:
    # As `dsv3 plan` runs it: the command, with explicit CPU figures.
    assert main(["plan", "--model", model, "--gpus", gpus, "--cpu-mem", cpu_mem, *CPU_FLAGS, *extra, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _dsv3_argv(line: str) -> list[str]:
    """The dsv3 arguments of a command line: after a leading `dsv3`, or after `-m dsv3` of a torchrun line."""
    words = shlex.split(line)
    if words[0] == "dsv3":
        return words[1:]
    assert words[0] == "torchrun", line
    i = next(i for i in range(1, len(words) - 1) if words[i] == "-m" and words[i + 1] == "dsv3")
    assert all(w.startswith("--") or w.isdigit() for w in words[1:i]), line  # torchrun's own options only
    return words[i + 2:]


def _parses(argv: list[str]) -> bool:
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        return False
    return True


def _commands(r: dict) -> list[tuple[str, str, list[str]]]:
    """(where, runnable line, not-yet-available flags) of every command in a report."""
    out = [(f"layout {lay['name']}", lay["command"], lay["not_yet_available"]) for lay in r["layouts"]
           if lay["command"] is not None]
    if r["recommended_command"] is not None:
        out.append(("recommended", r["recommended_command"], r["recommended_not_yet_available"]))
    if r["runnable_command"] is not None:
        out.append(("runnable today", r["runnable_command"], []))
    return out


def _check(r: dict) -> None:
    for where, line, later in _commands(r):
        argv = _dsv3_argv(line)
        assert argv[0] == "serve", line
        assert _parses(argv), f"{where}: `dsv3 {shlex.join(argv)}` is rejected by the CLI's parser"
        runnable_words = set(argv)
        for flag in later:
            name = flag.split()[0]
            assert name not in runnable_words, f"{where}: not-yet-available {name} printed as runnable in {line}"
            # Marked as later work only while the CLI really lacks it: once it exists, print it as runnable.
            assert not _parses(argv + shlex.split(flag)), f"{where}: {flag} is accepted by the CLI now"


@pytest.mark.parametrize("model,gpus,cpu_mem,extra", CASES,
                         ids=[" ".join([m, g, c, *e]) for m, g, c, e in CASES])
def test_recommended_commands_parse(capsys, model, gpus, cpu_mem, extra):
    r = _plan(capsys, model, gpus, cpu_mem, extra)
    _check(r)
    fits_any = any(lay["fits"] for lay in r["layouts"])
    assert r["fits"] == fits_any
    if fits_any:
        assert r["recommended_command"] is not None and len(_commands(r)) >= 2  # the layout's line and the report's
        assert r["recommended_command"] == next(lay["command"] for lay in r["layouts"] if lay["name"] == r["layout"])
    else:
        assert r["recommended_command"] is None and r["runnable_command"] is None
    if r["runnable_command"] is not None:
        runnable = next(lay for lay in r["layouts"] if lay["name"] == r["runnable_layout"])
        assert runnable["fits"] and not runnable["not_yet_available"]


def test_every_case_recommends_a_command_except_when_nothing_fits(capsys):
    nothing = [c for c in CASES if not _plan(capsys, *c)["fits"]]
    assert nothing == [("deepseek-v3", "none", "512GB", []),  # fp8: ~638 GiB
                       ("deepseek-v3", "1xRTX4090", "128GB", ["--precision", "int4"])]


def test_what_is_runnable_and_what_is_marked(capsys):
    r = _plan(capsys, "deepseek-v3", "2xRTX4090", "512GB", ["--precision", "int4", "--context", "4096"])
    assert r["layout"] == "hybrid"
    assert r["recommended_not_yet_available"] == ["--experts-device cpu", "--pipeline-parallel 2"]
    assert r["recommended_command"].startswith("dsv3 serve --model PATH/TO/deepseek-v3 --device cuda ")
    assert r["runnable_layout"] == "cpu" and " --device cpu " in r["runnable_command"]
    assert "--quantize int4" in r["runnable_command"]

    r = _plan(capsys, "deepseek-v3", "8xH200", "1TB", ["--precision", "int8", "--cache-dtype", "fp8"])
    assert r["layout"] == "gpu" and r["recommended_not_yet_available"] == ["--kv-cache-dtype fp8"]
    assert _dsv3_argv(r["recommended_command"])[-2:] == ["--tp", "8"]
    assert r["runnable_command"] is None  # every layout needs the fp8 cache flag

    r = _plan(capsys, "deepseek-v3", "none", "768GB", ["--precision", "int8", "--no-mtp"])
    assert r["recommended_not_yet_available"] == ["--no-mtp"]  # dsv3 serve loads MTP whenever the checkpoint has it

    r = _plan(capsys, "deepseek-v3", "8xH200", "1TB", [])
    assert "--fp8-mode keep" in r["recommended_command"] and not r["recommended_not_yet_available"]
    assert r["runnable_command"] == r["recommended_command"]


def test_text_report_marks_later_flags(capsys):
    assert main(["plan", "--model", "deepseek-v3", "--gpus", "1xRTX4090", "--cpu-mem", "512GB", "--precision",
                 "int4", *CPU_FLAGS]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("recommendation: hybrid"))
    assert lines[i + 1].strip().startswith("dsv3 serve ") and "--experts-device" not in lines[i + 1]
    assert lines[i + 2].strip().startswith("not yet available: --experts-device cpu")
    assert lines[i + 3].startswith("runnable today: cpu") and _parses(_dsv3_argv(lines[i + 4].strip()))
    assert "loads fp8 and bf16 weights today" not in out
    assert "4.5 bits per weight" in out and "output head int8" in out


def test_checkpoint_written_by_dsv3_quantize(tmp_path, capsys):
    # A checkpoint `dsv3 quantize` wrote is planned at its own precision and loads with no --quantize flag.
    from hf_ref import v3

    (tmp_path / "my model").mkdir()
    cfg = v3(kv_lora_rank=32, v_head_dim=16, quantization_config=Quantization.named("int4").config())
    (tmp_path / "my model" / "config.json").write_text(json.dumps(cfg))
    r = _plan(capsys, str(tmp_path / "my model"), "1xRTX4090", "64GB", [])
    assert r["precision"] == "int4" and r["fits"]
    _check(r)
    assert "--quantize" not in r["recommended_command"]
    assert _dsv3_argv(r["recommended_command"])[2] == str(tmp_path / "my model")  # quoted, space and all
    r = _plan(capsys, str(tmp_path / "my model"), "1xRTX4090", "64GB", ["--precision", "bf16"])
    assert any("stored as int4" in n for n in r["notes"])
