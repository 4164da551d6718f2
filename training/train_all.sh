#!/usr/bin/env bash
# Make every shipped toy-model artefact from nothing, in order, and record the wall time of each
# stage in training/work/timings.json. The thread counts are the ones the shipped files were made
# with (the results depend on them); extra arguments (e.g. --device cuda) go to every script.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
python training/train_probe.py --threads 1 "$@"
python training/train_multistep.py --threads 2 "$@"
python training/distill_fewstep.py --threads 2 "$@"
echo "all stages: $(( ($(date +%s) - start) / 60 )) min"
