"""The protocol flags (``--seeds``, ``--kfold``/``--fold``, ``--external``): which protocol a config asks for,
and the checks ``util.config.validate_config`` runs on them. No Paddle, no dataset reading: this runs for
every command line."""
from __future__ import annotations

import argparse
import os

from util.errors import UserError

# the protocol that runs sub-runs of the command: seeds, kfold (every fold), external
PROTOCOLS = ("seeds", "kfold", "external")


def external_paths(value: str) -> list[str]:
    """The datasets of ``--external`` (comma-separated, blanks dropped)."""
    return [p.strip() for p in (value or "").split(",") if p.strip()]


def protocol_of(cfg: argparse.Namespace) -> str | None:
    """'seeds', 'kfold' (the driver over every fold: ``--kfold`` without ``--fold``), 'external', or ``None``
    (a plain run, which ``--kfold K --fold k`` is)."""
    if getattr(cfg, "seeds", 0):
        return "seeds"
    if getattr(cfg, "kfold", 0) and getattr(cfg, "fold", None) is None:
        return "kfold"
    if external_paths(getattr(cfg, "external", "")):
        return "external"
    return None


def validate_protocol(cfg: argparse.Namespace) -> None:
    """Raise ``UserError`` for a protocol flag out of range or a combination that cannot work."""
    seeds, kfold, fold = cfg.seeds, cfg.kfold, cfg.fold
    external = external_paths(cfg.external)
    if seeds == 1 or seeds < 0:
        raise UserError(f"--seeds {seeds}: out of range (0 for one run, or 2 or more seeds; the RETFound protocol "
                        f"uses 5); pass --seeds 5, or leave --seeds out for a single run")
    if kfold == 1 or kfold < 0:
        raise UserError(f"--kfold {kfold}: out of range (0 for the usual split, or 2 or more folds); pass e.g. "
                        f"--kfold 5")
    if fold is not None and not kfold:
        raise UserError(f"--fold {fold}: given without --kfold (the fold to test is one of K folds); pass --kfold K "
                        f"with it, or drop --fold")
    if fold is not None and not 0 <= fold < kfold:
        raise UserError(f"--fold {fold}: not one of the folds of --kfold {kfold} (0..{kfold - 1}); pass --fold 0 to "
                        f"--fold {kfold - 1}, or leave --fold out to run every fold")
    asked = [f for f, on in (("--seeds", seeds), ("--kfold", kfold), ("--external", external)) if on]
    if len(asked) > 1:
        raise UserError(f"{' and '.join(asked)}: one protocol per command (each writes its own sub-runs and "
                        f"summary); run them as separate commands, e.g. evaluate a seed's checkpoint with "
                        f"--eval --resume RUN --external ...")
    if asked and "," in str(getattr(cfg, "dataratio", "")):  # a ratio sweep is sub-runs of its own
        raise UserError(f"{asked[0]} with --dataratio {cfg.dataratio}: a list of ratios runs sub-runs of its own "
                        f"(one per ratio); run one ratio per command, e.g. --dataratio 0.3 {asked[0]} ...")
    if (seeds or (kfold and fold is None)) and cfg.eval:
        flag = "--seeds" if seeds else "--kfold"
        raise UserError(f"{flag} with --eval: an evaluation trains nothing to repeat (one checkpoint, one result); "
                        f"drop {flag}, or evaluate one fold's checkpoint with --kfold K --fold k")
    if (seeds or (kfold and fold is None)) and cfg.resume:
        flag = "--seeds" if seeds else "--kfold"
        raise UserError(f"{flag} with --resume {cfg.resume}: the sub-runs resume themselves; run the same command "
                        f"again without --resume (finished sub-runs are kept, an unfinished one continues from its "
                        f"checkpoint-last.pdparams)")
    if kfold and (cfg.data_format == "npz" or str(cfg.data_path or "").lower().endswith(".npz")):
        raise UserError(f"--kfold {kfold}: the npz format keeps its given splits (--data_path {cfg.data_path}); use "
                        f"class folders or a table for cross-validation, or drop --kfold")
    if external:
        if cfg.eval and not cfg.resume:
            raise UserError("--external with --eval: no checkpoint to evaluate (--resume CKPT or a run folder); "
                            "pass --resume, or drop --eval to train on --data_path and then evaluate externally")
        missing = [p for p in external if not os.path.exists(p)]
        if missing:
            raise UserError(f"--external: {', '.join(missing)} not found (datasets as --data_path takes them, "
                            f"comma-separated); check the paths")
