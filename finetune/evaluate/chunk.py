"""What a chunk boundary measures, by `eval_conf`, and the generation metrics themselves.

The teacher-forced pass (the trainer's evaluation: eval_loss, token_accuracy) runs on the chunks
the controller asks for (`experiment.eval_every_chunks`). Generation metrics run every
`eval_conf.generation.every_chunks` chunks and after the last. Both also run wherever the search
compares runs by its metric (`judged`: the search says where, `search.contract.Searcher.measures`, and
the task carries it), so that a run is never judged without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from finetune.evaluate.samples import EvalSample, KeptAnswer, eval_samples, kept_answers

logger = logging.getLogger(__name__)
TOO_LONG_METRIC = "generation_prompts_too_long"


@dataclass(frozen=True)
class EvalDue:
    teacher_forced: bool
    generation: bool


def due(config: Any, chunk: int, total_chunks: int, asked: bool, judged: bool = False) -> EvalDue:
    """What to measure after `chunk` (0-based) of a run of `total_chunks`; `asked`: the controller's
    evaluation cadence; `judged`: the search compares runs here. GRPO is ranked by the rewards it logs
    while training (merged into the chunk's record by the controller): nothing."""
    if config.method == "grpo":
        return EvalDue(False, False)
    eval_conf, done = config.eval_conf, chunk + 1
    compared = judged
    every = eval_conf.generation.every_chunks
    generation = eval_conf.needs_generation and (done % every == 0 or done == total_chunks or compared)
    return EvalDue(bool(eval_conf.teacher_forced) and (asked or compared), generation)


def token_accuracy(trainer: Any) -> dict[str, float]:
    """token_accuracy of the evaluation just done: TRL's SFT trainer logs it (eval_mean_token_accuracy)."""
    history = trainer.state.log_history
    value = history[-1].get("eval_mean_token_accuracy") if history else None
    return {} if value is None else {"token_accuracy": float(value)}


@dataclass(frozen=True)
class Measured:
    """A generation evaluation: its metrics, and the first answers kept to be read."""

    values: dict[str, float]
    answers: tuple[KeptAnswer, ...] = ()


def base_reusable(config: Any) -> bool:
    """Whether a run at step 0 is its base model exactly, so that the base's scores of one run are every
    such run's: a LoRA adapter initialised as PEFT does by default (B = 0) on a base of its own."""
    peft = config.peft_conf
    if getattr(peft, "peft_type", None) != "LORA":
        return False
    init = getattr(getattr(peft, "peft_kwargs", None), "init_lora_weights", True)
    resume = config.run_conf.resume_from_checkpoint
    starts_elsewhere = isinstance(resume, str) and resume.lower() not in ("auto", "true", "false")
    return init is True and not starts_elsewhere


class GenerationEvaluator:
    """A worker's generation metrics; the validation samples of each data set are read once. Custom metrics
    run in the worker's user-code process (`evaluate.sandbox`), kept warm between chunks (one per memory
    limit), where their modules are imported once; `take_failures` gives those that failed since."""

    def __init__(self) -> None:
        self.samples: dict[tuple[str, int], list[EvalSample]] = {}
        self.scorers: dict[str, Any] = {}
        self.sandboxes: dict[float, Any] = {}

    def take_failures(self) -> list[Any]:
        """The custom metrics that failed since the last call (`sandbox.UserCodeFailure`)."""
        return [failure for scorer in self.scorers.values() for failure in scorer.take_failures()]

    def close(self) -> None:
        for sandbox in self.sandboxes.values():
            sandbox.close()
        self.sandboxes.clear()

    def measure(self, session: Any, config: Any, tokenizer: Any, pad_id: int, data_key: str) -> Measured:
        from finetune.evaluate.generation import generate_answers
        from finetune.evaluate.metrics import Scorer

        settings = config.eval_conf.generation
        key = (data_key, settings.max_samples)
        if key not in self.samples:
            self.samples[key] = eval_samples(config, settings.max_samples)
        if not self.samples[key]:
            return Measured({})
        session.activate()
        answers = generate_answers(session.model, tokenizer, self.samples[key], settings, session.device, pad_id,
                                   synced=session.world > 1)
        values: dict[str, float] = {}
        if answers.too_long:
            logger.warning("run %s: %d of %d evaluation prompts leave no room for %d new tokens in the model's "
                           "context and were skipped", session.run_id, answers.too_long, len(self.samples[key]),
                           settings.max_new_tokens)
            values[TOO_LONG_METRIC] = float(answers.too_long)
        if answers.samples:
            prompts = [sample.prompt for sample in answers.samples]
            references = [sample.reference for sample in answers.samples]
            scorer_key = config.eval_conf.model_dump_json()
            if scorer_key not in self.scorers:
                self.scorers[scorer_key] = Scorer.of(config.eval_conf, self._sandbox(config.eval_conf.custom_memory_gb))
            values.update(self.scorers[scorer_key].score(prompts, answers.completions, references))
        return Measured(values, kept_answers(session.step, answers.samples, answers.completions))

    def _sandbox(self, memory_gb: float) -> Any:
        from finetune.evaluate.sandbox import UserCodeSandbox

        if memory_gb not in self.sandboxes:
            self.sandboxes[memory_gb] = UserCodeSandbox(int(memory_gb * 2**30))
        return self.sandboxes[memory_gb]
