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
    # bf16 weights: NTO keeps fp32 moments (10 B/elem), AdamW bf16 ones (6 B/elem)
    assert cli.main(["plan", "--model", folder, "--budget", "10400", "--dtype", "bf16",
                     "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["nto_bytes"] == 10336 * 10 + 10 * 4 and p["adamw_bytes"] == 28_832 * 6 + 21 * 4
    assert cli.main(["plan", "--model", folder, "--budget", "10400"]) == 0
    table = capsys.readouterr().out
    assert "AdamW" in table and "8-bit AdamW" in table and "model.layers.1" in table


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


def test_plan_missing_folder(capsys, tmp_path):
    line = _one_line_error(_in_process(capsys, "plan", "--model", str(tmp_path), "--budget",
                                       "1GiB"), "plan")
    assert "has no config.json" in line
