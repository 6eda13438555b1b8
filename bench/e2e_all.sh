#!/usr/bin/env bash
# Every end-to-end run published in docs/results/e2e.md (and the README), one command:
#     bash bench/e2e_all.sh            # from the repo root, in the README's venv
# With --resume each line runs only the (configuration, seed) pairs missing from its JSON, so
# the script can be stopped and started again; delete docs/results/e2e_*.json to redo all.
# Each run is its own child process on one thread. On the 2-core CPU machine the whole set
# takes about 6 hours (SmolLM2 runs take 2-10 min each, MiniLM runs 1-4 min); two copies of
# a line with different --configs may run side by side (the JSON of a --tag is its own file,
# but two processes must never write the same one).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
e2e() { python bench/e2e.py --threads 1 --nice 10 --out docs/results --resume "$@"; }

# (a) all-MiniLM-L6-v2 on the tweets corpus: 150 steps of 16, 1,000 held-out, 3 seeds
A=(--task sentiment --steps 150 --eval-size 1000 --max-length 64 --batch-size 16)
e2e "${A[@]}" --seeds 0 1 2 --configs adamw nto-block-25 nto-block-10 nto-block-25-offload \
    nto-block-25-head nto-block-25-offload-head nto-sample-25 nto-sample-10 \
    nto-sample-10-head nto-sparse-25 nto-sparse-10 nto-sparse-7.5 badam lisa adamw8bit \
    torchao-adamw8bit lora
e2e "${A[@]}" --seeds 0 1 2 --tag offload36 --switch-every 36 \
    --configs nto-block-25 nto-block-25-offload
e2e "${A[@]}" --seeds 0 --tag lr1e-4 --lr nto=1e-4 --configs nto-block-25 nto-block-10
# the shorter run: 50 steps, 300 held-out
e2e --task sentiment --steps 50 --eval-size 300 --max-length 48 --batch-size 16 --tag 50steps \
    --seeds 0 1 2 --configs adamw nto-block-25 nto-block-10 nto-sample-25 nto-sample-10 \
    nto-sparse-25 nto-sparse-10
e2e --task sentiment --steps 50 --eval-size 300 --max-length 48 --batch-size 16 --tag 50steps \
    --seeds 0 --configs badam lisa adamw8bit lora

# (b) SmolLM2-135M on BBC News: 30 steps of 4 x 128 tokens, 4,096 held-out tokens
e2e --task lm --seeds 0 1 2 --configs adamw badam lisa lora adamw8bit
e2e --task lm --seeds 0 --configs nto-block-25 nto-block-10 nto-sample-10 nto-sparse-10
e2e --task lm --seeds 0 1 2 --tag lr2e-4 --lr full=2e-4 nto=2e-4 --configs nto-block-25 \
    nto-block-10 nto-sample-25 nto-sample-10 nto-sparse-25 nto-sparse-10 badam lisa
e2e --task lm --seeds 0 --tag lr2e-4 --lr full=2e-4 nto=2e-4 --configs adamw
# issue 21: order="importance" against the fixed order (block) and uniform draws (sample), 60
# steps with switch_every 2, so that cycles after the first (the weighted ones) fit in the run
e2e --task lm --steps 60 --switch-every 2 --seeds 0 1 2 --tag imp --lr full=2e-4 nto=2e-4 \
    --configs nto-block-10 nto-block-10-importance nto-sample-10 nto-sample-10-importance adamw
# 2026-12-04: row ranges (every weight trains, issue 21) and 8-bit moments (issue 20).
# int8 configs hold the bytes of fp32-state NTO at 10% (about 2x the elements) or run at 100%.
e2e "${A[@]}" --seeds 0 1 2 --tag rows --configs nto-block-10 nto-block-10-int8 nto-sample-10 \
    nto-sample-10-int8 nto-block-10-importance nto-sample-10-importance
e2e "${A[@]}" --seeds 0 1 2 --tag int8-lr1e-4 --lr nto=1e-4 --configs nto-block-100-int8
e2e --task lm --seeds 0 1 2 --tag lr5e-4 --lr full=5e-4 nto=5e-4 --configs nto-block-10 \
    nto-sample-10 nto-block-10-int8 nto-sample-10-int8
e2e --task lm --seeds 0 --tag lr1e-3 --lr full=1e-3 nto=1e-3 --configs nto-block-10 nto-sample-10
e2e --task lm --seeds 0 1 2 --tag int8 --configs nto-block-100-int8
# 2026-12-04 afternoon (issue 21): the new head in every period; a switch every step on the
# LM; one-seed probes of the period, the order and the learning rate.
e2e "${A[@]}" --seeds 0 1 2 --tag head --configs nto-block-10-head nto-sample-10-head
e2e "${A[@]}" --seeds 0 --switch-every 5 --tag sw5 --configs nto-block-10 nto-sample-10
e2e --task lm --seeds 0 1 2 --switch-every 1 --tag sw1 --lr nto=5e-4 --configs nto-block-10 \
    nto-sample-10
e2e --task lm --seeds 0 --switch-every 1 --tag sw1imp --lr nto=5e-4 \
    --configs nto-sample-10-importance nto-block-10-importance
e2e --task lm --seeds 0 --switch-every 1 --tag sw1-lr3e-4 --lr nto=3e-4 --configs nto-block-10
e2e --task lm --seeds 0 --switch-every 10 --tag sw10 --lr nto=5e-4 --configs nto-block-10
e2e --task lm --seeds 0 --switch-every 30 --tag sw30 --lr nto=5e-4 --configs nto-block-10
e2e "${A[@]}" --seeds 0 1 2 --tag head-lr5e-4 --lr nto=5e-4 --configs nto-block-10-head
e2e "${A[@]}" --seeds 0 1 2 --tag head-lr2e-4 --lr nto=2e-4 --configs nto-block-10-head
# 2026-12-04 evening (issues 20, 21): 8-bit moments in the bytes of fp32 10% with the
# afternoon's best settings (the head in every period; a switch every step on the LM); the
# state kept between periods on the LM (1 seed, stopped after sample); AdamW and block+head
# at 6 seeds.
e2e "${A[@]}" --seeds 0 1 2 --tag head-int8 --configs nto-block-10-head-int8
e2e "${A[@]}" --seeds 0 --tag head-int8-lr1e-4 --lr nto=1e-4 --configs nto-block-10-head-int8
e2e --task lm --seeds 0 1 2 --switch-every 1 --tag sw1-int8 --lr nto=5e-4 \
    --configs nto-sample-10-int8 nto-block-10-int8
e2e --task lm --seeds 0 --switch-every 1 --tag sw1-offload --lr nto=5e-4 \
    --configs nto-sample-10-offload
e2e "${A[@]}" --seeds 0 1 2 3 4 5 --tag head-lr5e-4 --lr nto=5e-4 --configs nto-block-10-head adamw
# 2026-12-04 night (issue 20): sparse with 8-bit moments in the bytes of fp32 sparse at 10% and
# 7.5% (= fp32-state block at 10%, 0.10x AdamW's bytes).
e2e "${A[@]}" --seeds 0 1 2 --tag sparse-int8 --configs nto-sparse-10-int8 nto-sparse-7.5-int8
e2e --task lm --seeds 0 1 2 --tag lr2e-4 --lr full=2e-4 nto=2e-4 --configs nto-sparse-10-int8
e2e "${A[@]}" --seeds 0 1 2 --tag head-int8-lr5e-4 --lr nto=5e-4 --configs nto-block-10-head-int8
# block with the head at 20%: the elements block-10-head-int8 trains at once, fp32 moments
e2e "${A[@]}" --seeds 0 1 2 --tag head-20 --configs nto-block-20-head
e2e "${A[@]}" --seeds 0 1 2 --tag head-int8-same --configs nto-block-10-head-int8-same
e2e "${A[@]}" --seeds 0 1 2 --tag sparse-int8 --configs nto-sparse-10-int8-same
e2e --task lm --seeds 0 1 2 --tag lr2e-4 --lr full=2e-4 nto=2e-4 --configs nto-sparse-10-int8-same
# sparse at LoRA's bytes (0.100x AdamW's) on the LM, fp32 and 8-bit moments
e2e --task lm --seeds 0 1 2 --tag lr2e-4 --lr full=2e-4 nto=2e-4 --configs nto-sparse-7.5
e2e --task lm --seeds 0 1 2 --tag lr2e-4-int8 --lr full=2e-4 nto=2e-4 --configs nto-sparse-7.5-int8
# a probe, stopped after one run (3.601: lr 5e-4 is too high for sparse on the LM)
e2e --task lm --seeds 0 --tag lr5e-4 --lr full=5e-4 nto=5e-4 --configs nto-sparse-7.5
# Issue 19 on a GPU (the lent H200, 2026-12-04 18:02 UTC; bf16 matmuls are ~16x slower than
# fp32 on this CPU): SmolLM2-135M in bf16 and in fp32, the two lines side by side. The model
# and the BBC corpus were carried to the device (the GGUF in two parts, staged under
# PYTHONPATH=/tmp/site; the gguf wheel installed with --no-deps). The bf16 line reached
# seeds 0 and 1 before the time limit.
#   e2e --task lm --device cuda --dtype bf16 --seeds 0 1 2 --lr full=5e-5 nto=5e-4 \
#       --tag gpu-bf16 --configs nto-block-10 nto-block-10-plain adamw
#   e2e --task lm --device cuda --seeds 0 1 2 --lr full=5e-5 nto=5e-4 --tag gpu-fp32 \
#       --configs nto-block-10 adamw
# bf16 moments (state_dtype="bf16") in the bytes of fp32 10%: ~1.5x the elements (issue 20)
e2e --task lm --seeds 0 1 2 --switch-every 1 --tag sw1-bf16m --lr nto=5e-4 \
    --configs nto-sample-10-bf16m
# 2026-12-04 night (issue 21, the LM): AdamW's rate between the two above; sparse at LoRA's
# bytes over its rate and regrowth period (one seed), and with one choice for the whole run
# (3 seeds); LoRA at 1e-3, sample-10-int8 at 7e-4 (one seed each)
e2e --task lm --seeds 0 1 2 --tag lr1e-4-full --lr full=1e-4 --configs adamw
e2e --task lm --seeds 0 --tag lr1e-4 --lr nto=1e-4 --configs nto-sparse-7.5
e2e --task lm --seeds 0 --tag lr3e-4 --lr nto=3e-4 --configs nto-sparse-7.5
e2e --task lm --seeds 0 --tag sparse-sw1 --switch-every 1 --lr nto=2e-4 --configs nto-sparse-7.5
e2e --task lm --seeds 0 --tag sparse-sw10 --switch-every 10 --lr nto=2e-4 --configs nto-sparse-7.5
e2e --task lm --seeds 0 1 2 --tag sparse-sw30 --switch-every 30 --lr nto=2e-4 --configs nto-sparse-7.5
e2e --task lm --seeds 0 1 2 --tag sparse-sw30-int8 --switch-every 30 --lr nto=2e-4 \
    --configs nto-sparse-7.5-int8
e2e --task lm --seeds 0 --tag lora-lr1e-3 --lr lora=1e-3 --configs lora
e2e --task lm --seeds 0 --switch-every 1 --tag sw1-int8-lr7e-4 --lr nto=7e-4 --configs nto-sample-10-int8
# after b598cac (sparse's first step, and each regrowth with one backward, updates the
# elements it chooses): the LM rows above at LoRA's bytes, one choice for the run; MiniLM
# sparse 7.5% / 10%; the 8-bit LM row at lr 1.5e-4
e2e --task lm --seeds 0 1 2 --tag sparse-sw30-step0 --switch-every 30 --lr nto=2e-4 \
    --configs nto-sparse-7.5
e2e --task lm --seeds 0 1 2 --tag sparse-sw30-int8-step0 --switch-every 30 --lr nto=2e-4 \
    --configs nto-sparse-7.5-int8
e2e "${A[@]}" --seeds 0 1 2 --tag sparse-step0 --configs nto-sparse-7.5 nto-sparse-10
e2e --task lm --seeds 0 1 2 --tag sparse-sw30-int8-lr1.5e-4 --switch-every 30 --lr nto=1.5e-4 \
    --configs nto-sparse-7.5-int8
# with a switch every step the moments are dropped unread: what a moment-free format would
# train in fp32-state 10%'s bytes (30%), against 25%, at three rates
e2e --task lm --seeds 0 1 2 --switch-every 1 --tag sw1-sample25 --lr nto=5e-4 --configs nto-sample-25
e2e --task lm --seeds 0 1 2 --switch-every 1 --tag sw1-sample30 --lr nto=5e-4 --configs nto-sample-30
e2e --task lm --seeds 0 1 2 --switch-every 1 --tag sw1-sample30-lr3e-4 --lr nto=3e-4 \
    --configs nto-sample-30
e2e --task lm --seeds 0 --switch-every 1 --tag sw1-sample30-lr2e-4 --lr nto=2e-4 --configs nto-sample-30
# 2026-12-05 (issue 21): no moments (state_dtype="none", 05a27a6) in fp32-state 10%'s bytes
e2e --task lm --seeds 0 1 2 --switch-every 1 --tag none-sample --lr nto=3e-4 --configs nto-sample-10-none
e2e --task lm --seeds 0 1 2 --switch-every 1 --tag none-block --lr nto=3e-4 --configs nto-block-10-none
# probes (one seed unless said): no moments on 60% / 100% of the elements, a switch every
# step (100%: every weight's update is AdamW's first, ~sign descent; 20% / 33% of AdamW's bytes)
e2e --task lm --seeds 0 --switch-every 1 --tag none-sample60 --lr nto=2e-4 --configs nto-sample-60-none-same
e2e --task lm --seeds 0 --switch-every 1 --tag none-sample100 --lr nto=1e-4 --configs nto-sample-100-none-same
e2e --task lm --seeds 1 --switch-every 1 --tag none-sample100-s1 --lr nto=1e-4 --configs nto-sample-100-none-same
e2e --task lm --seeds 2 --switch-every 1 --tag none-sample100-s2 --lr nto=1e-4 --configs nto-sample-100-none-same
e2e --task lm --seeds 0 --switch-every 1 --tag none-sample100-lr7e-5 --lr nto=7e-5 \
    --configs nto-sample-100-none-same
e2e --task lm --seeds 0 --switch-every 1 --tag none-sample100-lr1.5e-4 --lr nto=1.5e-4 \
    --configs nto-sample-100-none-same
# MiniLM, no moments in fp32-state 10%'s bytes, a switch every step (3 seeds; the head rows
# at four more rates: 1e-4 and 5e-5 3 seeds, 6e-4 and 1e-3 one seed)
e2e "${A[@]}" --seeds 0 1 2 --switch-every 1 --tag none-sample --configs nto-sample-10-none
e2e "${A[@]}" --seeds 0 1 2 --switch-every 1 --tag none-sample-head --configs nto-sample-10-head-none
for lr in 1e-4 5e-5; do
    e2e "${A[@]}" --seeds 0 1 2 --switch-every 1 --tag "none-sample-head-lr$lr" --lr "nto=$lr" \
        --configs nto-sample-10-head-none
done
for lr in 6e-4 1e-3; do
    e2e "${A[@]}" --seeds 0 --switch-every 1 --tag "none-sample-head-lr$lr" --lr "nto=$lr" \
        --configs nto-sample-10-head-none
done
e2e --task lm --seeds 0 --switch-every 1 --tag none-sample-imp --lr nto=3e-4 \
    --configs nto-sample-10-importance-none
# issue 21, 2026-12-05: every weight with no moments and the gradients used in backward
# (step_in_backward): the none-sample100 run's bits with no gradient kept
e2e --task lm --seeds 0 1 2 3 4 5 --switch-every 1 --tag none-bwd --lr nto=1e-4 \
    --configs nto-sample-10-none-bwd
# ... against LoRA and AdamW on the same six seeds
e2e --task lm --seeds 0 1 2 3 4 5 --tag lora-amd --configs lora
e2e --task lm --seeds 3 4 5 --tag lr1e-4-full --lr full=1e-4 --configs adamw
# ... and LoRA's bytes spent on 8-bit moments in backward (block, two periods; probes)
e2e --task lm --seeds 0 --switch-every 15 --tag int8-bwd-sw15 --lr nto=1e-4 \
    --configs nto-block-10-int8-bwd
e2e --task lm --seeds 0 --switch-every 10 --tag int8-bwd-sw10 --lr nto=1e-4 \
    --configs nto-block-10-int8-bwd
# ... every weight with 8-bit moments in backward (6 seeds, two files)
e2e --task lm --seeds 0 1 2 --tag int8-100-bwd --lr nto=1e-4 --configs nto-block-100-int8-bwd
e2e --task lm --seeds 3 4 5 --tag int8-100-bwd-s345 --lr nto=1e-4 --configs nto-block-100-int8-bwd
# update rules without kernels (bench/update_rules.py; docs/results/update_rules_lm.md)
U() { python bench/update_rules.py --task lm "$@"; }
U --rule factored-fp32 --lr 7e-5 && U --rule factored-fp32 --lr 1e-4 && U --rule factored-fp32 --lr 1.5e-4
U --rule factored-none --lr 1e-4 && U --rule factored-q8 --lr 1e-4 --seeds 0 1 2
for lr in 2e-5 4e-5 7e-5 1e-4; do U --rule lion-fp32 --lr $lr; done
U --rule adamw-q4 --lr 1e-4 --seeds 0 1 2 3 4 5
# issue 21: the 4-bit format's maps, probed before its kernel (docs/results/update_rules_lm.md)
U --rule adamw-q4sr --lr 1e-4 && U --rule adamw-mq4 --lr 1e-4
U --rule adamw-vq4 --lr 1e-4 && U --rule adamw-m11v11r --lr 1e-4
U --rule adamw-m5v3r --lr 1e-4 --seeds 0 1 2 && U --rule adamw-m5v3r64 --lr 1e-4 --seeds 0 4
# state_dtype="int4" (m5v3r64's map, NTO's kernel), every weight, in backward: LoRA's bytes
# (blocks of 128, commit 8dc3c86, are in the e2e_lm_int4-b128-100-bwd* files); seeds 6-8
# of it, LoRA and AdamW too
e2e --task lm --seeds 0 1 2 --tag int4-100-bwd --lr nto=1e-4 --configs nto-block-100-int4-bwd
e2e --task lm --seeds 3 4 5 --tag int4-100-bwd-s345 --lr nto=1e-4 --configs nto-block-100-int4-bwd
e2e --task lm --seeds 6 7 8 --tag int4-100-bwd-s678 --lr nto=1e-4 --configs nto-block-100-int4-bwd
e2e --task lm --seeds 6 7 8 --tag lora-amd --configs lora
e2e --task lm --seeds 6 7 8 --tag lr1e-4-full --lr full=1e-4 --configs adamw
# and on MiniLM (every weight, int4, in backward: 24.4 MiB, LoRA's 26.1)
e2e "${A[@]}" --seeds 0 2 --tag int4-100-bwd --lr nto=1e-4 --configs nto-block-100-int4-bwd
e2e "${A[@]}" --seeds 1 --tag int4-100-bwd-s1 --lr nto=1e-4 --configs nto-block-100-int4-bwd
# issue 21, SmolLM2: more seeds for int4 (every weight) and LoRA (2026-12-05), and the int4
# row with the tied embedding frozen by the user (BAdam's default): every other weight
# (LoRA's seed 18 was stopped and not rerun; the noembed seeds ran in four processes)
e2e --task lm --seeds $(seq 9 17) $(seq 19 25) --tag lora-amd-s9up --configs lora
e2e --task lm --seeds $(seq 9 16) --tag int4-100-bwd-s9up --lr nto=1e-4 --configs nto-block-100-int4-bwd
NE=(--task lm --lr nto=1e-4 --configs nto-block-100-int4-bwd-noembed)
e2e "${NE[@]}" --seeds $(seq 0 11) --tag int4-100-bwd-noembed
e2e "${NE[@]}" --seeds $(seq 20 25) --tag int4-100-bwd-noembed-b
e2e "${NE[@]}" --seeds 12 13 14 15 --tag int4-100-bwd-noembed-c
e2e "${NE[@]}" --seeds 16 17 18 19 --tag int4-100-bwd-noembed-d
# the same, every weight, the tied embedding in a param group at a tenth of the lr
EL=(--task lm --lr nto=1e-4 --configs nto-block-100-int4-bwd-embedlr10)
e2e "${EL[@]}" --seeds 0 2 4 6 8 10 12 14 16 18 --tag int4-100-bwd-embedlr10
e2e "${EL[@]}" --seeds 1 3 5 7 9 11 13 15 17 19 --tag int4-100-bwd-embedlr10-b
e2e "${EL[@]}" --seeds 20 22 24 --tag int4-100-bwd-embedlr10-c
e2e "${EL[@]}" --seeds 21 23 25 --tag int4-100-bwd-embedlr10-d
