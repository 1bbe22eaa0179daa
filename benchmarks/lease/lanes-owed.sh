# The GPU runs issue #4 still owes (README, "Still owed"), as lanes for lease.sh. A lease of 30
# device minutes holds about 20 minutes of runs: pick the lanes that fit (the LM lane first:
# issue #4 names the LM full size) and delete the others from a copy. The LM lane needs SmolLM2,
# gguf and WikiText-2 (`python -m benchmarks.offline_bundle pack --models smollm2 --data
# wikitext-2 --part-mb 27 --folders`: 4 parts); the SST-2 lane MiniLM and GLUE (`pack --models
# minilm --data glue --part-mb 27 --folders`). Parts of 27 MB fit a call beside the 36.1 MB of
# tracked files of the evening of 2026-12-07, where 30 MB parts no longer did; a bundle packed
# before 2026-12-07 13:20 lacks gguf's dist-info, without which transformers 5.17 cannot load the
# GGUF: pack it again. With `--folders` each part lands in a folder of its own, p0, p1, ..., for
# `lease.sh stash`.
# shellcheck shell=bash disable=SC2034
FULL=(--size full --device cuda --data-dir "$DATA" --out-dir "$RESULTS/compare-full" --no-plot)

# What is left is SVDLoRA's: its own rate at the LM full size, which the LM sweep (lm-full-own,
# finished on 2026-12-07 with 3 seeds for all 13 other methods) left out for its cost, and, for
# the record, its SST-2 sweep and seeds on the GPU (the CPU's stand in for them). Its SQuAD sweep
# and seeds at 604 steps and its STS-B seeds ran in the sixth lease of 2026-12-07. An LM run
# holds about 10 to 11 GiB of the GPU (a process, with the CUDA context and the allocator's
# cache); before SVDLoRA stepped its stacks in one batched SVD an LM run took 1,032 s with 2 to 12
# sharing the H200. SVDLoRA alone on the GPU is 3 to 7 times faster than beside other runs: give
# it a lease of its own.
# Seed 0 at the quick rate, 0.03, is stored; the sweep's first round adds 0.01 and 0.1. Seeds 1
# and 2 at 0.03 train beside that round rather than after it, so that the 4 runs share one wave:
# 0.03 is also the full size's rate of LoRSum with 8 sweeps, the method nearest SVDLoRA's step,
# and at 0.1 that one diverged (761.76). The chain then finds the round stored and goes on: it
# re-centres the grid if the choice sits at an end, and trains the seeds of the chosen rate,
# none if that is 0.03.
lane_svdlora_lm() {
  local lm=(--task lm "${FULL[@]}" --methods svdlora --jobs 2)
  compare "${lm[@]}" --lr 0.03 --seeds 3 --name lm-full-own-svdlora-early-seeds &
  compare "${lm[@]}" --lr-from "$RESULTS/compare/lm-summary.json" --lr-sweep-around=-1,0,1 \
    --seeds 1 --name lm-full-own-svdlora-s1 &
  wait
  chain lm-full-own-svdlora -- "${lm[@]}" --lr-from "$RESULTS/compare/lm-summary.json"
}

# SST-2's own rate: its quick rate (0.1) collapses at the full size, so the sweep starts two half
# decades below it. Alone on the H200 one SST-2 run took 647 s (before the batched SVD).
lane_svdlora_sst2() {
  chain glue-sst2-svdlora-own --around=-2,-1,0 -- --task glue "${FULL[@]}" --variants sst2 \
    --methods svdlora --jobs 2
}
