#!/usr/bin/env bash
# Make every shipped toy-model artefact from nothing, in order, and record the wall time of each
# stage in training/work/timings.json. Extra arguments (e.g. --threads 2) go to every script.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
python training/train_probe.py "$@"
python training/train_multistep.py "$@"
python training/distill_fewstep.py "$@"
echo "all stages: $(( ($(date +%s) - start) / 60 )) min"
