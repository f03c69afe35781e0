"""``python cli.py --help``: what the project is, its subcommands, and every preset with its one-line header."""

from __future__ import annotations

import argparse
from pathlib import Path

from jsonargparse import DefaultHelpFormatter

GROUPS = ("data", "model", "optim", "minimizer", "callbacks", "trainer", "experiments")

DESCRIPTION = """\
flatminima: sharpness-aware training (SAM, L-inf SAM, USAM, ASAM, GSAM, Adaptive-GSAM and the cheaper
LookSAM, SAM on some steps, AE-SAM, Momentum-SAM, ESAM, SAF, MESA, on any base optimizer) and sharpness,
flatness and norm measures (minimum, adaptive worst-case, gradient-norm, Hessian, Jiang et al.'s PAC-Bayes,
sharpness and norm measures) with PyTorch Lightning, driven by YAML configs.

subcommands:
  fit                train (with no --config: the default, GSAM on moons), then test the final weights
  validate, test     evaluate a checkpoint: --ckpt_path <run>/checkpoints/<file>.ckpt (the run's config
                     is found beside it; output goes into that run's folder)
  predict            predict with a checkpoint
  study run|analyze  pools of runs over a grid of presets and seeds, and sharpness-vs-generalization
                     statistics (python cli.py study --help)

compose a run: python cli.py fit [--config FILE ...] [--key value ...] [--name NAME]
  Preset files layer on the default (an experiment file replaces it); later files and --key value
  override earlier ones; --print_config shows the result. Runs log to logs/<name>/version_<n>/.
  Errors are one line; --verbose_errors (or FLATMINIMA_DEBUG=1) shows the parser's full output and
  tracebacks. Options of a subcommand: python cli.py fit --help."""


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's formatter that keeps the description's and epilog's line breaks."""


def header(path: Path, limit: int = 100) -> str:
    """The one-line summary of a YAML file: its first comment line (continued until a sentence ends, then cut
    to ``limit`` characters at a word); empty when the file does not start with a comment."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    text = ""
    for line in lines:
        if not line.startswith("#"):
            break
        text = f"{text} {line.lstrip('#').strip()}".strip()
        if text.endswith((".", ")", '"')):
            break
    if len(text) > limit:
        text = text[: limit - 1].rsplit(" ", 1)[0].rstrip(" ,;:(") + "…"
    return text


def presets_epilog(configs: Path, name_width: int = 24) -> str:
    """``presets:`` then, group by group, one ``  name  header`` line per file (long names get their own line)."""
    folders = [configs / g for g in GROUPS if (configs / g).is_dir()]
    folders += sorted(p for p in configs.iterdir() if p.is_dir() and p.name not in GROUPS) if configs.is_dir() else []
    lines = ["presets: python cli.py fit --config configs/<group>/<name>.yaml (each with its header line)"]
    for folder in folders:
        files = sorted(folder.glob("*.yaml"))
        if not files:
            continue
        usage = " (python cli.py study run configs/studies/<name>.yaml)" if folder.name == "studies" else ""
        lines.append(f"  {folder.name}/{usage}")
        pad = min(max(len(f.stem) for f in files), name_width)
        for f in files:
            if len(f.stem) > pad:
                lines += [f"    {f.stem}", f"    {'':{pad}}  {header(f)}"]
            else:
                lines.append(f"    {f.stem:{pad}}  {header(f)}")
    return "\n".join(lines)
