"""Checkpoint cost: how long writing checkpoint-last holds training, against one training step and an epoch.

Builds the model a run trains (default ViT-L/16: ``retfound_mae`` with 5 classes) with the optimizer
``main_finetune.py`` builds (AdamW, layer-decay groups, ``util.lr_decay.build_optimizer``) and takes training
steps, so the AdamW moments exist: checkpoint-last then holds the weights and two moments per weight (about
3x the model). Then, in a temporary folder, it writes the checkpoints the ways the toolkit can:

* ``paddle.save, as before``: how every checkpoint was written before issue 13, ``paddle.save`` to a temporary
  file, then ``os.replace``, no fsync: training waits for the whole write (to the page cache; the kernel
  writes the disk later). Its pickler keeps every tensor's copy until the end;
* ``sync (default)``: ``atomic_save`` now: the same file format, streamed (``pickle_checkpoint``: one tensor's
  copy at a time), same temporary file and ``os.replace``, no fsync;
* ``sync + fsync``: the same, flushed to the disk before the rename (``CheckpointWriter(fsync=True)``);
* ``model only``: checkpoint-best's content (weights, no optimizer state);
* ``background``: ``--async_save`` (``CheckpointWriter(background=True)``): training waits for the copy of
  the state in memory only; one thread pickles, fsyncs and renames; "total" is until the file is in place;
* the same for an improving epoch, which writes checkpoint-best and checkpoint-last (the background writer
  copies the weights they share once).

For each: the time training is held ("blocked"), the time until the file is in place ("total"), the file
size and the extra peak resident memory over the trained model (``VmHWM`` reset through
``/proc/self/clear_refs`` before each, so each row has its own peak). It also times one training step alone
and one with a background write in flight (what the write costs the step it overlaps), reading
checkpoint-last back through the restricted reader (what a resume pays), and puts the numbers against an
epoch of ``--train_images`` images at ``--batch_size``.

Usage (from the repository root, the toolkit's environment active):
    python benchmarks/checkpoint_cost.py                  # ViT-L/16 (RETFound), 3.6 GB checkpoint-last; minutes
    python benchmarks/checkpoint_cost.py --model base     # ViT-B/16
    python benchmarks/checkpoint_cost.py --quick          # tiny model: a smoke run in seconds

The files go to a temporary folder inside ``--dir`` (default: the current folder, where ``output_dir/`` usually
is: the same disk a run writes to), deleted at the end; the free space there is checked first.

References: PyTorch Lightning ``ModelCheckpoint`` (``every_n_epochs``, ``save_last``) and ``AsyncCheckpointIO``;
``torch.distributed.checkpoint.async_save`` (the state staged to host memory, written in the background).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# name -> (our registered model, input size)
MODELS = {"large": ("retfound_mae", 224), "base": ("vit_base_patch16", 224), "test": ("vit_test", 32)}
NUM_CLASSES = 5
LR, WEIGHT_DECAY, LAYER_DECAY, SMOOTHING, DROP_PATH = 5e-4, 0.05, 0.65, 0.1, 0.2
MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------ machine facts
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def _fs_type(path: str) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts), or ``?``."""
    path, best = os.path.realpath(path), ("", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) >= len(best[0]):
                        best = (parts[1], parts[2])
    except OSError:
        pass
    return best[1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        found = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(found.group(1)) if found else 0


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _mem_available_mib() -> float:
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) / 1024
    except (OSError, AttributeError):
        return float("nan")


# ------------------------------------------------------------------------------------------ the workload
def build(a):
    import numpy as np
    import paddle

    import models
    from util.lr_decay import build_optimizer

    paddle.seed(0)
    name, size = MODELS[a.model]
    model = models.create_model(name, num_classes=NUM_CLASSES, drop_path_rate=DROP_PATH, global_pool=True,
                                input_size=size)
    opt = build_optimizer(model, LR, weight_decay=WEIGHT_DECAY, layer_decay=LAYER_DECAY)
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal((a.batch_size, 3, size, size), dtype=np.float32))
    y = paddle.to_tensor(rng.integers(0, NUM_CLASSES, a.batch_size).astype(np.int64))
    return name, model, opt, x, y


def make_step(model, opt, x, y):
    from util.losses import soft_cross_entropy

    def step():  # what engine.train_one_epoch does per batch, minus data loading
        opt.set_lr(LR)
        loss = soft_cross_entropy(model(x), y, SMOOTHING)
        float(loss)
        loss.backward()
        opt.step()
        opt.clear_grad()

    return step


def _meta():
    return {"model": "benchmark", "nb_classes": NUM_CLASSES, "class_names": [str(i) for i in range(NUM_CLASSES)]}


def save_last(ck, path, model, opt, writer=None):
    ck.save_checkpoint(path, model=model, optimizer=opt, epoch=1, best_score=0.5, meta=_meta(), writer=writer,
                       extra={"best_epoch": 1, "best_thresholds": None, "epochs_without_improvement": 0,
                              "stopped_early": False})


def save_best(ck, path, model, writer=None):
    ck.save_checkpoint(path, model=model, epoch=1, best_score=0.5, meta=_meta(), writer=writer,
                       extra={"best_epoch": 1, "val_metrics": {"score": 0.5}, "val_metric": "score",
                              "thresholds": None})


def measure(fn, repeats: int, peak_ok: bool) -> dict:
    """fn() -> (blocked s, total s); the medians over ``repeats`` and the largest extra peak RSS (MiB)."""
    blocked, total, peak = [], [], 0.0
    for _ in range(repeats):
        if peak_ok:
            _reset_peak()
        base = _status_kib("VmRSS")
        b, t = fn()
        blocked.append(b)
        total.append(t)
        if peak_ok:
            peak = max(peak, (_status_kib("VmHWM") - base) / 1024)
    return {"blocked_s": statistics.median(blocked), "total_s": statistics.median(total),
            "blocked_all": blocked, "total_all": total, "peak_extra_mib": peak if peak_ok else float("nan")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["large", "base"], default="large",
                   help="large = ViT-L/16 (RETFound, default), base = ViT-B/16")
    p.add_argument("--quick", action="store_true", help="tiny model (vit_test, 32 px): a smoke run in seconds")
    p.add_argument("--batch_size", type=int, default=4,
                   help="batch of the timed training steps (the epoch estimate is per image, so a small batch does)")
    p.add_argument("--steps", type=int, default=2, help="timed training steps (after one untimed step)")
    p.add_argument("--repeats", type=int, default=3, help="writes per way of writing (medians are printed)")
    p.add_argument("--train_images", type=int, default=1000,
                   help="training images per epoch for the epoch estimate (steps x the measured step time)")
    p.add_argument("--threads", type=int, default=2, help="math threads (OMP_NUM_THREADS, set before Paddle loads)")
    p.add_argument("--skip_paddle_save", action="store_true",
                   help="leave out the paddle.save row (it needs about 1.7x the state in extra memory, 5.7 GB for "
                        "ViT-L)")
    p.add_argument("--dir", default=".", help="where the temporary folder goes (default: the current folder)")
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still deletes the temporary folder
    if a.quick:
        a.model, a.batch_size, a.steps, a.repeats = "test", 4, 2, 2
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(a.threads))

    import paddle

    from models.checkpoint_io import read_checkpoint
    from util.fileio import atomic_path
    from util.outputs import checkpoint as ck

    print(f"machine: {_cpu_name()}, nproc {os.cpu_count()}, Python {platform.python_version()}, paddle "
          f"{paddle.__version__}, OMP_NUM_THREADS {os.environ['OMP_NUM_THREADS']}, {_load()} (before), "
          f"{_mem_available_mib() / 1024:.1f} GiB memory available")
    t_start = time.time()
    name, model, opt, x, y = build(a)
    step = make_step(model, opt, x, y)
    step()  # the untimed step: the AdamW moments exist from here on
    n_params = sum(int(p.size) for p in model.parameters())
    state_mib = (sum(int(v.size) * v.element_size() for v in model.state_dict().values())
                 + sum(int(v.size) * v.element_size() for v in opt.state_dict().values()
                       if isinstance(v, paddle.Tensor))) / MIB
    folder_parent = os.path.abspath(a.dir)
    free = shutil.disk_usage(folder_parent).free / MIB
    need = 3.5 * state_mib  # checkpoint-last, its temporary file while replaced, checkpoint-best
    print(f"workload: {name} ({n_params / 1e6:.1f} M parameters) + AdamW ({len(opt._param_groups)} layer-decay "
          f"groups), batch {a.batch_size}, {MODELS[a.model][1]} px, fp32; model + optimizer state "
          f"{state_mib:.0f} MiB; writing to {folder_parent} ({_fs_type(folder_parent)}, {free / 1024:.1f} GiB free)")
    if free < need:
        raise SystemExit(f"checkpoint_cost: {folder_parent} has {free:.0f} MiB free, the run needs about "
                         f"{need:.0f} MiB; pass --dir on a disk with more space")
    peak_ok = _reset_peak()
    if not peak_ok:
        print("note: /proc/self/clear_refs is not writable here: no per-row peak memory")

    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    print(f"training step alone: {step_s:.2f} s (median of {a.steps}: {', '.join(f'{t:.2f}' for t in times)})",
          flush=True)

    folder = tempfile.mkdtemp(prefix="checkpoint_cost-", dir=folder_parent)
    last, best = os.path.join(folder, "checkpoint-last.pdparams"), os.path.join(folder, "checkpoint-best.pdparams")
    rows: dict[str, dict] = {}
    try:
        save_last(ck, last, model, opt)  # a previous checkpoint-last to replace, as in a run after epoch 0

        def timed(write):
            def fn():
                t0 = time.perf_counter()
                write()
                t = time.perf_counter() - t0
                return t, t
            return fn

        def background(files):
            writer = ck.CheckpointWriter(background=True)  # one per row: later writes reuse its host copy

            def fn():
                t0 = time.perf_counter()
                with writer.group():
                    files(writer)
                t1 = time.perf_counter()
                writer.wait()
                return t1 - t0, time.perf_counter() - t0
            fn.writer = writer
            return fn

        def paddle_save(obj, path):  # the writer before issue 13
            with atomic_path(path, suffix=".pdparams") as tmp:
                paddle.save(obj, tmp)

        class PaddleSave:  # a CheckpointWriter stand-in that writes with paddle.save
            def submit(self, path, state):
                paddle_save(state, path)

        sync_fsync = ck.CheckpointWriter(fsync=True)
        plan = [] if a.skip_paddle_save else [
            ("checkpoint-last, paddle.save (as before)", timed(lambda: save_last(ck, last, model, opt, PaddleSave())),
             [last])]
        plan += [
            ("checkpoint-last, sync (default)", timed(lambda: save_last(ck, last, model, opt)), [last]),
            ("checkpoint-last, sync + fsync", timed(lambda: save_last(ck, last, model, opt, sync_fsync)), [last]),
            ("checkpoint-last, background (--async_save)", background(lambda w: save_last(ck, last, model, opt, w)),
             [last]),
            ("model only (checkpoint-best), sync", timed(lambda: save_best(ck, best, model)), [best]),
            ("best + last (improving epoch), sync", timed(lambda: (save_best(ck, best, model),
                                                                  save_last(ck, last, model, opt))), [best, last]),
            ("best + last (improving epoch), background",
             background(lambda w: (save_best(ck, best, model, w), save_last(ck, last, model, opt, w))), [best, last]),
        ]
        for label, fn, files in plan:
            rows[label] = measure(fn, a.repeats, peak_ok)
            if hasattr(fn, "writer"):
                rows[label]["held_mib"] = fn.writer.last["snapshot_bytes"] / MIB  # kept between saves
                fn.writer.close()  # frees it before the next row
            rows[label]["size_mib"] = sum(os.path.getsize(f) for f in files) / MIB
            r = rows[label]
            print(f"  {label:45s} blocked {r['blocked_s']:7.2f} s  total {r['total_s']:7.2f} s  "
                  f"{r['size_mib']:8.0f} MiB  peak +{r['peak_extra_mib']:.0f} MiB  (each write, blocked: "
                  + ", ".join(f"{b:.2f}" for b in r["blocked_all"]) + f" s; {_load()})", flush=True)

        # training steps with a background write of checkpoint-last in flight, each paired with a step alone
        # (alternating, so both see the same machine load)
        overlap = []
        writer = ck.CheckpointWriter(background=True)
        save_last(ck, last, model, opt, writer)  # the first write allocates the host copy; later ones reuse it
        writer.wait()
        for _ in range(a.steps):
            t0 = time.perf_counter()
            step()
            alone = time.perf_counter() - t0
            t0 = time.perf_counter()
            save_last(ck, last, model, opt, writer)
            t1 = time.perf_counter()
            step()
            t2 = time.perf_counter()
            done_within_step = not writer.pending
            writer.wait()
            overlap.append({"alone_s": alone, "snapshot_s": t1 - t0, "step_s": t2 - t1,
                            "write_s": time.perf_counter() - t0, "done_within_step": done_within_step})
        writer.close()
        step_alone = statistics.median(o["alone_s"] for o in overlap)
        step_during = statistics.median(o["step_s"] for o in overlap)
        print(f"training step with a background write in flight: {step_during:.2f} s, paired step alone "
              f"{step_alone:.2f} s (pairs: " + ", ".join(f"{o['step_s']:.2f}/{o['alone_s']:.2f}" for o in overlap)
              + f"); the write finished within the step: {[o['done_within_step'] for o in overlap]}", flush=True)

        t0 = time.perf_counter()
        state = read_checkpoint(last, mmap=False)
        read_s = time.perf_counter() - t0
        del state
        print(f"reading checkpoint-last back (restricted reader, what --resume pays): {read_s:.2f} s", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    steps_per_epoch = max(1, a.train_images // a.batch_size)
    epoch_s = steps_per_epoch * step_s
    before_row = rows.get("checkpoint-last, paddle.save (as before)", {"blocked_s": float("nan")})
    sync_row, bg_row = rows["checkpoint-last, sync (default)"], rows["checkpoint-last, background (--async_save)"]
    slower = max(0.0, step_during - step_alone)
    bg_cost = bg_row["blocked_s"] + slower
    print()
    print(f"{'way of writing':45s}{'blocked s':>11s}{'total s':>10s}{'size MiB':>10s}{'peak +MiB':>11s}"
          f"{'x step':>9s}{'% epoch':>9s}")
    for label, r in rows.items():
        print(f"{label:45s}{r['blocked_s']:11.2f}{r['total_s']:10.2f}{r['size_mib']:10.0f}"
              f"{r['peak_extra_mib']:11.0f}{r['blocked_s'] / step_s:9.2f}{100 * r['blocked_s'] / epoch_s:9.2f}")
    print(f"(medians of {a.repeats} writes; 'blocked': training waits, 'total': until the file is in place; "
          f"'x step': blocked / one training step of {step_s:.2f} s; '% epoch': of an estimated epoch of "
          f"{a.train_images} images = {steps_per_epoch} steps = {epoch_s / 60:.1f} min, validation not counted)")
    print(f"per epoch, checkpoint-last: paddle.save (as before) {before_row['blocked_s']:.2f} s, sync (default) "
          f"{sync_row['blocked_s']:.2f} s = "
          f"{100 * sync_row['blocked_s'] / epoch_s:.2f}% of the epoch; --save_last_every 5: "
          f"{sync_row['blocked_s'] / 5:.2f} s on average (plus the epochs with a new best); --async_save: "
          f"{bg_row['blocked_s']:.2f} s held + {slower:.2f} s slower step = {bg_cost:.2f} s; "
          f"a resume reads it in {read_s:.2f} s")
    print(f"({_load()} (after), wall time {time.time() - t_start:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "model": name, "n_params": n_params, "state_mib": state_mib,
                       "step_s": step_s, "step_times": times, "rows": rows, "overlap": overlap, "read_s": read_s,
                       "epoch_s": epoch_s}, f, indent=1)


if __name__ == "__main__":
    main()
