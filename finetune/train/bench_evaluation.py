"""What a worker's bench measures of a run: its chunk's evaluation (teacher-forced and generated, as
`evaluate.chunk.due` says), and with `training_args.eval_on_start` the untrained run at step 0, shared by runs
that are their base model there. Split from `workbench.py`, which trains and makes chunks durable."""

from __future__ import annotations

import time
from typing import Any, Callable

from finetune.evaluate.chunk import GenerationEvaluator, base_reusable, due, token_accuracy
from finetune.evaluate.samples import KeptAnswer
from finetune.plan.model import PlannedRun
from finetune.train.bases import LoadedBase
from finetune.train.session import MetricsSink, RunSession

Measured = tuple[dict[str, float], tuple[KeptAnswer, ...]]


class BenchEvaluation:
    """`sink`: where the values the trainer's own evaluation does not log go (token_accuracy under its eval_conf
    name, the generation metrics), for the curves and MLflow; `warn(run_id, chunk, failure)`: a custom metric
    that failed (the run goes on); `base_of(run_id)`: the run's loaded base model."""

    def __init__(self, sink: MetricsSink | None, warn: Callable[[str, int, Any], None],
                 base_of: Callable[[str], LoadedBase]) -> None:
        self.sink, self.warn, self.base_of = sink, warn, base_of
        self.generation = GenerationEvaluator()
        self.base_scores: dict[str, Measured] = {}

    def measure(self, run: PlannedRun, config: Any, session: RunSession, chunk: int, asked: bool,
                judged: bool = False) -> Measured:
        """The chunk's metrics (`asked`: the controller's evaluation cadence; `judged`: the search compares runs
        here) and the answers kept."""
        what = due(config, chunk, len(run.derived.chunk_steps or []), asked, judged)
        return self._evaluate(run, config, session, chunk, what.teacher_forced, what.generation)

    def at_start(self, run: PlannedRun, config: Any, session: RunSession,
                 max_eval_samples: int | None) -> tuple[tuple[KeptAnswer, ...], float]:
        """With eval_on_start, at the run's step 0 (not again when it resumes later): the answers kept and the
        seconds it took."""
        if not (getattr(config.training_args, "eval_on_start", False) and session.step == 0):
            return (), 0.0
        started = time.perf_counter()
        answers = self._measure_base(run, config, session, max_eval_samples)
        return answers, time.perf_counter() - started

    def _evaluate(self, run: PlannedRun, config: Any, session: RunSession, chunk: int, teacher_forced: bool,
                  generation: bool) -> Measured:
        metrics = session.evaluate() if teacher_forced and session.trainer.eval_dataset is not None else {}
        extra = token_accuracy(session.trainer) if metrics and "token_accuracy" in config.eval_conf.metrics else {}
        answers: tuple[KeptAnswer, ...] = ()
        if generation:
            base = self.base_of(run.run_id)
            try:
                measured = self.generation.measure(session, config, base.tokenizer, base.input_pad_id,
                                                   base.data_keys[run.run_id])
            finally:
                for failure in self.generation.take_failures():
                    self.warn(run.run_id, chunk, failure)
            extra.update(measured.values)
            answers = measured.answers
        if extra and self.sink is not None:
            self.sink(run.run_id, session.step, extra)
        return {**metrics, **extra}, answers

    def _measure_base(self, run: PlannedRun, config: Any, session: RunSession,
                      max_eval_samples: int | None) -> tuple[KeptAnswer, ...]:
        """Every evaluation of eval_conf on the untrained run, logged at step 0 (the trainer's evaluation logs
        itself there; the rest goes to the sink). Runs that are their base model exactly at step 0
        (`base_reusable`) and share base, data and eval_conf reuse one measurement."""
        if config.method == "grpo":
            return ()
        base = self.base_of(run.run_id)
        key = "\n".join([base.key, base.data_keys[run.run_id], config.eval_conf.model_dump_json(), str(max_eval_samples)])
        if base_reusable(config) and key in self.base_scores:
            metrics, answers = self.base_scores[key]
            if metrics and self.sink is not None:
                self.sink(run.run_id, 0, metrics)
            return answers
        metrics, answers = self._evaluate(run, config, session, 0, bool(config.eval_conf.teacher_forced),
                                          config.eval_conf.needs_generation)
        if base_reusable(config):
            self.base_scores[key] = (metrics, answers)
        return answers
