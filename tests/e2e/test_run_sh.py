"""bash run.sh: presets per dataset, absent datasets skipped with a line (with no names) or an error (when
named), a summary table at the end; usage, name suggestions, caller-relative paths and run folders named after
the model used; the demo path with a tiny model and one epoch. Most tests use a fake PYTHON that records what
run.sh asks main_finetune.py to do instead of training."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from helpers import ROOT, make_class_folders

TINY = ["--model", "vit_test", "--input_size", "32", "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0",
        "--num_workers", "0", "--finetune", "", "--nb_classes", "3"]


# Stands in for PYTHON: "main_finetune.py ARGS" is logged (one JSON list a line) and, unless FAKE_FAIL names
# the run folder, leaves a metrics_test.csv and a metrics_test_ci.csv in --output_dir/--task (the last of each,
# as argparse takes them); anything else (summarize_runs.py, python -c) runs on the real interpreter.
FAKE_PYTHON = """#!{python}
import json, os, sys
argv = sys.argv[1:]
if argv[:1] != ["main_finetune.py"]:
    os.execv({python!r}, [{python!r}, *argv])
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
last = lambda flag: [v for k, v in zip(argv, argv[1:]) if k == flag][-1]
run = os.path.join(last("--output_dir"), last("--task"))
if os.path.basename(run) == os.environ.get("FAKE_FAIL"):
    sys.exit(1)
os.makedirs(run, exist_ok=True)
with open(os.path.join(run, "metrics_test.csv"), "w") as f:
    f.write("accuracy,f1,roc_auc,kappa,kappa_quadratic,average_precision\\n0.5,0.25,0.75,0.1,0.2,0.3\\n")
with open(os.path.join(run, "metrics_test_ci.csv"), "w") as f:
    f.write("metric,value,ci_low,ci_high\\naccuracy,0.5,0.4,0.6\\nf1,0.25,nan,nan\\n")
"""


def run_sh(args, env_extra, timeout=600, cwd=ROOT):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run(["bash", os.path.join(ROOT, "run.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def fake_run_sh(tmp_path, args, cwd=ROOT, **env):
    """run.sh with the fake PYTHON; returns (CompletedProcess, the main_finetune.py argv lists it was given)."""
    fake, log = tmp_path / "fake_python", tmp_path / "calls.jsonl"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    log.write_text("")
    env = {"DATA_ROOT": str(tmp_path / "data"), "OUTPUT_DIR": str(tmp_path / "out"), **env}
    res = run_sh(args, {**env, "PYTHON": str(fake), "FAKE_LOG": str(log)}, cwd=cwd)
    return res, [json.loads(line) for line in log.read_text().splitlines()]


def flag(argv, name):
    return [v for k, v in zip(argv, argv[1:]) if k == name][-1]


def summary_table(stdout):
    """The cells of the Markdown rows (header first, separator left out) printed after 'Test metrics per
    dataset:'."""
    text = stdout.split("Test metrics per dataset:")[1]
    return [[c.strip() for c in ln.strip()[1:-1].split("|")] for ln in text.splitlines()
            if ln.startswith("|") and not ln.startswith("|---")]


def test_benchmark_presets_skip_absent_and_summarise(tmp_path):
    # the one real (tiny) training run: all eight benchmarks asked for, only OCTID has data
    make_class_folders(tmp_path / "data" / "OCTID")
    res = run_sh(["--", *TINY], {"DATA_ROOT": str(tmp_path / "data"), "OUTPUT_DIR": str(tmp_path / "out")})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "skipping retina" in res.stdout and "Retina" in res.stdout
    summary = res.stdout.split("Test metrics per dataset:")[1].strip().splitlines()
    table = summary_table(res.stdout)
    assert table[0][:4] == ["run", "accuracy", "f1", "roc_auc"] and len(table) == 2
    row = table[1]
    # --model vit_test overrides the preset's retfound_mae, so the run is named after vit_test
    assert row[0] == "vit_test-OCTID" and 0.0 <= float(row[1].split()[0]) <= 1.0
    if (tmp_path / "out" / "vit_test-OCTID" / "metrics_test_ci.csv").is_file():  # the run bootstraps its CIs
        assert re.fullmatch(r"\d\.\d{3} \(\d\.\d{3}\u2013\d\.\d{3}\)", row[1]), row
    # the skipped benchmarks are listed again after the table, each with the folder it lacked
    skipped = [ln for ln in summary if ln.startswith("Skipped")]
    assert len(skipped) == 1 and f"DATA_ROOT={tmp_path / 'data'}" in skipped[0]
    assert "retina (Retina/)" in skipped[0] and "glaucoma_fundus (Glaucoma_fundus/)" in skipped[0]
    assert "octid" not in skipped[0]
    # the preset's recipe reached the run (flags after -- override only what they name)
    cfg = (tmp_path / "out" / "vit_test-OCTID" / "config.yaml").read_text()
    assert "layer_decay: 0.65" in cfg and "drop_path: 0.2" in cfg and "model: vit_test" in cfg
    assert not (tmp_path / "out" / "RETFound_mae_meh-OCTID").exists()


def test_unknown_dataset_name_is_an_error(tmp_path):
    res = run_sh(["octdi"], {"DATA_ROOT": str(tmp_path)})
    assert res.returncode == 2 and "unknown dataset 'octdi'" in res.stderr


def test_unknown_names_get_suggestions_and_nothing_trains(tmp_path):
    make_class_folders(tmp_path / "data" / "OCTID", counts={"train": 1})
    res, calls = fake_run_sh(tmp_path, ["octid", "octd", "multilabel_eff"])
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.splitlines()
    octd = [ln for ln in lines if "unknown dataset 'octd'" in ln]
    eff = [ln for ln in lines if "unknown dataset 'multilabel_eff'" in ln]
    assert len(octd) == 1 and "did you mean 'octid'?" in octd[0]
    assert len(eff) == 1 and "did you mean 'multilabel_effb4'?" in eff[0] and "odir_dual_resnet50" in eff[0]
    assert calls == []  # octid, valid and with data, did not train before the typo was reported


def test_named_benchmark_without_data_fails(tmp_path):
    (tmp_path / "data").mkdir()
    res, calls = fake_run_sh(tmp_path, ["octid"])
    assert res.returncode == 3 and calls == [], res.stdout + res.stderr
    msg = [ln for ln in res.stderr.splitlines() if ln.startswith("run.sh: octid:")]
    assert len(msg) == 1
    assert f"{tmp_path / 'data' / 'OCTID'}/" in msg[0] and "the folder OCTID/ with train/ val/ test/" in msg[0]
    assert f"DATA_ROOT={tmp_path / 'data'}" in msg[0] and "configs/octid.yaml" in msg[0]


def test_named_seed_preset_without_data_fails_and_nothing_else_trains(tmp_path):
    make_class_folders(tmp_path / "data" / "OCTID", counts={"train": 1})
    res, calls = fake_run_sh(tmp_path, ["octid", "multilabel_effb4"])
    assert res.returncode == 3 and calls == [], res.stdout + res.stderr
    msg = [ln for ln in res.stderr.splitlines() if ln.startswith("run.sh: multilabel_effb4:")]
    assert len(msg) == 1 and "configs/multilabel_effb4.yaml" in msg[0]
    assert "the file multilabel_fundus/labels_image_centric_4_class_clean.csv under DATA_ROOT=" in msg[0]


def test_no_names_and_no_data_at_all_fails(tmp_path):
    (tmp_path / "data").mkdir()
    res, calls = fake_run_sh(tmp_path, [])
    assert res.returncode == 3 and calls == [], res.stdout + res.stderr
    assert res.stdout.count("skipping ") == 8
    msg = [ln for ln in res.stderr.splitlines() if "no benchmark data" in ln]
    assert len(msg) == 1 and f"DATA_ROOT={tmp_path / 'data'}" in msg[0]
    assert "OCTID/ Retina/ APTOS2019/ JSIEC/ IDRiD/ MESSIDOR2/ PAPILA/ Glaucoma_fundus/" in msg[0]


def test_a_failed_run_fails_the_script_and_is_named(tmp_path):
    for folder in ("OCTID", "PAPILA"):
        make_class_folders(tmp_path / "data" / folder, counts={"train": 1})
    res, calls = fake_run_sh(tmp_path, ["octid", "papila"], FAKE_FAIL="RETFound_mae_meh-OCTID")
    assert res.returncode == 1 and len(calls) == 2, res.stdout + res.stderr
    assert "Failed: octid" in res.stdout.splitlines()
    rows = {r[0]: r for r in summary_table(res.stdout)[1:]}
    assert rows["RETFound_mae_meh-PAPILA"][1:3] == ["0.500 (0.400\u20130.600)", "0.250 (CI n/a)"]
    assert rows["RETFound_mae_meh-OCTID"][1] == "(no metrics_test.csv: the run did not finish)"


def test_relative_paths_are_taken_from_the_callers_folder(tmp_path):
    caller = tmp_path / "elsewhere"
    make_class_folders(caller / "data" / "OCTID", counts={"train": 1})
    res, calls = fake_run_sh(tmp_path, ["octid"], cwd=caller, DATA_ROOT="data", WEIGHTS_DIR="./w",
                             OUTPUT_DIR="out")
    assert res.returncode == 0 and len(calls) == 1, res.stdout + res.stderr
    argv = calls[0]
    assert flag(argv, "--data_path") == str(caller / "data" / "OCTID")
    assert flag(argv, "--weights_dir") == str(caller / "w")
    assert flag(argv, "--output_dir") == str(caller / "out")
    assert (caller / "out" / "RETFound_mae_meh-OCTID" / "metrics_test.csv").is_file()
    assert "RETFound_mae_meh-OCTID" in res.stdout.split("Test metrics per dataset:")[1]


def test_help_prints_the_usage(tmp_path):
    header = [ln[2:] for ln in open(os.path.join(ROOT, "run.sh"), encoding="utf8").read().splitlines()[1:6]]
    for opt in ("--help", "-h"):
        res, calls = fake_run_sh(tmp_path, [opt])
        assert res.returncode == 0 and calls == [] and res.stderr == "", res.stderr
        assert res.stdout.splitlines()[:5] == header and "Exit status:" in res.stdout
        assert "#" not in res.stdout and "set -uo" not in res.stdout


def test_model_override_names_the_run_after_the_model(tmp_path):
    make_class_folders(tmp_path / "data" / "OCTID", counts={"train": 1})
    (tmp_path / "data" / "multilabel_fundus").mkdir(parents=True)
    (tmp_path / "data" / "multilabel_fundus" / "labels_image_centric_4_class_clean.csv").write_text("x\n")
    cases = {("--model", "vit_test"): ["vit_test-OCTID", "multilabel_effb4-vit_test"],
             ("--model=resnet_test",): ["resnet_test-OCTID", "multilabel_effb4-resnet_test"],
             # the presets' own models keep the presets' names
             ("--model", "RETFound_mae"): ["RETFound_mae_meh-OCTID", "multilabel_effb4-RETFound_mae"],
             ("--model", "efficientnet_b4"): ["efficientnet_b4-OCTID", "multilabel_effb4"],
             # an explicit --task names the run outright
             ("--model", "vit_test", "--task", "mine"): ["mine", "mine"]}
    for flags, expected in cases.items():
        res, calls = fake_run_sh(tmp_path, ["octid", "multilabel_effb4", "--", *flags])
        assert res.returncode == 0, res.stdout + res.stderr
        assert [flag(argv, "--task") for argv in calls] == expected, flags
        assert [row[0] for row in summary_table(res.stdout)[1:]] == expected


def test_summary_headers_are_separated_and_aligned(tmp_path):
    regression = ("accuracy", "f1", "kappa_quadratic", "mae", "f1_tuned", "kappa_quadratic_tuned")
    multilabel = ("f1_macro", "f1_micro", "roc_auc", "map", "odir_final", "f1_macro_tuned")
    runs = []
    for name, cols in (("dr_regression_effv2m", regression), ("odir", multilabel)):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics_test.csv").write_text(",".join(("val_loss", *cols)) + "\n" +
                                              ",".join(["0.5"] + [f"0.{i + 1}" for i in range(len(cols))]) + "\n")
        runs.append(str(run))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "summarize_runs.py"), *runs],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 4  # a header line for each task type's columns

    def ends(line):  # where each word of a line ends
        return [i + 1 for i, ch in enumerate(line) if ch != " " and (i + 1 == len(line) or line[i + 1] == " ")]

    for head, row, cols, run in ((lines[0], lines[1], regression, runs[0]), (lines[2], lines[3], multilabel, runs[1])):
        assert head.split() == ["run", *cols]  # no two headers glued together
        assert row.split() == [os.path.basename(run), *(f"{(i + 1) / 10:.4f}" for i in range(len(cols)))]
        assert ends(row)[1:] == ends(head)[1:], (head, row)  # each value right-aligned under its header
        gaps = [end - len(c) - prev for prev, end, c in zip(ends(head), ends(head)[1:], cols)]
        assert min(gaps) >= 2, head  # at least two spaces before each header


def test_summary_markdown_with_cis_and_runs_side_by_side(tmp_path):
    cols = "val_loss,accuracy,f1,roc_auc,kappa,kappa_quadratic,average_precision,epoch"
    runs = {"A|1": ("0.5,0.8,0.7,0.9,0.6,0.65,0.75,3", "accuracy,0.8,0.75,0.85\nf1,0.7,0.6,0.8\nroc_auc,0.9,0.85,0.95\n"),
            "B": ("0.4,0.7,0.72,0.8,0.5,0.6,nan,3", "accuracy,0.7,0.65,0.74\nf1,0.72,0.6,0.8\nroc_auc,0.8,nan,nan\n"),
            "C": ("0.4,0.6,0.5,0.7,0.4,0.5,0.5,2", None)}  # C: a run from before metrics_test_ci.csv
    for name, (values, cis) in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics_test.csv").write_text(f"{cols}\n{values}\n")
        if cis:
            (tmp_path / name / "metrics_test_ci.csv").write_text("metric,value,ci_low,ci_high\n" + cis)
    (tmp_path / "D").mkdir()  # did not finish
    tool = [sys.executable, os.path.join(ROOT, "tools", "summarize_runs.py")]
    folders = [str(tmp_path / n) for n in (*runs, "D")]

    res = subprocess.run([*tool, "--markdown", *folders], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:6] == [
        "| run | accuracy | f1 | roc_auc | kappa | kappa_quadratic | average_precision |",
        "|---|---:|---:|---:|---:|---:|---:|",
        "| A\\|1 | 0.800 (0.750\u20130.850) | 0.700 (0.600\u20130.800) | 0.900 (0.850\u20130.950) | 0.600 | 0.650 | 0.750 |",
        "| B | 0.700 (0.650\u20130.740) | 0.720 (0.600\u20130.800) | 0.800 (CI n/a) | 0.500 | 0.600 | n/a |",
        "| C | 0.600 | 0.500 | 0.700 | 0.400 | 0.500 | 0.500 |",
        "| D | (no metrics_test.csv: the run did not finish) |  |  |  |  |  |"]
    assert "95% bootstrap confidence interval" in lines[-1]

    res = subprocess.run([*tool, "--compare", *folders[:2]], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows = {ln.split(" | ")[0][2:]: ln for ln in res.stdout.splitlines() if ln.startswith("| ")}
    assert rows["metric"] == "| metric | A\\|1 | B | best |"
    assert rows["accuracy"] == ("| accuracy | 0.800 (0.750\u20130.850) | 0.700 (0.650\u20130.740) | "
                                "A\\|1 (CI clear of the others) |")
    assert rows["f1"].endswith("| B (CIs overlap) |")
    assert rows["roc_auc"].endswith("| A\\|1 |")  # B's interval is undefined: no claim about overlap
    assert rows["average_precision"] == "| average_precision | 0.750 | n/a |  |"
    assert "val_loss" not in rows and "epoch" not in rows
    # all runs unfinished: exit status 1, as for the plain table
    assert subprocess.run([*tool, "--markdown", folders[-1]], capture_output=True, cwd=ROOT).returncode == 1


def test_demo_path_compares_with_published_numbers(tmp_path):
    res = run_sh(["demo", "--", "--model", "resnet_test", "--input_size", "28", "--epochs", "1", "--warmup_epochs", "0",
                  "--num_workers", "0"], {"OUTPUT_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ResNet-18 (28)             0.717    0.524" in res.stdout
    verdict = [ln for ln in res.stdout.splitlines() if ln.startswith("This run ")]
    assert len(verdict) == 1 and "the published ResNet-18 (28) result" in verdict[0]
    assert (tmp_path / "demo_retinamnist" / "metrics_test.csv").is_file()
