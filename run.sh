#!/usr/bin/env bash
# bash run.sh demo                 fine-tune ResNet-18 on the bundled RetinaMNIST (CPU, a few minutes)
# bash run.sh [DATASET ...]        RETFound benchmark from configs/<dataset>.yaml (default: all eight): octid,
#                                  retina, aptos2019, jsiec, idrid, messidor2, papila, glaucoma_fundus
# bash run.sh SEED_PRESET ...      a seed system from configs/<preset>.yaml: multilabel_effb4, external_eye_effb4,
#                                  dr_regression_effv2m, odir_dual_convnext, odir_dual_resnet50, odir_dual_retfound
# bash run.sh NAME ... --seeds N   each run repeated with N seeds (mean and 95% CI per metric; the RETFound
#                                  paper's protocol is --seeds 5); --kfold K: K-fold cross-validation instead
# bash run.sh -h | --help          this text
#
# Environment: DATA_ROOT (default: the repository's data/) holds one folder per dataset (train/ val/ test/
# <class>/); WEIGHTS_DIR (default: the repository's weights/) holds RETFound_mae_meh.pth or .pdparams;
# OUTPUT_DIR (default: the repository's output_dir/). Relative paths in these three (and in PYTHON) are taken
# from the folder run.sh is called from. PYTHON (default python); NPROC (default 1) > 1 trains data-parallel
# with paddle.distributed.launch.
# With --seeds N (or --kfold K) each run folder holds the N sub-runs and seeds_summary.md (kfold_summary.md);
# the summary table shows their mean with its 95% t-interval. Running the same command again keeps the
# sub-runs that finished and resumes a stopped one.
# Extra flags after "--" go to every run, e.g. bash run.sh octid -- --epochs 50 --lr 5e-4. The runs start in
# the repository, so relative paths inside these flags are taken from there. The run folder under OUTPUT_DIR
# is the preset's (RETFound_mae_meh-OCTID, multilabel_effb4); with --model X among the flags it is named
# after X (X-OCTID; multilabel_effb4-X) unless X is the preset's own model, and --task NAME names it outright.
#
# Data: every dataset or preset named must have its data (the file or folder under DATA_ROOT that the header
# of configs/<name>.yaml describes); this is checked before anything trains. With no names, the benchmarks
# without data are skipped, each with a line, and listed again after the summary table.
# Exit status: 0 every run finished (with no names: every benchmark that has data); 1 a run failed;
# 2 an unknown name or option, or demo given with other names (it runs on its own); 3 data missing (for a
# name given, or with no names for all eight benchmarks).
set -uo pipefail
# absolute DIR PATH: PATH made absolute from DIR (an absolute PATH as it is)
absolute() { case $2 in /*) printf '%s\n' "$2" ;; *) printf '%s\n' "$1/${2#./}" ;; esac; }
# user-given relative paths are the caller's; the defaults below are the repository's (run.sh works there)
[ -n "${DATA_ROOT:-}" ] && DATA_ROOT=$(absolute "$PWD" "$DATA_ROOT")
[ -n "${WEIGHTS_DIR:-}" ] && WEIGHTS_DIR=$(absolute "$PWD" "$WEIGHTS_DIR")
[ -n "${OUTPUT_DIR:-}" ] && OUTPUT_DIR=$(absolute "$PWD" "$OUTPUT_DIR")
case ${PYTHON:-} in */*) PYTHON=$(absolute "$PWD" "$PYTHON") ;; esac  # a path, not a command looked up in PATH
cd "$(dirname "$0")" || exit 1
PYTHON=${PYTHON:-python}
DATA_ROOT=${DATA_ROOT:-./data}
WEIGHTS_DIR=${WEIGHTS_DIR:-./weights}
OUTPUT_DIR=${OUTPUT_DIR:-./output_dir}
NPROC=${NPROC:-1}

names=()
extra=()
protocol=()  # --seeds N / --kfold K, for every run
while [ $# -gt 0 ]; do
  case $1 in
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' run.sh; exit 0 ;;  # the header above
    --seeds|--kfold|--seeds=*|--kfold=*)
      opt=${1%%=*}; if [[ $1 == *=* ]]; then value=${1#*=}; shift; else value=${2:-}; shift $(( $# > 1 ? 2 : 1 )); fi
      if ! [[ $value =~ ^[0-9]+$ ]] || [ "$value" -lt 2 ]; then
        echo "run.sh: $opt '$value': not a count of 2 or more (runs per dataset); e.g. bash run.sh octid $opt 5" >&2
        exit 2
      fi
      protocol+=("$opt" "$value"); continue ;;
    -*) echo "run.sh: unknown option '$1' (run.sh takes dataset or preset names; flags for main_finetune.py go" \
          "after '--'); e.g. bash run.sh octid -- $1 ..., or see bash run.sh --help" >&2; exit 2 ;;
  esac
  names+=("$1"); shift
done

launch() {
  if [ "$NPROC" -gt 1 ]; then
    "$PYTHON" -W "ignore:No ccache found" -m paddle.distributed.launch --log_level WARNING \
      --nproc_per_node "$NPROC" main_finetune.py "$@"
  else
    "$PYTHON" main_finetune.py "$@"
  fi
}

if [ ${#names[@]} -gt 1 ] && [[ " ${names[*]} " == *" demo "* ]]; then
  echo "run.sh: demo: given with other names (${names[*]}), but the demo runs on its own (bash run.sh demo" \
    "[-- flags]); run it by itself" >&2
  exit 2
fi
if [ "${names[0]:-}" = "demo" ]; then
  launch --config configs/demo_retinamnist.yaml --output_dir "$OUTPUT_DIR" "${extra[@]}" "${protocol[@]}" || exit $?
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
benchmarks=(octid retina aptos2019 jsiec idrid messidor2 papila glaucoma_fundus)
seeds=(multilabel_effb4 external_eye_effb4 dr_regression_effv2m odir_dual_convnext odir_dual_resnet50
  odir_dual_retfound)
all=0
[ ${#names[@]} -eq 0 ] && { all=1; names=("${benchmarks[@]}"); }
root=$(absolute "$PWD" "$DATA_ROOT")

# did_you_mean NAME: "did you mean 'x'? " for the known names close to NAME (difflib, as the model registry
# does) or starting with it
did_you_mean() {
  "$PYTHON" -c 'import difflib, sys
name, known = sys.argv[1].lower(), sys.argv[2:]
hits = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
hits += [k for k in known if len(name) > 2 and k.startswith(name) and k not in hits][:3 - len(hits)]
print("did you mean " + ", ".join(repr(h) for h in hits) + "? " if hits else "", end="")' \
    "$1" demo "${benchmarks[@]}" "${seeds[@]}" 2>/dev/null
}

# present WANT: the file (a name with a dot) or folder WANT exists under DATA_ROOT
present() { if [[ $1 == *.* ]]; then [ -f "$DATA_ROOT/$1" ]; else [ -d "$DATA_ROOT/$1" ]; fi; }

# every name is checked before anything trains: an hour-long run should not end in a typo's error
plan=()
skipped=
status=0
for name in "${names[@]}"; do
  if [ -n "${seed_data[$name]:-}" ]; then
    want=${seed_data[$name]}
  elif [ -n "${folder[$name]:-}" ]; then
    want=${folder[$name]}
  else
    echo "run.sh: unknown dataset '$name' (expected demo, a benchmark: ${benchmarks[*]}, or a seed preset:" \
      "${seeds[*]}); $(did_you_mean "$name")see bash run.sh --help" >&2
    status=2; continue
  fi
  if present "$want"; then plan+=("$name"); continue; fi
  if [[ $want == *.* ]]; then kind="file $want"; else want=$want/; kind="folder $want"; fi
  [ -n "${folder[$name]:-}" ] && kind+=" with train/ val/ test/ <class>/"
  if [ $all = 1 ]; then
    echo "skipping $name: $root/$want not found (put the ${folder[$name]} train/val/test class folders there)"
    skipped+="${skipped:+, }$name ($want)"
  else
    echo "run.sh: $name: no data at $root/$want (expected the $kind under DATA_ROOT=$root); put" \
      "it there or set DATA_ROOT to the folder that holds it; the header of configs/$name.yaml says what to get" >&2
    [ $status = 0 ] && status=3
  fi
done
[ $status != 0 ] && exit $status
if [ ${#plan[@]} -eq 0 ]; then
  wanted=$(for b in "${benchmarks[@]}"; do printf '%s/ ' "${folder[$b]}"; done)
  echo "run.sh: no benchmark data under DATA_ROOT=$root (expected at least one of the folders ${wanted}with" \
    "train/ val/ test/ <class>/); put a dataset there or set DATA_ROOT to the folder that holds them (the header" \
    "of configs/<name>.yaml says what to get), or try bash run.sh demo" >&2
  exit 3
fi

# the model and the run folder named in the extra flags, if any (the last one wins, as in argparse)
x_model=
x_task=
for ((i = 0; i < ${#extra[@]}; i++)); do
  case ${extra[i]} in
    --model) x_model=${extra[i + 1]:-} ;;
    --model=*) x_model=${extra[i]#--model=} ;;
    --task) x_task=${extra[i + 1]:-} ;;
    --task=*) x_task=${extra[i]#--task=} ;;
  esac
done
# run_name NAME: the run folder of preset NAME; named after the model used when --model overrides the preset's
run_name() {
  local own
  own=$(sed -n 's/^model: *\([^ #]*\).*/\1/p' "configs/$1.yaml")
  own=${own:-retfound_mae}  # main_finetune.py's default model
  if [ -n "$x_task" ]; then
    echo "$x_task"
  elif [ -n "${folder[$1]:-}" ]; then
    if [ -z "$x_model" ] || [ "${x_model,,}" = "${own,,}" ]; then echo "RETFound_mae_meh-${folder[$1]}"
    else echo "$x_model-${folder[$1]}"; fi
  elif [ -z "$x_model" ] || [ "${x_model,,}" = "${own,,}" ]; then
    echo "$1"
  else
    echo "$1-$x_model"  # the preset's name stays: the three ODIR presets differ in more than the model
  fi
}

runs=()
failures=()
# run_preset NAME DATA TASK: one preset on its data, the run folder added to the summary
run_preset() {
  echo "=== $1: $2 -> $OUTPUT_DIR/$3"
  if ! launch --config "configs/$1.yaml" --data_path "$2" --weights_dir "$WEIGHTS_DIR" \
      --output_dir "$OUTPUT_DIR" --task "$3" "${extra[@]}" "${protocol[@]}"; then
    echo "run.sh: $1 failed" >&2; failures+=("$1")
  fi
  runs+=("$OUTPUT_DIR/$3")
}
for name in "${plan[@]}"; do
  if [ -n "${seed_data[$name]:-}" ]; then data=$DATA_ROOT/${seed_data[$name]}; else data=$DATA_ROOT/${folder[$name]}; fi
  run_preset "$name" "$data" "$(run_name "$name")"
done
echo; echo "Test metrics per dataset:"
"$PYTHON" tools/summarize_runs.py --markdown "${runs[@]}"  # value (95% CI) per metric, Markdown
[ -n "$skipped" ] && echo "Skipped (no data under DATA_ROOT=$root): $skipped"
if [ ${#failures[@]} -gt 0 ]; then echo "Failed: ${failures[*]}"; exit 1; fi
exit 0
