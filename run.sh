#!/usr/bin/env bash
# bash run.sh demo                 fine-tune ResNet-18 on the bundled RetinaMNIST (CPU, a few minutes)
# bash run.sh [DATASET ...]        RETFound benchmark from configs/<dataset>.yaml (default: all eight)
# bash run.sh SEED_PRESET ...      a seed system from configs/<preset>.yaml: multilabel_effb4, external_eye_effb4,
#                                  dr_regression_effv2m, odir_dual_convnext, odir_dual_resnet50, odir_dual_retfound
#
# Environment: DATA_ROOT (default ./data) holds one folder per dataset (train/ val/ test/ <class>/);
# WEIGHTS_DIR (default ./weights) holds RETFound_mae_meh.pth or .pdparams; OUTPUT_DIR (default ./output_dir);
# PYTHON (default python); NPROC (default 1) > 1 trains data-parallel with paddle.distributed.launch.
# Extra flags after "--" go to every run, e.g. bash run.sh octid -- --epochs 50 --lr 5e-4
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
DATA_ROOT=${DATA_ROOT:-./data}
WEIGHTS_DIR=${WEIGHTS_DIR:-./weights}
OUTPUT_DIR=${OUTPUT_DIR:-./output_dir}
NPROC=${NPROC:-1}

names=()
extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  names+=("$1"); shift
done

launch() {
  if [ "$NPROC" -gt 1 ]; then
    "$PYTHON" -m paddle.distributed.launch --nproc_per_node "$NPROC" main_finetune.py "$@"
  else
    "$PYTHON" main_finetune.py "$@"
  fi
}

if [ "${names[0]:-}" = "demo" ]; then
  launch --config configs/demo_retinamnist.yaml --output_dir "$OUTPUT_DIR" "${extra[@]}" || exit $?
  "$PYTHON" tools/summarize_runs.py --demo "$OUTPUT_DIR/demo_retinamnist"
  exit $?
fi

declare -A folder=(
  [octid]=OCTID [retina]=Retina [aptos2019]=APTOS2019 [jsiec]=JSIEC
  [idrid]=IDRiD [messidor2]=MESSIDOR2 [papila]=PAPILA [glaucoma_fundus]=Glaucoma_fundus
)
# seed presets: data under DATA_ROOT (see each preset's header), weights in WEIGHTS_DIR
declare -A seed_data=(
  [multilabel_effb4]=multilabel_fundus/labels_image_centric_4_class_clean.csv
  [external_eye_effb4]=external_eye
  [dr_regression_effv2m]=dr_grading/labels.csv
  [odir_dual_convnext]=ODIR-5K/data.xlsx
  [odir_dual_resnet50]=ODIR-5K/data.xlsx
  [odir_dual_retfound]=ODIR-5K/data.xlsx
)
[ ${#names[@]} -eq 0 ] && names=(octid retina aptos2019 jsiec idrid messidor2 papila glaucoma_fundus)

runs=()
failed=0
# run_preset NAME DATA TASK: one preset on its data, the run folder added to the summary
run_preset() {
  echo "=== $1: $2 -> $OUTPUT_DIR/$3"
  if ! launch --config "configs/$1.yaml" --data_path "$2" --weights_dir "$WEIGHTS_DIR" \
      --output_dir "$OUTPUT_DIR" --task "$3" "${extra[@]}"; then
    echo "run.sh: $1 failed" >&2; failed=1
  fi
  runs+=("$OUTPUT_DIR/$3")
}
for name in "${names[@]}"; do
  if [ -n "${seed_data[$name]:-}" ]; then
    data="$DATA_ROOT/${seed_data[$name]}"
    if [ ! -e "$data" ]; then
      echo "skipping $name: $data not found (see configs/$name.yaml for the expected files)"
      continue
    fi
    run_preset "$name" "$data" "$name"
    continue
  fi
  if [ -z "${folder[$name]:-}" ]; then
    echo "run.sh: unknown dataset '$name' (known: demo ${!folder[*]} ${!seed_data[*]})" >&2; exit 2
  fi
  data="$DATA_ROOT/${folder[$name]}"
  if [ ! -d "$data" ]; then
    echo "skipping $name: $data not found (put the ${folder[$name]} train/val/test class folders there)"
    continue
  fi
  run_preset "$name" "$data" "RETFound_mae_meh-${folder[$name]}"
done
if [ ${#runs[@]} -gt 0 ]; then
  echo; echo "Test metrics per dataset:"
  "$PYTHON" tools/summarize_runs.py "${runs[@]}"
fi
exit $failed
