"""What a training run shows and records besides metrics.jsonl: the status line (through the package logger,
rank 0), a tqdm bar over the steps, wandb (the user's mode, one run id per run folder, sample grids) and the
PNG plots written at the end (megatron_apt.metrics.plots).

Every method is a no-op on ranks other than 0.
"""

from __future__ import annotations

import math
import netrc
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from megatron_apt.utils import get_logger, progress

log = get_logger("megatron_apt.trainer")

WANDB_ID_FILE = "wandb_run_id"
STATUS_KEYS = ("loss", "d_loss", "g_loss", "ar1", "logit_gap")


def wandb_logged_in() -> bool:
    """Whether wandb has credentials for its host: WANDB_API_KEY, or a netrc entry as `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    paths = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            continue
        try:
            return bool(host) and netrc.netrc(str(path)).authenticators(host) is not None
        except (netrc.NetrcParseError, OSError):
            return False
    return False


def resolve_wandb_mode(requested: str | None) -> str:
    """The wandb mode of a run: the config's wandb_mode, else $WANDB_MODE, else online when logged in and
    offline otherwise."""
    if requested:
        return requested
    env = os.environ.get("WANDB_MODE", "").strip()
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    return "online" if wandb_logged_in() else "offline"


def status_line(stage: str, rec: dict[str, Any], steps: int) -> str:
    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "nan".rjust(len(format(0.0, fmt)))

    parts = " ".join(f"{k} {num(rec[k], '9.4f')}" for k in STATUS_KEYS if k in rec)
    return (f"[{stage}] step {rec['step']:6d}/{steps} {parts} | {num(rec.get('samples_per_s'), '8.2f')} samples/s "
            f"{num(rec.get('tflops'), '8.3f')} TFLOP/s mfu {num(100 * (rec.get('mfu') or 0.0), '5.1f')}% | mem "
            f"{num(rec.get('peak_mem_gb'), '6.2f')} GB")


class Telemetry:
    """Rank 0's view of a run. `start` opens the bar and wandb, `record` shows one metrics record, `step`
    advances the bar, `samples` sends a sample grid to wandb, `finish` writes the plots and closes both."""

    def __init__(self, cfg, run_dir: Path, rank: int):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.bar = None
        self.wandb = None

    # ---- lifecycle ----
    def start(self, step: int) -> None:
        if self.rank != 0:
            return
        self.bar = progress(total=self.cfg.steps, initial=step, desc=f"[{self.cfg.stage}]", unit="step")
        self._init_wandb()

    def _init_wandb(self) -> None:
        c = self.cfg
        if not c.wandb_project:
            return
        mode = resolve_wandb_mode(c.wandb_mode)
        if mode == "disabled":
            log.info("wandb disabled (wandb_mode / WANDB_MODE)")
            return
        import wandb  # imported lazily: a heavy import that most runs do not need

        from megatron_apt.config.train import config_to_dict

        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if not run_id:
            run_id = secrets.token_hex(4)  # wandb's own ids are 8 lowercase letters and digits too
            from megatron_apt.utils import atomic_write

            with atomic_write(id_file, "w") as f:
                f.write(run_id + "\n")
        self.wandb = wandb.init(project=c.wandb_project, dir=str(self.run_dir), config=config_to_dict(c),
                                name=self.run_dir.name, id=run_id, resume="allow", mode=mode)
        log.info("wandb %s run %s (id %s, kept in %s)", mode, self.wandb.name, run_id, id_file)

    def finish(self) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.cfg.plots:
            try:
                from megatron_apt.metrics.plots import plot_run

                written = plot_run(self.run_dir)
                if written:
                    log.info("wrote %d plot(s) to %s", len(written), written[0].parent)
                if self.wandb is not None:
                    import wandb

                    self.wandb.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in written})
            except Exception as e:  # a plot must never cost a finished run
                log.warning("could not write the plots: %s", e)
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    # ---- per step ----
    def record(self, rec: dict[str, Any]) -> None:
        """A metrics record that was just written to metrics.jsonl: status line, bar postfix, wandb."""
        if self.rank != 0:
            return
        log.info("%s", status_line(self.cfg.stage, rec, self.cfg.steps))
        if self.bar is not None:
            self.bar.set_postfix({k: f"{rec[k]:.4g}" for k in STATUS_KEYS if isinstance(rec.get(k), (int, float))},
                                 refresh=False)
        if self.wandb is not None:
            self.wandb.log(rec, step=rec["step"])

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def samples(self, grid: Path, step: int, clip: Path | None = None) -> None:
        """Send the sample grid written at `grid` (and, for videos, the clip at `clip`) to wandb."""
        if self.rank != 0 or self.wandb is None:
            return
        import wandb

        media = {"samples/grid": wandb.Image(str(grid), caption=f"one-step samples, step {step}")}
        if clip is not None:
            media["samples/video"] = wandb.Video(str(clip), caption=f"one-step sample, step {step}")
        self.wandb.log(media, step=step)
