# The GPU runs issue #4 still owes (README, "Still owed"), as lanes for lease.sh. A lease of 30
# device minutes holds about 20 minutes of runs: pick the lanes that fit, in this order (the LM
# lane first: issue #4 names the LM full size), and delete the others from a copy. GLUE and
# SQuAD need the MiniLM bundle
# (`python -m benchmarks.offline_bundle pack --models minilm --data glue,squad-v2-cs224n`);
# the LM lane needs SmolLM2's and gguf's as well (the default `pack` carries them all: 8 parts
# at `--part-mb 27`, the size that fits beside the 36.1 MB of tracked files of the evening of
# 2026-12-07, where 30 MB parts no longer did; a bundle packed before 2026-12-07 13:20 lacks
# gguf's dist-info, without which transformers 5.17 cannot load the GGUF: pack it again). The
# LM lane alone needs only SmolLM2 and WikiText-2 (`pack --models smollm2 --data wikitext-2
# --part-mb 27`: 4 parts, half the calls); SQuAD's alone, MiniLM and SQuAD (`pack --models
# minilm --data squad-v2-cs224n --part-mb 27`: 4 parts). With `--folders` each part lands in a
# folder of its own, p0, p1, ..., for `lease.sh stash`.
# shellcheck shell=bash disable=SC2034
FULL=(--size full --device cuda --data-dir "$DATA" --out-dir "$RESULTS/compare-full" --no-plot)
NOT_SVD=full-adamw,lora-sgd,lora-adamw,loraplus,precond-sgd,precond-adamw,lora-pro,lorsum-x1-nomom,lorsum-x1,lorsum-x2,lorsum-x8,scaled-kfac,scaled-shampoo

# The LM full size's own rates around the quick size's, then 3 seeds. Both rounds of the sweep
# ran on 2026-12-07 and settled every method; the seeds of LoRSum with 1 sweep (seed 1), with 2
# sweeps and ScaledLoRSum-Shampoo (5 runs) are what is left: the chain skips the stored runs. A
# run holds about 10 to 11 GB of the GPU at its peak (full fine-tuning 12.3 GB). In the fifth
# lease 5 of the 8 seed runs then owed ran out of memory: 4 LM processes (10.8 GiB each) met 10
# SQuAD processes of 3.3 to 4.1 GiB each (logs/2026-12-07-h100-lease5-lane-lm.log). A SQuAD
# run's tensors peak at 1.8 to 2.3 GiB (`cuda_max_allocated_bytes`); its process holds more, the
# CUDA context and the allocator's cache. Budget a GPU by the processes' figure: 3 LM runs at a
# time (about 33 GB) leave room for the 6 SQuAD runs (about 25 GB) in the same lease.
lane_lm() {
  chain lm-full-own -- --task lm "${FULL[@]}" --methods "$NOT_SVD" --jobs 3 \
    --lr-from "$RESULTS/compare/lm-summary.json"
}

# SVDLoRA alone on the GPU is 3 to 7 times faster than beside other runs: run it in a lease of
# its own, or last. STS-B's seeds at the rate its sweep chose (0.001), then SST-2's own rate: its
# quick rate (0.1) collapses at the full size, so the sweep starts two half decades below it.
# Alone on the H200 one SST-2 run took 647 s.
lane_svdlora() {
  compare --task glue "${FULL[@]}" --variants stsb --methods svdlora --lr 0.001 --seeds 3 \
    --jobs 2 --name glue-svdlora-stsb-seeds
  chain glue-sst2-svdlora-own --around=-2,-1,0 -- --task glue "${FULL[@]}" --variants sst2 \
    --methods svdlora --jobs 2
  # The LM full size's own rate for SVDLoRA too (the sweep above left it out for its cost: 1,032 s
  # a run with 2 to 12 sharing the H200), so that its tuned table holds the step LoRSum approaches.
  chain lm-full-own-svdlora -- --task lm "${FULL[@]}" --methods svdlora --jobs 3 \
    --lr-from "$RESULTS/compare/lm-summary.json"
  # SQuAD beyond the quick size: its 604 steps at SST-2's rate and a half decade either side, as
  # the other methods' sweep (squad-604) ran, then 3 seeds.
  chain squad-604-svdlora -- --task squad "${FULL[@]}" --steps 604 --methods svdlora --jobs 3 \
    --lr-from "$RESULTS/compare/glue-summary.json:sst2"
}

# SQuAD at 604 steps (4 epochs): each method's rate around its SST-2 rate (the centre is stored
# from the probe), then 3 seeds. The fifth lease ran the sweep's three rounds and all seeds but
# those of LoRSum without momentum and with 1 and 2 sweeps (6 runs, 3.3 to 4.1 GiB each), which
# the chain resumes.
lane_squad() {
  chain squad-604 -- --task squad "${FULL[@]}" --steps 604 --methods "$NOT_SVD" --jobs 6 \
    --lr-from "$RESULTS/compare/glue-summary.json:sst2"
}
