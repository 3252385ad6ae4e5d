"""W&B tracking, for the runs whose `training_args.report_to` names `wandb`.

The controller logs every metric a worker reports to MLflow; the runs that ask for W&B get the same
metrics at the same steps in a W&B run of their own: one per finetune run, grouped by experiment, its
knobs and concrete config as the W&B config. The W&B run's id is the run's MLflow run id (else its
finetune id), so `finetune run --resume` continues the same W&B run. W&B's own settings apply:
`WANDB_MODE=offline` writes the runs under the experiment folder (`wandb/`) without any network,
`WANDB_PROJECT` names the project unless `training_args.project` does (default: the experiment's
tracking name). W&B drops a metric logged at a step lower than one it already has, which only
happens to metrics a resumed run repeats.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

EXIT_CODES = {"FINISHED": 0, "FAILED": 1, "KILLED": 1}


def wants_wandb(config: Any) -> bool:
    from finetune.config.training_keys import report_to_values

    return "wandb" in report_to_values(getattr(config.training_args, "report_to", None))


def project_of(config: Any, experiment_name: str) -> str:
    args = config.training_args
    if "project" in args.model_fields_set and args.project:
        return str(args.project)
    return os.environ.get("WANDB_PROJECT") or experiment_name


class WandbRuns:
    """The W&B runs of one experiment, opened on their first metric and finished with their finetune run."""

    def __init__(self, root: Path, experiment_name: str) -> None:
        self.root, self.experiment_name = root, experiment_name
        self.runs: dict[str, Any] = {}

    def log(self, run_id: str, wandb_id: str, config: Any, planned: Any, step: int, metrics: dict[str, float]) -> None:
        self._run(run_id, wandb_id, config, planned).log(dict(metrics), step=step)

    def end(self, run_id: str, wandb_id: str, config: Any, planned: Any, status: str) -> None:
        run = self._run(run_id, wandb_id, config, planned)
        run.finish(exit_code=EXIT_CODES.get(status, 1))
        self.runs.pop(run_id, None)

    def close(self) -> None:
        for run in self.runs.values():
            run.finish()
        self.runs.clear()

    def _run(self, run_id: str, wandb_id: str, config: Any, planned: Any) -> Any:
        run = self.runs.get(run_id)
        if run is None:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("training_args.report_to names wandb, which is not installed: "
                                   "pip install 'finetune[wandb]'") from None
            run = wandb.init(
                project=project_of(config, self.experiment_name), id=wandb_id, name=f"{run_id} {planned.label}",
                group=self.experiment_name, dir=str(self.root), resume="allow", reinit="create_new",
                config={"knobs": dict(planned.knobs), "config": planned.config, "finetune_run_id": run_id},
            )
            self.runs[run_id] = run
        return run
