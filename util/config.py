"""Command-line / YAML configuration of fine-tuning, resolved once, validated, and saved with the run.

Precedence: parser defaults < YAML preset (``--config preset.yaml``) < flags given on the command line.
Flags keep the RETFound reference spellings (so its command lines paste unchanged) and its recipe defaults.
YAML keys are the flag names without dashes (``batch_size: 16``); unknown keys are errors with the close
matches; values go through the flag's type (PyYAML reads ``5e-4`` as a string) and choices. Booleans are
``--x / --no-x`` pairs and ``x: true/false`` in YAML. Derived values (the effective LR) are not stored here:
``util.lr_sched.effective_lr`` computes them in one place.

References: RETFound_MAE main_finetune.py get_args_parser (flag names and defaults), facebookresearch/mae.
"""
from __future__ import annotations

import argparse
import math
import os
import textwrap
from typing import Any

import yaml

from util.adaptation import check_adaptation_flags
from util.errors import UserError, close_matches
from util.fileio import atomic_path
from util.task_names import TASK_NAMES
from util.weights_files import model_for_arch

_LAUNCHER_NOTE = "accepted for compatibility with the reference launcher and ignored"

# YAML spellings of reference flags that store the negation of another option: key -> (dest, negate).
_YAML_ALIASES = {'cls_token': ('global_pool', True), 'no_pin_mem': ('pin_mem', True)}


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (with close matches for misspelt flags) instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        hint = ''
        if message.startswith('unrecognized arguments:'):
            flags = [o for a in self._actions for o in a.option_strings]
            for tok in message.split(':', 1)[1].split():
                if tok.startswith('--'):
                    near = close_matches(tok.split('=')[0], flags, n=2)
                    if near:
                        hint += f" ({tok}: did you mean {', '.join(near)}?)"
        raise UserError(f"command line: {message}{hint}; see --help for the accepted flags")


def _device(value: str) -> str:
    value = str(value).strip().lower()
    return 'gpu' if value.startswith('cuda') else value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` to a flag's help only where X says something: not for a ``None`` or empty default
    (the help then says in words what happens without the flag, e.g. ``(default: from the data)``), not where
    the help already states its default, and not for the reference spellings that set another flag's value
    (their default is ``SUPPRESS``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        if '%(default)' in text or '(default:' in text or action.default in (None, '', argparse.SUPPRESS):
            return text
        return text + ' (default: %(default)s)'

    # wrap between words only, so a flag such as --no-global_pool is never split at its hyphen
    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(' '.join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(' '.join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


_USAGE = """%(prog)s --data_path PATH [--finetune WEIGHTS] [options]
       %(prog)s --config PRESET.yaml [options]
       %(prog)s --resume RUN_FOLDER [--eval] [options]"""

_DESCRIPTION = ("Fine-tune RETFound (or another registered model) on retinal images with PaddlePaddle: "
                "single-label or multi-label classification, or regression (grading); the dataset decides which "
                "(--task_type overrides it). Flags keep the RETFound reference spellings. Every flag can also come "
                "from a YAML preset: parser defaults < --config preset < flags on the command line.")

_EPILOG = ("CPU threads: OMP_NUM_THREADS when set, else this process's share of the cores it may use (divided "
           "among the processes paddle.distributed.launch starts on this machine), at most 8. Data loader "
           "workers: see --num_workers.")


def get_args_parser() -> argparse.ArgumentParser:
    """The fine-tuning argument parser with every reference flag and the RETFound recipe defaults."""
    p = _Parser(prog='main_finetune.py', usage=_USAGE, description=_DESCRIPTION, epilog=_EPILOG,
                allow_abbrev=False, formatter_class=_HelpFormatter)
    b = argparse.BooleanOptionalAction
    p.add_argument('--config', default=None, type=str, metavar='PRESET.yaml',
                   help='YAML preset: keys are flag names (batch_size: 16); flags on the command line override it')

    g = p.add_argument_group('training')
    g.add_argument('--batch_size', default=16, type=int,
                   help='batch size per process (effective batch = batch_size * accum_iter * processes)')
    g.add_argument('--epochs', default=100, type=int,
                   help='training epochs (with --resume: the total, so a larger value extends the run)')
    g.add_argument('--accum_iter', default=1, type=int, help='gradient accumulation steps per optimizer step')
    g.add_argument('--print_freq', default=20, type=int, help='progress lines when not on a terminal: at step 1, every 30 s, at the end, '
                   'and at least every N steps')
    g.add_argument('--amp', default=False, action=b,
                   help='automatic mixed precision: on a GPU in --amp_dtype; on the CPU with --amp_dtype bfloat16 '
                        'only, on CPUs with bf16 instructions (avx512_bf16 or amx_bf16), in one process')
    g.add_argument('--amp_dtype', default='float16', choices=['float16', 'bfloat16'],
                   help='AMP precision: float16 (GPU, with dynamic loss scaling) or bfloat16 (GPU or CPU, no '
                        'loss scaling); parameters and checkpoints stay float32')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='retfound_mae', type=str,
                   help='registered model name (reference spellings such as RETFound_mae resolve too)')
    g.add_argument('--model_arch', default=None, type=str,
                   help="the reference's backbone key: --model Dinov2 needs it (dinov2_vits14, dinov2_vitb14, "
                        "dinov2_vitl14); with another --model it must name that model (--model RETFound_dinov2 "
                        "--model_arch retfound_dinov2); python -m models.list shows the models")
    g.add_argument('--input_size', default=None, type=int,
                   help="image size in pixels (default: the model's own: 224 for retfound_mae, 380 for "
                        "efficientnet_b4, ...)")
    g.add_argument('--crop_pct', default=None, type=float,
                   help="eval resize = input_size / crop_pct then centre crop; also the resize before the basic "
                        "policy's random crop (default: the model's; RETFound: 224/256 up to 224 px, else 1.0)")
    g.add_argument('--drop_path', default=0.2, type=float, help='stochastic depth rate')
    g.add_argument('--global_pool', default=True, action=b,
                   help='ViT models: classify the mean of the patch tokens (then fc_norm), as the RETFound recipe; '
                        '--no-global_pool classifies the cls token (after the final norm); CNNs always average')
    g.add_argument('--cls_token', action='store_false', dest='global_pool', default=argparse.SUPPRESS,
                   help='ViT models: classify the cls token instead of the mean patch token (the reference '
                        'spelling of --no-global_pool)')
    g.add_argument('--freeze_backbone', default=False, action=b,
                   help='train only the head (every parameter the model places below its head is frozen)')

    g = p.add_argument_group('adaptation', 'how much of the model trains, and on how much of the training split '
                             '(util/adaptation.py)')
    g.add_argument('--adaptation', default='finetune', choices=['finetune', 'lp', 'lora'],
                   help='finetune: every parameter trains; lp: linear probe as the reference (only the head trains, '
                        'same transforms and optimizer); lora: low-rank adapters on the q and v parts of every ViT '
                        "block's qkv projection, plus the head (checkpoint-best saved merged: a plain model)")
    g.add_argument('--lp_cached_features', default=False, action=b,
                   help='with --adaptation lp: compute every train/val image\'s frozen features once (eval '
                        'transform, no augmentation: a different protocol) and train the head on them in seconds')
    g.add_argument('--lora_rank', default=8, type=int, help='--adaptation lora: rank of the adapters')
    g.add_argument('--lora_alpha', default=16.0, type=float,
                   help='--adaptation lora: the adapters are scaled by alpha / rank')
    g.add_argument('--lora_dropout', default=0.0, type=float,
                   help="--adaptation lora: dropout on the adapters' input")
    g.add_argument('--dataratio', default='1.0', type=str,
                   help='train on this share of the training split, drawn with --seed (val and test stay whole); '
                        'a comma-separated list (0.1,0.3,1.0) runs once per ratio, in <task>/<task>_ratio<r>/, '
                        'then <task>/dataratio_summary.csv')
    g.add_argument('--stratified', default=False, action=b,
                   help='--dataratio: draw the share per class, keeping the class proportions (at least one '
                        'image per class)')

    g = p.add_argument_group('optimizer')
    g.add_argument('--clip_grad', default=None, type=float,
                   help='clip gradients to this global L2 norm (default: no clipping)')
    g.add_argument('--weight_decay', default=0.05, type=float,
                   help='weight decay (none on biases, norms, pos_embed and cls_token)')
    g.add_argument('--lr', default=None, type=float, help='absolute peak LR (default: from --blr)')
    g.add_argument('--blr', default=5e-3, type=float,
                   help='base LR: peak LR = blr * effective batch size / 256')
    g.add_argument('--layer_decay', default=0.65, type=float, help='layer-wise LR decay')
    g.add_argument('--min_lr', default=1e-6, type=float, help='LR at the end of the cosine schedule')
    g.add_argument('--warmup_epochs', default=10.0, type=float, help='linear warmup epochs (fractions allowed)')
    g.add_argument('--opt', default='adamw', choices=['adamw', 'adam', 'sgd'],
                   help='optimizer (adam and sgd apply --weight_decay as L2, as torch does)')
    g.add_argument('--momentum', default=0.9, type=float, help='SGD momentum')
    g.add_argument('--backbone_lr_scale', default=1.0, type=float,
                   help='LR multiplier of the backbone relative to the head (e.g. 0.1), on top of --layer_decay')
    g.add_argument('--sched', default='cosine', choices=['cosine', 'step', 'plateau'],
                   help='LR schedule after the warmup: per-iteration half-cycle cosine (reference), step decay '
                        '(x --step_gamma every --step_size epochs) or reduce-on-plateau of --plateau_metric')
    g.add_argument('--step_size', default=10, type=int, help="epochs between decays (--sched step)")
    g.add_argument('--step_gamma', default=0.1, type=float, help='decay factor (--sched step)')
    g.add_argument('--plateau_metric', default='', type=str,
                   help='validation metric watched by --sched plateau (default: --val_metric)')
    g.add_argument('--plateau_patience', default=10, type=int,
                   help='epochs without improvement before the LR is reduced (--sched plateau)')
    g.add_argument('--plateau_factor', default=0.1, type=float, help='LR reduction factor (--sched plateau)')

    g = p.add_argument_group('augmentation')
    g.add_argument('--color_jitter', default=None, type=float,
                   help='brightness/contrast/saturation jitter factor: --train_aug basic and dual-eye whenever '
                        'given, retfound only with --aa none (default: no jitter)')
    g.add_argument('--train_aug', default='retfound', choices=['retfound', 'basic'],
                   help='train augmentation: the RETFound recipe (random resized crop, RandAugment, erasing) or '
                        'basic (resize, random crop, flips, rotation, optional colour jitter) as the CNN seeds use')
    g.add_argument('--hflip', default=0.5, type=float, help='horizontal flip probability')
    g.add_argument('--vflip', default=0.0, type=float, help='vertical flip probability')
    g.add_argument('--rotation', default=15.0, type=float, help='max rotation in degrees (basic and dual-eye)')
    g.add_argument('--fundus_crop', default='none', choices=['none', 'fov', 'circle', 'fov_circle'],
                   help='fundus preprocessing before augmentation: crop the black border (fov), the inscribed '
                        'circle (circle), or fov -> circle -> fov')
    g.add_argument('--fov_threshold', default=10, type=int,
                   help='grey level (0-255) above which a pixel belongs to the field of view')
    g.add_argument('--preprocess_size', default=0, type=int,
                   help='resize the preprocessed image so its shorter side is this (0: keep)')
    g.add_argument('--cache_dir', default='', type=str,
                   help='keep preprocessed images here so large originals are decoded once (default: no cache)')
    g.add_argument('--jpeg_draft', default=False, action=b,
                   help='train split: decode JPEGs at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling) where the '
                        'first resize still only shrinks (random resized crop at 224: area >= 224^2/0.06, so 1/2 '
                        'for 3000 px; a resize to S, --preprocess_size or --train_aug basic: shorter side >= 2S, '
                        'after the fundus crop). About 2.5x less decode + crop time on 3000-4000 px JPEGs; the '
                        '224 px crops differ from a full decode by 0.3 of 255 levels on average, up to ~40 at '
                        'sharp edges (sub-pixel shifts; benchmarks/data_pipeline.py). Val, test and predict.py '
                        'always decode fully')
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', type=str,
                   help="RandAugment policy (timm syntax) of --train_aug retfound; '' or 'none' disables it")
    g.add_argument('--smoothing', default=0.1, type=float,
                   help='label smoothing (0.1 as in the 2023/24 RETFound reference; the 2025 reference uses 0)')
    g.add_argument('--reprob', default=0.25, type=float, help='random erasing probability (--train_aug retfound)')
    g.add_argument('--remode', default='pixel', choices=['pixel', 'rand', 'const'],
                   help='random erasing fill: pixel (per-pixel noise), rand (one noise colour per rectangle) or '
                        'const (zeros: the mean colour)')
    g.add_argument('--recount', default=1, type=int, help='random erasing: 1 to N rectangles per image')
    g.add_argument('--resplit', default=False, action=b,
                   help='accepted for compatibility (only matters for the first erasing split, unused here)')
    g.add_argument('--mixup', default=0.0, type=float, help='mixup alpha (not implemented yet: must be 0)')
    g.add_argument('--cutmix', default=0.0, type=float, help='cutmix alpha (not implemented yet: must be 0)')
    g.add_argument('--cutmix_minmax', default=None, type=float, nargs=2, metavar=('MIN', 'MAX'),
                   help='cutmix min/max ratio (not implemented yet)')
    g.add_argument('--mixup_prob', default=1.0, type=float, help='probability of mixup or cutmix (not implemented yet)')
    g.add_argument('--mixup_switch_prob', default=0.5, type=float,
                   help='probability of cutmix instead of mixup (not implemented yet)')
    g.add_argument('--mixup_mode', default='batch', choices=['batch', 'pair', 'elem'],
                   help='mixup/cutmix per batch, pair or element (not implemented yet)')

    g = p.add_argument_group('task, loss and model selection')
    g.add_argument('--task_type', default='', choices=['', *TASK_NAMES], metavar='{' + ','.join(TASK_NAMES) + '}',
                   help="override the dataset's task, e.g. single_label on a grading CSV (default: the dataset's)")
    g.add_argument('--loss', default='auto', choices=['auto', 'ce', 'bce', 'focal', 'hybrid', 'smooth_l1', 'mse'],
                   help='auto: ce (single-label), bce (multi-label), smooth_l1 (regression); hybrid = 0.5 bce + '
                        '0.5 focal')
    g.add_argument('--class_weights', default=False, action=b,
                   help='weight the cross-entropy by inverse class frequency of the training split')
    g.add_argument('--pos_weight', default=False, action=b,
                   help='multi-label BCE pos_weight = negatives / positives per label on the training split')
    g.add_argument('--focal_alpha', default=None, type=float,
                   help='focal loss alpha in [0, 1], -1 for none (default: 0.25 with --loss focal, 0.3 with hybrid)')
    g.add_argument('--focal_gamma', default=None, type=float,
                   help='focal loss gamma (default: 2.0 with --loss focal, 2.5 with hybrid)')
    g.add_argument('--val_metric', default='', type=str,
                   help='validation metric that picks the best checkpoint (default: score for single-label, '
                        'roc_auc for multi-label, kappa_quadratic for regression)')
    g.add_argument('--tune_thresholds', default=None, action=b,
                   help='tune decision thresholds on validation and apply them at test (default: on for '
                        'multi-label, off for regression; single-label predicts the argmax)')
    g.add_argument('--calibrate', default=False, action=b,
                   help='after training, fit a temperature on the best checkpoint\'s validation outputs (minimum '
                        'NLL), store it in the checkpoint and apply it to the test probabilities; decisions do not '
                        'change (single- and multi-label; regression has no probabilities)')
    g.add_argument('--explain', default=None, choices=['rollout', 'gradcam'],
                   help='heat maps of the test images in <run>/explanations (overlay PNG + raw .npy each) and '
                        'examples in report.html: attention rollout (ViT) or Grad-CAM (ViT and CNNs)')
    g.add_argument('--patience', default=0, type=int,
                   help='early stopping: stop when --val_metric has not improved for N epochs in a row (0: off)')
    g.add_argument('--per_class_report', default=False, action=b,
                   help='print per-class precision/recall/F1 after every epoch (always written to '
                        'per_class_val.csv)')
    g.add_argument('--balanced_sampler', default=False, action=b,
                   help='draw training samples with probability inversely proportional to label frequency')

    g = p.add_argument_group('dataset format (CSV and dual-eye tables)')
    g.add_argument('--data_format', default='', type=str,
                   help='folder, npz, csv_multilabel, csv_grading or odir (default: detected from --data_path)')
    g.add_argument('--image_col', default=None, type=str,
                   help='CSV column with the image path (default: a column named like image, filename or path, '
                        'else the only text column)')
    g.add_argument('--label_cols', default=None, type=str,
                   help='comma-separated 0/1 label columns of a multi-label CSV (default: the numeric columns '
                        'other than id, age, sex, patient and split ones)')
    g.add_argument('--grade_col', default=None, type=str,
                   help='CSV column with the numeric grade (default: the one named like grade, level, diagnosis '
                        'or label, or the only numeric column)')
    g.add_argument('--split_col', default=None, type=str,
                   help='CSV column naming the split, train/val/test (default: a column named split; without '
                        'one the data is split here)')
    g.add_argument('--val_ratio', default=0.15, type=float, help='validation fraction when the data is split here')
    g.add_argument('--test_ratio', default=0.15, type=float,
                   help='test fraction when the data is split here (0: test on the validation split)')
    g.add_argument('--split_seed', default=0, type=int, help='seed of the split made here')
    g.add_argument('--image_root', default=None, type=str,
                   help='folder the image paths of a table are relative to (default: the table\'s folder)')
    g.add_argument('--left_col', default=None, type=str,
                   help='paired table: left-eye image column (default: Left-Fundus, or one named like left_image)')
    g.add_argument('--right_col', default=None, type=str,
                   help='paired table: right-eye image column (default: Right-Fundus, or one named like '
                        'right_image)')
    g.add_argument('--patient_col', default=None, type=str,
                   help='patient id column: a split made here keeps each patient in one split, in every '
                        'table format (default: a column named patient_id, patient, subject_id, subject, '
                        'participant_id, participant, pid, or ID when its values repeat)')
    g.add_argument('--eye_mode', default='dual', choices=['dual', 'per_eye'],
                   help='dual: one sample per patient (left, right); per_eye: one sample per eye image')
    g.add_argument('--sheet', default=None, type=str,
                   help='.xlsx tables: the sheet holding the table (default: the first sheet)')
    g.add_argument('--allow_outside_paths', default=False, action=b,
                   help="allow a table's image paths to leave the table's folder (or --image_root)")
    g.add_argument('--skip_image_check', default=False, action=b,
                   help='do not check every image of every split (header and size) before training')

    g = p.add_argument_group('weights and data')
    g.add_argument('--finetune', default='', type=str,
                   help='pre-trained weights: a local file, or a name such as RETFound_mae_meh looked up in '
                        '--weights_dir (default: none, random initialisation)')
    g.add_argument('--weights_dir', default='./weights', type=str, help='where named weights are looked up')
    g.add_argument('--task', default='', type=str,
                   help='run folder name under --output_dir (default: <model>_<data folder or file name>)')
    g.add_argument('--data_path', default=None, type=str,
                   help='class-folder root (<root>/train|val|test/<class>/), .npz file, CSV table (multi-label '
                        'or grading), folder of train/val/test CSVs, or ODIR-5K .xlsx/.csv; required unless '
                        '--config or --resume RUN_FOLDER gives it')
    g.add_argument('--nb_classes', default=None, type=int, help='number of classes (default: from the data)')
    g.add_argument('--output_dir', default='./output_dir', type=str,
                   help='parent of the run folder <output_dir>/<task>/, which holds the checkpoints, metrics, '
                        'log.txt, config.yaml and VisualDL records')
    g.add_argument('--log_dir', default=None, type=str,
                   help='write the VisualDL records (vdlrecords.*) here instead; everything else stays in the '
                        'run folder (default: the run folder)')

    g = p.add_argument_group('run')
    g.add_argument('--device', default='auto', type=_device, choices=['auto', 'cpu', 'gpu'],
                   help="'auto' uses a GPU when Paddle sees one ('cuda' means gpu)")
    g.add_argument('--seed', default=0, type=int, help='random seed (+ process rank)')
    g.add_argument('--resume', default='', type=str,
                   help='continue the run of this checkpoint or run folder (its checkpoint-last.pdparams) with '
                        'its config; with --eval: the checkpoint to evaluate (a folder: its checkpoint-best)')
    g.add_argument('--start_epoch', default=0, type=int,
                   help='first epoch of a new run (a resumed run continues after its checkpoint\'s epoch)')
    g.add_argument('--eval', default=False, action=b, help='only evaluate --resume on the test split, no training')
    g.add_argument('--dist_eval', default=False, action=b,
                   help='accepted for compatibility: distributed evaluation is always exact here')
    g.add_argument('--num_workers', default=None, type=int,
                   help='data loader worker processes; 0 reads the batches in the main process (default: from '
                        "the cores: one less than this process's share, at most 8)")
    g.add_argument('--pin_mem', default=True, action=b, help='pin host memory for faster GPU copies')
    g.add_argument('--no_pin_mem', action='store_false', dest='pin_mem', default=argparse.SUPPRESS,
                   help='reference spelling of --no-pin_mem')
    g.add_argument('--savemodel', default=True, action=b, help='save the best checkpoint')
    g.add_argument('--save_last_every', default=1, type=int, metavar='N',
                   help='write checkpoint-last.pdparams (the resumable state: model, optimizer moments, RNG; about '
                        '3x the model, 3.6 GB for ViT-L) every N epochs, and always at the last epoch, at an early '
                        'stop and with each new checkpoint-best; a crash or Ctrl-C loses up to N-1 epochs')
    g.add_argument('--async_save', default=False, action=b,
                   help='write checkpoints in a background thread: training waits only for a copy of the state in '
                        'memory (as large as checkpoint-last, 3.6 GB for ViT-L, kept for the whole run), the write is '
                        'fsynced and renamed into place; the next save and the end of training wait for it, and a '
                        'failed write stops the run there')

    g = p.add_argument_group('evaluation protocol', 'repeated runs and external validation: sub-runs of this '
                             'command, one after another, in the run folder <output_dir>/<task>/, then a summary '
                             'table; run the same command again to finish what an interrupted one left')
    g.add_argument('--seeds', default=0, type=int,
                   help='repeat the run with N seeds (--seed, --seed + 1, ...; same split): sub-runs '
                        '<task>/<task>_seed<k>, then seeds_summary.csv/.md with each seed, the mean, SD and 95%% '
                        't-interval of every test metric (default: 0, one run)')
    g.add_argument('--kfold', default=0, type=int,
                   help='K-fold cross-validation: every split pooled into K folds (by patient where the table '
                        'has a patient column, stratified by label); fold k is the test split of sub-run '
                        '<task>/<task>_fold<k>, val comes from the other folds; then kfold_summary.csv/.md '
                        '(default: 0, the usual split)')
    g.add_argument('--fold', default=None, type=int,
                   help='with --kfold K: run fold k alone (0..K-1), as a plain run (default: every fold)')
    g.add_argument('--external', default='', type=str,
                   help='comma-separated datasets to evaluate the checkpoint on (the one this command trains, or '
                        '--eval --resume CKPT): the test split of each, classes matched by name, in '
                        '<task>/external/<name>/; then external_summary.csv/.md, one row per dataset')

    g = p.add_argument_group('reference launcher flags', _LAUNCHER_NOTE + '; start several processes with '
                             '`python -m paddle.distributed.launch --nproc_per_node N main_finetune.py ...`')
    g.add_argument('--world_size', default=1, type=int, help='ignored: the launcher sets the number of processes')
    g.add_argument('--local_rank', default=-1, type=int, help="ignored: the launcher sets each process's rank")
    g.add_argument('--dist_on_itp', default=False, action=b, help="ignored (the reference's switch for an MPI cluster)")
    g.add_argument('--dist_url', default='env://', type=str, help='ignored: the launcher sets the endpoints')
    return p


def _primary_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> the action that defines it (the first one; later ones are reference spellings)."""
    out: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if a.dest in ('help', 'config') or a.dest in out:
            continue
        out[a.dest] = a
    return out


def _is_bool(action: argparse.Action) -> bool:
    return isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction,
                               argparse._StoreFalseAction))


def _type_name(action: argparse.Action) -> str:
    if _is_bool(action):
        return 'true or false'
    name = getattr(action.type, '__name__', 'str') if action.type else 'str'
    name = 'str' if name == '_device' else name
    if action.nargs not in (None, '?'):
        return f"a list of {action.nargs} {name} values"
    return f"a {name}" + (f" in {list(action.choices)}" if action.choices else '')


def _coerce_scalar(value: Any, action: argparse.Action, where: str) -> Any:
    bad = UserError(f"{where}: {value!r} is not valid (expected {_type_name(action)}); fix the value")
    typ = action.type or str
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise bad
    try:
        if typ is int:
            if isinstance(value, str):
                value = value.strip()
                try:
                    return int(value)
                except ValueError:
                    value = float(value)
            if isinstance(value, float):
                if not value.is_integer():
                    raise bad
                return int(value)
            return int(value)
        if typ is float:
            return float(value)
        return typ(value if isinstance(value, str) else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise bad from None


def _coerce(key: str, value: Any, action: argparse.Action, where: str) -> Any:
    where = f"{where}: {key}"
    if value is None:
        if action.default is None:
            return None
        raise UserError(f"{where}: null is not allowed (expected {_type_name(action)}); remove the line to use "
                        f"the default {action.default!r}")
    if _is_bool(action):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ('true', 'false'):
            return value.strip().lower() == 'true'
        raise UserError(f"{where}: {value!r} is not valid (expected true or false); fix the value")
    if action.nargs not in (None, '?'):
        if not isinstance(value, (list, tuple)) or len(value) != action.nargs:
            raise UserError(f"{where}: {value!r} is not valid (expected {_type_name(action)}); write it as "
                            f"[a, b]")
        return [_coerce_scalar(v, action, where) for v in value]
    value = _coerce_scalar(value, action, where)
    if action.choices is not None and value not in action.choices:
        near = close_matches(str(value), [str(c) for c in action.choices])
        hint = f"did you mean {near[0]!r}? " if near else ''
        raise UserError(f"{where}: {value!r} is not one of {list(action.choices)}; {hint}fix the value")
    return value


class _DuplicateKey(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last
    one silently, so a preset edited in two places would quietly lose the first value)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"key {key!r} is set twice, on line {seen[key]} and on line {line}")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml_preset(path: str, parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """Read a YAML preset into {dest: typed value}; unknown keys and bad values raise UserError."""
    parser = parser or get_args_parser()
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: file not found; pass the path of a YAML preset (see configs/)")
    try:
        with open(path, encoding='utf8') as f:
            data = yaml.load(f, Loader=_StrictLoader)
    except _DuplicateKey as exc:
        raise UserError(f"--config {path}: {exc}; keep one of them") from None
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid YAML ({exc}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: top level is a {type(data).__name__} (expected a mapping of flag "
                        f"names to values, e.g. 'batch_size: 16'); fix the file")
    actions = _primary_actions(parser)
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).lstrip('-').replace('-', '_')
        if key == 'config':
            raise UserError(f"--config {path}: a preset cannot name another preset ('config' key); remove it")
        negate = False
        if key in _YAML_ALIASES:
            key, negate = _YAML_ALIASES[key]
        if key not in actions:
            near = close_matches(key, list(actions) + list(_YAML_ALIASES))
            hint = f"did you mean {', '.join(repr(n) for n in near)}? " if near else ''
            raise UserError(f"--config {path}: unknown key {raw_key!r} (expected a flag name without dashes); "
                            f"{hint}see --help for the flags")
        if key in out:
            raise UserError(f"--config {path}: {key!r} is set twice; keep one")
        value = _coerce(str(raw_key), value, actions[key], f"--config {path}")
        out[key] = (not value) if negate else value
    return out


def _explicit_cli(argv: list[str]) -> dict[str, Any]:
    """Only the options given on the command line (parsed with every default suppressed)."""
    parser = get_args_parser()
    for a in parser._actions:
        a.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def resolve_config(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``), apply the ``--config`` preset under the explicit flags,
    validate, and return the namespace. Raises UserError on any problem."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_args_parser()
    cfg = parser.parse_args(argv)
    explicit = _explicit_cli(argv) if cfg.config or cfg.resume else {}
    if cfg.config:
        for key, value in load_yaml_preset(cfg.config, parser).items():
            if key not in explicit:
                setattr(cfg, key, value)
    cfg._notes = []  # lines for the main process to print (not part of the saved config)
    if cfg.resume:  # the run folder's config and the checkpoint's identity (util/run_config.py)
        from util.run_config import read_run_config, restore_run

        run_config = read_run_config(cfg.resume, cfg.eval, lambda path: load_yaml_preset(path, parser))
        cfg._notes = restore_run(cfg, explicit, run_config)
    validate_config(cfg)
    return cfg


def validate_config(cfg: argparse.Namespace) -> None:
    """Check values that argparse cannot (ranges, combinations); raise UserError naming the flag."""
    def fail(flag: str, what: str, expected: str, fix: str) -> None:
        raise UserError(f"--{flag} {getattr(cfg, flag)!r}: {what} ({expected}); {fix}")

    model_for_arch(cfg.model, cfg.model_arch)   # a --model / --model_arch pair that does not fit raises
    if not cfg.data_path:
        raise UserError("--data_path: missing (a class-folder root or a .npz file is required); pass "
                        "--data_path <path> or set data_path in the --config preset")
    for flag in ('batch_size', 'epochs', 'accum_iter', 'input_size', 'recount', 'print_freq', 'world_size'):
        if getattr(cfg, flag) is not None and getattr(cfg, flag) < 1:
            fail(flag, 'out of range', 'expected a positive integer', f'pass --{flag} 1 or more')
    for flag in ('num_workers', 'start_epoch', 'seed', 'patience'):  # num_workers None: from the cores
        if getattr(cfg, flag) is not None and getattr(cfg, flag) < 0:
            fail(flag, 'is negative', 'expected 0 or more', f'pass --{flag} 0 or more')
    if cfg.save_last_every < 1:
        fail('save_last_every', 'out of range', 'expected a positive number of epochs; 1 writes checkpoint-last '
             'after every epoch', 'pass --save_last_every 1 or more')
    finite = ['drop_path', 'weight_decay', 'blr', 'layer_decay', 'min_lr', 'warmup_epochs', 'smoothing',
              'reprob', 'mixup', 'cutmix', 'mixup_prob', 'mixup_switch_prob']
    for flag in finite + ['lr', 'clip_grad', 'color_jitter']:
        v = getattr(cfg, flag)
        if v is not None and not math.isfinite(v):
            fail(flag, 'is not a finite number', 'expected a finite number', 'fix the value')
    for flag in ('weight_decay', 'min_lr', 'warmup_epochs'):
        if getattr(cfg, flag) < 0:
            fail(flag, 'is negative', 'expected 0 or more', 'fix the value')
    if cfg.blr <= 0:
        fail('blr', 'out of range', 'expected > 0', 'pass a positive base LR, e.g. --blr 5e-3')
    if cfg.lr is not None and cfg.lr <= 0:
        fail('lr', 'out of range', 'expected > 0', 'pass a positive LR or leave --lr out to use --blr')
    if cfg.clip_grad is not None and cfg.clip_grad <= 0:
        fail('clip_grad', 'out of range', 'expected > 0', 'pass a positive max norm or leave --clip_grad out')
    if cfg.color_jitter is not None and cfg.color_jitter < 0:
        fail('color_jitter', 'is negative', 'expected 0 or more', 'fix the value')
    if not 0.0 <= cfg.layer_decay <= 1.0:
        fail('layer_decay', 'out of range', 'expected 0 <= layer_decay <= 1; 1 disables the decay',
             'e.g. --layer_decay 0.65')
    if not 0.0 <= cfg.drop_path < 1.0:
        fail('drop_path', 'out of range', 'expected 0 <= drop_path < 1', 'e.g. --drop_path 0.2')
    if not 0.0 <= cfg.smoothing < 1.0:
        fail('smoothing', 'out of range', 'expected 0 <= smoothing < 1', 'e.g. --smoothing 0.1')
    if not 0.0 <= cfg.reprob <= 1.0:
        fail('reprob', 'out of range', 'expected a probability in [0, 1]', 'e.g. --reprob 0.25')
    # --warmup_epochs longer than --epochs is accepted, as in the reference (the LR stays in warmup);
    # config_warnings() says so
    if cfg.start_epoch >= cfg.epochs and not cfg.eval:
        fail('start_epoch', f'is not before --epochs {cfg.epochs}', 'expected start_epoch < epochs',
             'raise --epochs or lower --start_epoch')
    if cfg.nb_classes is not None and cfg.nb_classes < 1:
        fail('nb_classes', 'out of range', 'expected 1 or more', 'pass the number of classes or leave it out')
    if cfg.focal_alpha is not None and not (0.0 <= cfg.focal_alpha <= 1.0 or cfg.focal_alpha == -1):
        fail('focal_alpha', 'out of range', 'expected a value in [0, 1], or -1 for no alpha weighting', 'e.g. 0.25')
    for flag in ('hflip', 'vflip'):
        if not 0.0 <= getattr(cfg, flag) <= 1.0:
            fail(flag, 'out of range', 'expected a value in [0, 1]', 'fix the value')
    for flag in ('val_ratio', 'test_ratio'):
        if not 0.0 <= getattr(cfg, flag) < 1.0:
            fail(flag, 'out of range', 'expected a fraction in [0, 1)', 'e.g. 0.15')
    if cfg.val_ratio + cfg.test_ratio >= 1.0:
        fail('val_ratio', f'plus --test_ratio {cfg.test_ratio} leaves no training data', 'expected a sum < 1',
             'lower the ratios')
    for flag in ('rotation', 'focal_gamma', 'preprocess_size', 'plateau_patience', 'momentum'):
        if getattr(cfg, flag) is not None and getattr(cfg, flag) < 0:
            fail(flag, 'is negative', 'expected 0 or more', 'fix the value')
    if not 0 <= cfg.fov_threshold <= 255:
        fail('fov_threshold', 'out of range', 'expected a grey level 0..255', 'e.g. --fov_threshold 10')
    if not 0.0 < cfg.backbone_lr_scale:
        fail('backbone_lr_scale', 'out of range', 'expected > 0; use --freeze_backbone to stop the backbone',
             'e.g. --backbone_lr_scale 0.1')
    if cfg.crop_pct is not None and not 0.0 < cfg.crop_pct <= 1.0:
        fail('crop_pct', 'out of range', 'expected 0 < crop_pct <= 1', 'e.g. --crop_pct 0.875')
    if cfg.step_size < 1:
        fail('step_size', 'out of range', 'expected 1 or more epochs', 'e.g. --step_size 10')
    for flag in ('step_gamma', 'plateau_factor'):
        if not 0.0 < getattr(cfg, flag) < 1.0:
            fail(flag, 'out of range', 'expected a factor in (0, 1)', 'e.g. 0.1')
    if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None:
        raise UserError(f"--mixup {cfg.mixup} / --cutmix {cfg.cutmix} / --cutmix_minmax {cfg.cutmix_minmax}: "
                        f"mixup and cutmix are not implemented in this toolkit yet (expected --mixup 0 --cutmix 0 "
                        f"and no --cutmix_minmax, as in the RETFound recipe); remove these flags")
    from util.lr_sched import effective_lr
    peak = effective_lr(cfg.blr, cfg.lr, cfg.batch_size, cfg.accum_iter, cfg.world_size)
    if cfg.min_lr > peak:
        fail('min_lr', f'is above the peak LR {peak:.3g}', 'expected min_lr <= peak LR',
             'lower --min_lr or raise --lr/--blr')
    from util.protocol.options import validate_protocol
    validate_protocol(cfg)  # --seeds, --kfold/--fold, --external
    check_adaptation_flags(cfg)  # --adaptation, --lora_*, --lp_cached_features, --dataratio


def config_warnings(cfg: argparse.Namespace) -> list[str]:
    """Settings that are valid but probably not meant, one line each (printed by the main process)."""
    out = []
    if not cfg.eval and cfg.warmup_epochs > cfg.epochs:
        out.append(f"warning: --warmup_epochs {cfg.warmup_epochs:g} is longer than --epochs {cfg.epochs}: the LR "
                   f"stays in its linear warmup for the whole run (peak never reached), as in the reference; "
                   f"pass e.g. --warmup_epochs {max(0.0, cfg.epochs / 10):g} for a full schedule")
    return out


def config_to_dict(cfg: argparse.Namespace) -> dict[str, Any]:
    """Plain {flag name: value} of a resolved config (the ``config`` preset path left out), YAML-safe."""
    out: dict[str, Any] = {}
    for key, value in sorted(vars(cfg).items()):
        if key == 'config' or key.startswith('_'):
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def save_config(cfg: argparse.Namespace, path: str) -> str:
    """Write the resolved config as YAML, atomically; the file is itself a valid ``--config`` preset."""
    text = f"# Resolved fine-tuning config (preset: {getattr(cfg, 'config', None) or 'none'}). " \
           f"Re-run with: --config {os.path.basename(path)}\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=True, default_flow_style=False)
    with atomic_path(path, suffix='.yaml') as tmp:
        with open(tmp, 'w', encoding='utf8') as f:
            f.write(text)
    return path
