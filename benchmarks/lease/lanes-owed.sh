# The runs of the README's results that a GPU has not made yet (README, "Not on a GPU"), as
# lanes for lease.sh. A lease of 30 device minutes holds about 20 minutes of runs. The SST-2 lane
# needs MiniLM and GLUE (`python -m benchmarks.offline_bundle pack --models minilm --data glue
# --part-mb 27 --folders`). Parts of 27 MB fit a call beside the 37.1 MB of tracked files of the
# night of 2026-12-07, where 30 MB parts no longer did. With `--folders` each part lands in a
# folder of its own, p0, p1, ..., for `lease.sh stash`.
# shellcheck shell=bash disable=SC2034
FULL=(--size full --device cuda --data-dir "$DATA" --out-dir "$RESULTS/compare-full" --no-plot)

# What is left is SVDLoRA's SST-2 sweep and seeds on the GPU, for the record: the CPU made them,
# with the same configuration and seeds. Its LM sweep and seeds ran in the seventh lease of
# 2026-12-07 (lm-full-own-svdlora-*), its SQuAD sweep and seeds at 604 steps and its STS-B seeds
# in the sixth. SVDLoRA steps its stacks in one batched SVD since commit aa21f74; with it an LM
# run took 225 s alone on an H100 and 307-313 s four at a time, so sharing now buys throughput.
# SST-2's own rate: its quick rate (0.1) collapses at the full size, so the sweep starts two half
# decades below it. Alone on the H200 one SST-2 run took 647 s (before the batched SVD).
lane_svdlora_sst2() {
  chain glue-sst2-svdlora-own --around=-2,-1,0 -- --task glue "${FULL[@]}" --variants sst2 \
    --methods svdlora --jobs 2
}
