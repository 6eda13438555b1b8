"""The `nto` command: --help/--version/backend, `nto plan` on a known answer, bad input."""

import json
import os
import subprocess
import sys

import pytest

from nto_ext import __version__, cli


def _nto(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "nto_ext", *args], capture_output=True,
                          text=True, env=dict(os.environ), timeout=timeout)


def test_help_version_backend(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"nto_ext {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("demo", "plan", "backend"))
    assert cli.main(["backend"]) == 0
    assert capsys.readouterr().out.strip() in ("cpu-ext", "cuda-ext", "reference")
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    assert all(o in out for o in ("--steps", "--budget", "--policy", "--model", "--data",
                                  "--out", "--seed", "--device"))


def _tiny_llama(tmp_path):
    from transformers import LlamaConfig

    # 2 layers, hidden 32, MLP 64, vocab 128, untied head. Elements by block:
    #   embed 128*32 = 4096; each layer: q,k,v,o 4*32*32 + gate,up,down 3*32*64 + 2 norms
    #   2*32 = 10304 in 9 tensors; final norm 32; lm_head 4096. Total 28,832 in 21 tensors.
    LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    return str(tmp_path)


def test_plan_known_answer(tmp_path, capsys):
    folder = _tiny_llama(tmp_path)
    assert cli.main(["plan", "--model", folder, "--budget", "10400", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["total_elements"] == 28_832 and p["total_tensors"] == 21
    assert p["weights_bytes"] == 4 * 28_832
    # Packing in module order under 10,400 elements: [embed] [layer 0] [layer 1 + final norm]
    # [head]. Block policy, fp32: 12 B per element (grad + 2 moments) + a 4-B step per tensor.
    assert [g["elements"] for g in p["groups"]] == [4096, 10304, 10336, 4096]
    assert p["nto_bytes"] == 10336 * 12 + 10 * 4  # the largest group: layer 1 + norm
    assert p["adamw_bytes"] == 28_832 * 12 + 21 * 4
    assert p["adamw8bit_bytes"] == 28_832 * 6
    # bf16 weights: NTO keeps fp32 moments and, by default, fp32 masters of the active set
    # (14 B/elem; 10 without), AdamW bf16 moments (6 B/elem)
    for flags, per in (([], 14), (["--no-master-weights"], 10), (["--stochastic-rounding"], 10)):
        assert cli.main(["plan", "--model", folder, "--budget", "10400", "--dtype", "bf16",
                         "--json", *flags]) == 0
        p = json.loads(capsys.readouterr().out)
        assert p["nto_bytes"] == 10336 * per + 10 * 4, flags
        assert p["adamw_bytes"] == 28_832 * 6 + 21 * 4
    assert cli.main(["plan", "--model", folder, "--budget", "10400"]) == 0
    table = capsys.readouterr().out
    assert "AdamW" in table and "8-bit AdamW" in table and "model.layers.1" in table
    # --step-in-backward: the moments only (8 B/elem), one dense gradient as the transient
    assert cli.main(["plan", "--model", folder, "--budget", "10400", "--step-in-backward",
                     "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["nto_bytes"] == 10336 * 8 + 10 * 4 and p["step_in_backward"]
    assert p["transient_bytes"] == 4096 * 4  # the embedding's (and the head's) gradient
    assert cli.main(["plan", "--model", folder, "--budget", "10400", "--step-in-backward"]) == 0
    assert "one param's gradient in backward" in capsys.readouterr().out


def test_plan_packaged_gguf_model():
    r = _nto("plan", "--model", "smollm2", "--budget", "10%", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["total_elements"] == 134_515_008  # SmolLM2-135M, embeddings tied to the head
    assert p["nto_bytes"] <= 0.12 * p["adamw_bytes"]


def _in_process(capsys, *args):
    """cli.main as the console script runs it: (exit status, stdout, stderr)."""
    try:
        rc = cli.main(list(args))
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def _one_line_error(r, command):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"nto {command}: error: ")
    return lines[0]


def test_bad_input_from_the_console_script_has_no_traceback():
    _one_line_error(_nto("demo", "--policy", "lisa"), "demo")
    _one_line_error(_nto("plan", "--model", "/no/such", "--budget", "1GiB"), "plan")


@pytest.mark.parametrize("args, says", [
    (["--policy", "lisa"], "unknown policy 'lisa'; allowed: block, sample, sparse"),
    (["--budget", "ten percent"], "budget='ten percent'"),
    (["--budget", "150%"], "budget='150%'"),
    (["--budget", "1"], "budget"),  # one element: no tensor of MiniLM fits
    (["--model", "/no/such/folder"], "'/no/such/folder' is neither a packaged model"),
    (["--data", "imdb"], "invalid choice: 'imdb'"),
    (["--steps", "0"], "--steps must be a positive int"),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_demo_bad_input_is_one_line(capsys, args, says):
    line = _one_line_error(_in_process(capsys, "demo", *args), "demo")
    assert says in line


@pytest.mark.parametrize("args, says", [
    (["--policy", "lisa", "--budget", "1GiB"], "unknown policy 'lisa'"),
    (["--budget", "lots"], "budget='lots'"),
    (["--budget", "1"], "budget"),
])
def test_plan_bad_input_is_one_line(capsys, tmp_path, args, says):
    line = _one_line_error(_in_process(capsys, "plan", "--model", _tiny_llama(tmp_path), *args),
                           "plan")
    assert says in line


def test_plan_json_budget_and_dtype(tmp_path, capsys):
    import transformers

    folder = _tiny_llama(tmp_path)
    for budget in ("10%", "10400", "1MiB"):
        assert cli.main(["plan", "--model", folder, "--budget", budget, "--json"]) == 0
        p = json.loads(capsys.readouterr().out)
        assert p["budget"] == budget and (p["dtype"], p["dtype_source"]) == (
            "float32", "float32: the config names no torch_dtype")
    cfg = transformers.AutoConfig.from_pretrained(folder)
    cfg.torch_dtype = "bfloat16"
    cfg.save_pretrained(folder)
    assert cli.main(["plan", "--model", folder, "--budget", "100%", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert (p["dtype"], p["dtype_source"]) == ("bfloat16", "the config's torch_dtype")
    assert p["weights_bytes"] == 2 * 28_832 and p["nto_bytes"] == 14 * 28_832 + 21 * 4
    assert cli.main(["plan", "--model", folder, "--budget", "100%", "--dtype", "fp32"]) == 0
    assert "dtype float32 (--dtype)" in capsys.readouterr().out


def _write_config(tmp_path, **over):
    """A tiny Llama folder whose config.json has `over` written into it (raw JSON)."""
    folder = _tiny_llama(tmp_path)
    path = tmp_path / "config.json"
    d = json.loads(path.read_text())
    d.update(over)
    path.write_text(json.dumps(d))
    return folder


@pytest.mark.parametrize("over, says", [
    ({"vocab_size": 0}, r"config.json: vocab_size=0; allowed: an int in \[1, 16,777,216\]"),
    ({"hidden_size": 10**15}, r"hidden_size=1000000000000000; allowed: an int in \[1, "),
    ({"hidden_size": "32"}, r"hidden_size='32'; allowed: an int"),
    ({"num_hidden_layers": 10**8}, r"num_hidden_layers=100000000; allowed"),
    ({"intermediate_size": 64.0}, r"intermediate_size=64.0; allowed: an int"),
    ({"num_labels": 99_999_999_999}, r"num_labels=99999999999; allowed: an int in \[1, 131,072"),
    ({"text_config": {"vocab_size": -1}}, r"text_config.vocab_size=-1; allowed"),
    ({"num_hidden_layers": 4000, "num_local_experts": 4000}, r"4,000 layers x 4,000 experts"),
])
def test_plan_refuses_config_sizes_in_one_line(capsys, tmp_path, over, says):
    import re

    line = _one_line_error(_in_process(capsys, "plan", "--model", _write_config(tmp_path, **over),
                                       "--budget", "10%"), "plan")
    assert re.search(says, line), line


@pytest.mark.parametrize("content, says", [
    (b"{not json", "is not valid UTF-8 JSON"),
    (b"\x00\xff\xfe\x89PNG\r\n\x1a\n" * 50, "is not valid UTF-8 JSON"),
    (b"[1, 2, 3]", "holds a JSON list; allowed: a JSON object"),
    (b'{"model_type": "no-such-model"}', "cannot read the model config"),
    (b"[" * 100_000 + b"]" * 100_000, "is not valid UTF-8 JSON"),
])
def test_plan_bad_config_file_is_one_line(capsys, tmp_path, content, says):
    (tmp_path / "config.json").write_bytes(content)
    line = _one_line_error(_in_process(capsys, "plan", "--model", str(tmp_path), "--budget",
                                       "10%"), "plan")
    assert says in line and str(tmp_path / "config.json") in line


@pytest.mark.parametrize("labels", ["99999999999", "10000000", "0", "-3"])
def test_plan_num_labels_is_bounded_before_any_allocation(labels):
    """1e7 labels took 1.9 GB and 99999999999 ran for minutes: now one line, at once."""
    import time

    t0 = time.perf_counter()
    r = _nto("plan", "--model", "minilm", "--budget", "10%", "--num-labels", labels,
             timeout=60)
    line = _one_line_error(r, "plan")
    assert f"--num-labels {labels}; allowed: an int in [1, 131,072]" in line
    assert time.perf_counter() - t0 < 30


def test_plan_largest_num_labels_is_quick(capsys):
    assert cli.main(["plan", "--model", "minilm", "--budget", "100%", "--num-labels",
                     "131072", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["blocks"][-1]["name"] == "head" and p["blocks"][-1]["elements"] == 384 * 131072 \
        + 131072


def test_budget_env_and_huge_budget_are_one_line(capsys, tmp_path, monkeypatch):
    folder = _tiny_llama(tmp_path)
    line = _one_line_error(_in_process(capsys, "plan", "--model", folder, "--budget",
                                       "1" + "0" * 400 + "B"), "plan")
    assert "a byte budget must be at most 2**63-1 bytes" in line
    line = _one_line_error(_in_process(capsys, "plan", "--model", folder, "--budget", "\u00b2"),
                           "plan")
    assert "budget='\u00b2': cannot parse it" in line
    monkeypatch.setenv("NTO_EXT_BACKEND", "bogus")
    for cmd in (["backend"], ["plan", "--model", folder, "--budget", "10%"], ["demo"]):
        line = _one_line_error(_in_process(capsys, *cmd), cmd[0])
        assert "NTO_EXT_BACKEND='bogus'; allowed: reference, cpu, cuda" in line


def test_bogus_backend_from_the_console_script():
    env = dict(os.environ, NTO_EXT_BACKEND="bogus")
    r = subprocess.run([sys.executable, "-m", "nto_ext", "backend"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert "NTO_EXT_BACKEND='bogus'" in _one_line_error(r, "backend")


def test_demo_out_is_checked_before_training(capsys, tmp_path):
    a_file = tmp_path / "results"
    a_file.write_text("x")
    line = _one_line_error(_in_process(capsys, "demo", "--out", str(a_file)), "demo")
    assert f"--out {str(a_file)!r} is a file; allowed: a folder" in line
    under = a_file / "sub"
    line = _one_line_error(_in_process(capsys, "demo", "--out", str(under)), "demo")
    assert f"--out {str(under)!r} cannot be created or written" in line
    assert not list(tmp_path.glob("**/results.json"))


def test_demo_model_folder_without_weights(capsys, tmp_path):
    line = _one_line_error(_in_process(capsys, "demo", "--model", _tiny_llama(tmp_path)),
                           "demo")
    assert "has a config.json but no weights" in line


@pytest.mark.parametrize("args, says", [
    (["--device", "cpu:99"], "--device 'cpu:99': no such device on this machine; use cpu"),
    (["--device", "cpu:1"], "no such device"),
    (["--policy", "sparse", "--order", "ascending"],
     "--order ascending applies to --policy block only"),
    (["--policy", "sample", "--order", "random"], "--order random applies to --policy block"),
    (["--steps", "99999999999"], "--steps must be a positive int in [1, 1,000,000]"),
    (["--batch-size", "100000"], "--batch-size must be a positive int in [1, 4,096]"),
    (["--max-length", "100000000"], "--max-length must be a positive int in [1, 65,536]"),
    (["--max-length", "4096"], "--max-length 4096; allowed: 2 to 512, this model's"),
    (["--eval-size", "10000000"], "--eval-size must be a positive int in [1, 1,000,000]"),
    (["--switch-every", "99999999999"], "--switch-every must be a positive int in [1, "),
    (["--seed", "-1"], "--seed must be an int in [0, 2**63)"),
    (["--budget", "1" + "0" * 400 + "B"], "a byte budget must be at most 2**63-1"),
])
def test_demo_sizes_and_combinations_are_refused(capsys, args, says):
    line = _one_line_error(_in_process(capsys, "demo", *args), "demo")
    assert says in line


def test_plan_missing_folder(capsys, tmp_path):
    line = _one_line_error(_in_process(capsys, "plan", "--model", str(tmp_path), "--budget",
                                       "1GiB"), "plan")
    assert "has no config.json" in line


def test_plan_fit_table_and_json(tmp_path, capsys):
    folder = _tiny_llama(tmp_path)  # 28,832 fp32 elements: 115,328 bytes of weights
    assert cli.main(["plan", "--model", folder, "--fit", "300000", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["memory_bytes"], d["weights_bytes"]) == (300_000, 115_328)
    assert d["activation_bytes"] is None and d["margin_bytes"] == 15_000
    assert d["plan"]["budget"] == str(d["budget_elements"])
    assert d["plan"]["nto_bytes"] == d["state_bytes"]
    assert d["predicted_bytes"] == 115_328 + d["state_bytes"] + 15_000 <= 300_000
    assert cli.main(["plan", "--model", folder, "--fit", "300000", "--activation-bytes",
                     "50000", "--batch-size", "2", "--seq-len", "64", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert a["activation_bytes"] == 50_000 and a["budget_elements"] < d["budget_elements"]
    assert a["predicted_bytes"] == 115_328 + a["state_bytes"] + 50_000 + 15_000 <= 300_000
    assert cli.main(["plan", "--model", folder, "--fit", "300000", "--state-dtype", "int8",
                     "--switch-every", "3"]) == 0
    out = capsys.readouterr().out  # both suggestions repeat what was priced
    assert "policy='block', switch_every=3, state_dtype='int8')" in out
    assert "--switch-every 3 --state-dtype int8 shows what trains" in out
    assert cli.main(["plan", "--model", folder, "--fit", "300000"]) == 0
    table = capsys.readouterr().out
    for needle in ("memory stated", "weights", "training state", "activations", "unknown",
                   "NOT included", "margin", "headroom",
                   f"budget: {d['budget_elements']:,} elements"):
        assert needle in table


@pytest.mark.parametrize("args, says", [
    (["--fit", "1GiB", "--budget", "10%"], "argument --budget: not allowed with argument --fit"),
    (["--fit", "lots"], "fit='lots' is not a memory size; allowed: a byte size"),
    (["--fit", "10%"], "fit='10%' is not a memory size"),
    (["--fit", "100KiB"], "nothing fits under policy='block' (the weights alone exceed it); "
                          "the smallest footprint is"),
    (["--budget", "10%", "--seq-len", "64"], "--seq-len: used with --fit only"),
    (["--fit", "1GiB", "--batch-size", "0"], "batch_size=0; allowed"),
    (["--fit", "1GiB", "--activation-bytes", "many"], "activation_bytes='many'"),
    ([], "one of the arguments --budget --fit is required"),
])
def test_plan_fit_bad_input_is_one_line(capsys, tmp_path, args, says):
    line = _one_line_error(_in_process(capsys, "plan", "--model", _tiny_llama(tmp_path), *args),
                           "plan")
    assert says in line
