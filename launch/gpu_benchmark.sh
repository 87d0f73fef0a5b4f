#!/usr/bin/env bash
# BENCHMARKS.md's GPU table, on a bare GPU machine: one that has jax (with
# CUDA), flax, optax, orbax-checkpoint, absl-py, numpy and Pillow, as GPU
# images ship them, and none of capjax's data and metric libraries
# (TensorFlow, TFDS, grain, clu, nltk, simplejpeg, ...), which
# the train, decode and SCST benchmarks do not import (tests/test_imports.py
# blocks all of pyproject.toml's dependencies that such a machine lacks).
#
# capjax is installed without its dependencies, from this checkout; of those,
# the benchmarks need one more, ml-collections (pure Python; its own
# dependencies, absl-py and PyYAML, come with flax and orbax-checkpoint).
# Without a package index, pip takes it, and setuptools to build capjax, from
# a folder of wheels made where PyPI is reachable, in the checkout:
#
#   pip download --no-deps --only-binary=:all: -d .whl \
#       ml-collections==1.1.0 setuptools==84.2.1
#
# Then, on the GPU machine, in the checkout:
#
#   launch/gpu_benchmark.sh                  # JSON in runs/gpu_benchmark/
#   CUDA_VISIBLE_DEVICES=0 OUT=/results launch/gpu_benchmark.sh   # one GPU
#
# BENCHMARKS.md's table is for one GPU: the benchmarks use every visible
# device, data parallel.
#
# Environment:
#   OUT      folder for the JSON results (default runs/gpu_benchmark)
#   WHEELS   folder of the wheels above (default .whl)
#   PYTHON   the interpreter with jax (default python3)
#   INSTALL  0: capjax is installed already, skip pip
#   SMOKE    1: the same commands at a tiny, CPU-sized scale (configs/test.py,
#            one step, one repeat), to check an installation (4 to 5 minutes
#            on 2 CPU cores)
#   DECODERS 0: skip the three decoders' features and decode benchmarks
#            (three more processes, each compiling its own steps)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/gpu_benchmark}
WHEELS=${WHEELS:-.whl}
PYTHON=${PYTHON:-python3}

run() { echo "+ $*"; "$@"; }

if [ "${INSTALL:-1}" = 1 ]; then
  if [ ! -d "$WHEELS" ]; then
    echo "gpu_benchmark.sh: no wheel folder $WHEELS: download it as the" \
         "header of $0 says, or set WHEELS (or INSTALL=0)" >&2
    exit 1
  fi
  # --no-index: nothing comes from the network, not even the build backend.
  run "$PYTHON" -m pip install --no-index --find-links "$WHEELS" \
      ml-collections
  run "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --no-deps \
      -e .
fi

if [ "${SMOKE:-0}" = 1 ]; then
  ce=(--config=configs/test.py --per_device_batch=2 --batch=8 --beams=1,3
      --steps=1 --repeats=1 --vocab_size=100)
  sc=(--config=configs/test.py --per_device_batch=2 --steps=1 --repeats=1
      --vocab_size=100)
  dec=(--per_device_batch=2 --batch=8 --steps=1 --repeats=1 --vocab_size=100)
  decoders=(configs/test.py:show_attend_tell configs/test.py:updown
            configs/test.py:transformer)
else
  # The commands of BENCHMARKS.md's GPU section.
  ce=(--config=configs/coco.py --per_device_batch=32,64,128 --batch=1024)
  sc=(--config=configs/coco_scst.py --per_device_batch=32,64)
  dec=(--per_device_batch=32 --batch=1024)
  decoders=(configs/coco.py:show_attend_tell configs/coco_updown.py:updown
            configs/coco_transformer.py:transformer)
fi

mkdir -p "$OUT"
run "$PYTHON" -m capjax.benchmark "${ce[@]}" --config.model.dtype=bfloat16 \
    --what=train,decode --json="$OUT/train_decode.json"
run "$PYTHON" -m capjax.benchmark "${sc[@]}" --config.model.dtype=bfloat16 \
    --what=scst --json="$OUT/scst.json"
# Each decoder: its frozen-encoder train and SCST steps from images and from
# the feature cache, and beam 3.
[ "${DECODERS:-1}" = 1 ] || decoders=()
for spec in "${decoders[@]}"; do
  run "$PYTHON" -m capjax.benchmark --config="${spec%%:*}" "${dec[@]}" \
      --config.model.decoder.name="${spec#*:}" --config.model.dtype=bfloat16 \
      --what=features,decode --beams=3 --json="$OUT/decoder_${spec#*:}.json"
done

# The same results as Markdown tables, for BENCHMARKS.md.
tables=("$OUT/train_decode.json" "$OUT/scst.json")
for spec in "${decoders[@]}"; do tables+=("$OUT/decoder_${spec#*:}.json"); done
"$PYTHON" - "${tables[@]}" <<'EOF'
import json
import sys

ce, scst, *decoders = (json.load(open(path)) for path in sys.argv[1:])
fmt = lambda v, spec: '-' if v is None else format(v, spec)
print(f'\n{ce["device"]} x{ce["devices"]}, {ce["dtype"]}, jax {ce["jax"]}\n')
print('| encoder | batch/device | images/s | tokens/s | ms/step '
      '| GFLOP/step/device | GFLOP/image | MFU | peak GiB |')
print('|---|--:|--:|--:|--:|--:|--:|--:|--:|')
for r in ce['train']:
  mfu = '-' if r['mfu'] is None else f'{100 * r["mfu"]:.1f}%'
  print(f'| {r["encoder"]} | {r["per_device_batch"]} '
        f'| {r["images_per_second"]:,.0f} | {r["tokens_per_second"]:,.0f} '
        f'| {1e3 * r["step_seconds"]:.1f} '
        f'| {fmt(r["gflop_per_step_per_device"], ",.1f")} '
        f'| {fmt(r.get("gflop_per_image"), ",.2f")} '
        f'| {mfu} | {fmt(r["peak_memory_gib"], ".1f")} |')
print('\n| beam | batch | captions/s | ms/batch |\n|--:|--:|--:|--:|')
for r in ce['decode']:
  print(f'| {r["beam"]} | {r["batch"]} | {r["captions_per_second"]:,.0f} '
        f'| {1e3 * r["seconds"]:.1f} |')
print('\n| batch/device | samples | baseline | CE ms/step | SCST ms/step '
      '| SCST/CE | reward ms | reward share |')
print('|--:|--:|---|--:|--:|--:|--:|--:|')
for r in scst['scst']:
  print(f'| {r["per_device_batch"]} | {r["samples"]} | {r["baseline"]} '
        f'| {1e3 * r["cross_entropy_step_seconds"]:.1f} '
        f'| {1e3 * r["scst_step_seconds"]:.1f} '
        f'| {r["scst_over_cross_entropy"]:.2f} '
        f'| {1e3 * r["reward_seconds"]:.2f} '
        f'| {100 * r["reward_fraction"]:.1f}% |')
print('\n| decoder | train images/s: images | features | SCST ms/step: '
      'images | features | beam 3 captions/s |\n|---|--:|--:|--:|--:|--:|')
for path, r in zip(sys.argv[3:], decoders):
  f = r['features']
  print(f'| {path.rsplit("decoder_", 1)[1][:-5]} '
        f'| {f["train_images"]["images_per_second"]:,.0f} '
        f'| {f["train_features"]["images_per_second"]:,.0f} '
        f'| {1e3 * f["scst_images"]["scst_step_seconds"]:.1f} '
        f'| {1e3 * f["scst_features"]["scst_step_seconds"]:.1f} '
        f'| {r["decode"][0]["captions_per_second"]:,.0f} |')
EOF
