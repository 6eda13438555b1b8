"""Index tensors changed by another thread while an op uses them (issue 17, item 1).

masked_adamw_ and gather_accumulate_ check their indices (sorted, unique, in range) and then
read and write through them with the GIL released, so a second Python thread can change an
index between the check and its use. The kernels read each index once, at its use, and
never dereference one that is out of range there: the op raises an IndexError naming the op
and the tensor after the pass instead of writing out of bounds.

Each case runs in a subprocess (a bad kernel would kill pytest with a segfault): the main
thread calls the op in a loop while a writer thread flips `indices[1][-1]` between its
valid value and 2**40 through a numpy view of the same memory (no torch call, no version
bump: as fast as a Python writer gets). The subprocess must exit normally; every error it
saw must be an IndexError/RuntimeError that names the op and `indices[1]`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from nto_ext import ops

# The subprocess: argv = op, grad kind ("dense"/"compact"/"-"), seconds, stop_at_use_error.
SCRIPT = textwrap.dedent(r"""
    import json, sys, threading, time
    import torch
    from nto_ext import ops

    op, grad_kind = sys.argv[1], sys.argv[2]
    seconds, stop_early = float(sys.argv[3]), sys.argv[4] == "1"
    torch.set_num_threads(1)  # leaves a core to the writer on a small machine
    assert ops.backend() != "reference", ops.backend()
    n = 1 << 18  # param / dense elements per tensor
    BIG = 2 ** 40
    # indices[0] plain, indices[1] raced; both sorted, unique, in range at the start: every
    # other position, then a run of consecutive ones (the kernels' contiguous fast path)
    idx = [torch.arange(0, n, 3, dtype=torch.int64),
           torch.cat([torch.arange(0, n // 2, 2), torch.arange(n // 2, n)]).to(torch.int64)]
    raw = idx[1].numpy()  # the same memory
    good = int(raw[-1])
    if op == "masked_adamw_":
        params = [torch.randn(n) for _ in idx]
        grads = [torch.randn(n) if grad_kind == "dense" else torch.randn(len(i)) for i in idx]
        m = [torch.zeros(len(i)) for i in idx]
        v = [torch.zeros(len(i)) for i in idx]
        steps = [torch.tensor(1.0) for _ in idx]
        call = lambda: torch.ops.nto.masked_adamw_(params, grads, m, v, idx, steps,
                                                   1e-3, 0.9, 0.999, 1e-8, 0.0)
    else:
        dense = [torch.randn(n) for _ in idx]
        compact = [torch.zeros(len(i)) for i in idx]
        call = lambda: torch.ops.nto.gather_accumulate_(dense, idx, compact)

    stop = False
    def writer():
        while not stop:
            raw[-1] = BIG
            raw[-1] = good
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    calls = check_errors = use_errors = 0
    unclear = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        calls += 1
        try:
            call()
        except (IndexError, RuntimeError, ValueError) as e:
            msg = str(e).splitlines()[0]
            if not (isinstance(e, (IndexError, RuntimeError)) and msg.startswith(op + ":")
                    and "indices[1]" in msg):
                unclear.append(f"{type(e).__name__}: {msg}")
            elif "changed" in msg:
                use_errors += 1
            else:
                check_errors += 1
            if use_errors and stop_early:
                break
    stop = True
    t.join()
    print(json.dumps(dict(calls=calls, check_errors=check_errors, use_errors=use_errors,
                          unclear=unclear[:3])))
    sys.exit(3 if unclear else 0)
""")


def _race(op: str, grad: str, seconds: float, stop_at_use_error: bool = False) -> dict:
    env = dict(os.environ, NTO_EXT_BACKEND="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT, op, grad, str(seconds),
                        "1" if stop_at_use_error else "0"],
                       capture_output=True, text=True, env=env, timeout=seconds + 120)
    assert r.returncode == 0, (
        f"{op} ({grad} grad) under a racing index writer: exit status {r.returncode} "
        f"(negative: killed by that signal, -11 = segfault)\nstdout: {r.stdout[-2000:]}\n"
        f"stderr: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _need_cpu_kernels():
    if ops.backend() == "reference":
        pytest.skip(f"the compiled CPU kernels are not loaded (backend {ops.backend()})")


CASES = [("masked_adamw_", "dense"), ("masked_adamw_", "compact"), ("gather_accumulate_", "-")]


@pytest.mark.slow
@pytest.mark.parametrize("op,grad", CASES)
def test_racing_index_writer_never_crashes(op, grad):
    _need_cpu_kernels()
    out = _race(op, grad, seconds=4.0)
    assert out["calls"] > 10, out  # the op really ran under the race


@pytest.mark.parametrize("op,grad", [("masked_adamw_", "dense"), ("gather_accumulate_", "-")])
def test_index_out_of_range_at_use_raises(op, grad):
    """An index that passes the check and is out of range when the kernel reads it raises
    the use-time IndexError (the race is hit within milliseconds; up to 20 s allowed)."""
    _need_cpu_kernels()
    out = _race(op, grad, seconds=20.0, stop_at_use_error=True)
    assert out["use_errors"] >= 1, out
