"""Backward cost of gradient checkpointing with frozen lower layers (issue 6 measurement).

transformers 5 keeps embedding outputs requiring grad (enable_input_require_grads) when
checkpointing, so backward runs through every frozen layer; nto_ext.hf's fix
(enable_checkpoint_input_grads) removes that hook and marks inputs only where a trainable
layer is checkpointed. Run: python bench/hf_ckpt_bench.py
"""
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nto_ext.hf import enable_checkpoint_input_grads


def model(reentrant: bool):
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                                     num_attention_heads=8, num_key_value_heads=4,
                                     vocab_size=1024))
    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    m.train()
    for n, p in m.named_parameters():  # what NTO does when the top layer trains
        p.requires_grad_("layers.7." in n)
    return m


def step_time(m, x, reps=6):
    for i in range(reps + 2):
        if i == 2:
            t = time.perf_counter()
        m(input_ids=x, labels=x).loss.backward()
        m.zero_grad()
    return (time.perf_counter() - t) / reps


x = torch.randint(0, 1024, (4, 256))
torch.set_num_threads(2)
for reentrant in (False, True):
    m = model(reentrant)
    base = step_time(m, x)
    h = enable_checkpoint_input_grads(m)
    fixed = step_time(m, x)
    print(f"use_reentrant={reentrant}: transformers default {base * 1e3:.0f} ms/step, "
          f"nto_ext fix {fixed * 1e3:.0f} ms/step ({base / fixed:.2f}x)")
