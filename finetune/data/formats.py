"""The data formats people already have, converted to the records the pipeline reads.

Each method reads one internal record shape:

    sft:  {"messages": [...]}                                  (+ "completion_start", see below)
    dpo:  {"prompt_messages": [...], "chosen_messages": [...], "rejected_messages": [...]}
    grpo: {"prompt_messages": [...], ...other fields passed to the reward functions}

and accepts several file formats, each converted here, record by record. A file's format is named
by its dataset (`format: alpaca`) or detected from its first record (`format: auto`, the default);
every record of the file is then read in that format. A record that matches no format of the
method is one error listing the accepted shapes with an example of each (docs/data.md).

Pure Python: the config models import the format names, so nothing heavy is imported here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
AUTO = "auto"


class FormatProblem(ValueError):
    """A record that does not fit its format; the message names the field (the reader adds file and line)."""


# ---------------------------------------------------------------- checks of the internal shape


def _without_nones(message: Any) -> Any:
    """A message with the keys whose value is None dropped: parquet and saved datasets give every row
    of a column of structs the union of the keys, filled with None."""
    return {key: value for key, value in message.items() if value is not None} if isinstance(message, dict) else message


def check_messages(value: Any, key: str, *, need_assistant: bool, last_role: str | None = None) -> str | None:
    if not isinstance(value, list) or not value:
        return f"'{key}' must be a non-empty list of messages"
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            return f"{key}[{index}] must be an object with 'role' and 'content'"
        unknown = set(message) - {"role", "content"}
        if unknown:
            return f"{key}[{index}] has unknown key(s) {sorted(unknown)}; messages take 'role' and 'content'"
        role = message.get("role")
        if role not in ROLES:
            return f"{key}[{index}].role is {role!r}; allowed: {', '.join(ROLES)}"
        content = message.get("content")
        if not isinstance(content, str):
            return f"{key}[{index}].content must be a string, got {type(content).__name__}"
        if not content.strip():
            return f"{key}[{index}].content is empty"
    if need_assistant and not any(message["role"] == "assistant" for message in value):
        return f"'{key}' has no assistant message to learn from"
    if last_role is not None and value[-1]["role"] != last_role:
        return f"the last message of '{key}' must be from the {last_role}, not the {value[-1]['role']}"
    return None


def _require(record: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if key not in record:
            raise FormatProblem(f"missing key '{key}'")


def _messages(record: dict[str, Any], key: str, *, need_assistant: bool, last_role: str | None = None) -> list[dict[str, str]]:
    _require(record, key)
    value = record[key]
    messages = [_without_nones(message) for message in value] if isinstance(value, list) else value
    problem = check_messages(messages, key, need_assistant=need_assistant, last_role=last_role)
    if problem:
        raise FormatProblem(problem)
    return messages


def _text(record: dict[str, Any], key: str) -> str:
    _require(record, key)
    value = record[key]
    if not isinstance(value, str):
        raise FormatProblem(f"'{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise FormatProblem(f"'{key}' is empty")
    return value


def _turns(record: dict[str, Any], key: str, role: str, *, need_assistant: bool, last_role: str | None = None) -> list[dict[str, str]]:
    """TRL's fields hold plain text (one message from `role`) or a conversation (a list of messages)."""
    _require(record, key)
    if isinstance(record[key], str):
        return [{"role": role, "content": _text(record, key)}]
    if not isinstance(record[key], list):
        raise FormatProblem(f"'{key}' must be a string or a list of messages, got {type(record[key]).__name__}")
    return _messages(record, key, need_assistant=need_assistant, last_role=last_role)


# ---------------------------------------------------------------- converters


def _from_messages(record: dict[str, Any]) -> dict[str, Any]:
    return {"messages": _messages(record, "messages", need_assistant=True)}


def _from_sharegpt(record: dict[str, Any]) -> dict[str, Any]:
    _require(record, "conversations")
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise FormatProblem("'conversations' must be a non-empty list of turns ({\"from\": ..., \"value\": ...})")
    messages = []
    for index, turn in enumerate(map(_without_nones, turns)):
        where = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise FormatProblem(f"{where} must be an object with 'from' and 'value'")
        unknown = set(turn) - {"from", "value"}
        if unknown:
            raise FormatProblem(f"{where} has unknown key(s) {sorted(unknown)}; ShareGPT turns take 'from' and 'value'")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise FormatProblem(f"{where}.from is {speaker!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
        try:
            content = _text(turn, "value")
        except FormatProblem as problem:
            raise FormatProblem(f"{where}: {problem}") from None
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": content})
    problem = check_messages(messages, "conversations", need_assistant=True)
    if problem:
        raise FormatProblem(problem.replace("assistant message", "'gpt' turn"))
    return {"messages": messages}


def _from_alpaca(record: dict[str, Any]) -> dict[str, Any]:
    instruction, output = _text(record, "instruction"), _text(record, "output")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise FormatProblem(f"'input' must be a string, got {type(extra).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    system = [{"role": "system", "content": _text(record, "system")}] if record.get("system") else []
    return {"messages": [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]}


def _from_prompt_completion(record: dict[str, Any]) -> dict[str, Any]:
    prompt = _turns(record, "prompt", "user", need_assistant=False)
    completion = _turns(record, "completion", "assistant", need_assistant=True)
    for index, message in enumerate(completion):
        if message["role"] != "assistant":
            raise FormatProblem(f"completion[{index}].role is {message['role']!r}; a completion holds the assistant's messages")
    converted: dict[str, Any] = {"messages": prompt + completion}
    if any(message["role"] == "assistant" for message in prompt):
        converted["completion_start"] = len(prompt)  # earlier assistant turns are context, not targets
    return converted


def _from_preference(record: dict[str, Any]) -> dict[str, Any]:
    if "prompt" not in record:
        return _implicit_prompt(record)
    prompt = _turns(record, "prompt", "user", need_assistant=False, last_role="user")
    chosen = _turns(record, "chosen", "assistant", need_assistant=True)
    rejected = _turns(record, "rejected", "assistant", need_assistant=True)
    return {"prompt_messages": prompt, "chosen_messages": chosen, "rejected_messages": rejected}


def _implicit_prompt(record: dict[str, Any]) -> dict[str, Any]:
    """TRL's preference data without `prompt`: two conversations that share their first messages (up to
    the last user message they share), which are the prompt."""
    chosen, rejected = (_messages(record, key, need_assistant=True) for key in ("chosen", "rejected"))
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] != "user":
        shared -= 1
    if not shared:
        raise FormatProblem("without 'prompt', 'chosen' and 'rejected' must be conversations that start with the same "
                            "messages, up to a user message (TRL's implicit prompt); or give 'prompt'")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        problem = check_messages(messages[shared:], f"{key} after the shared prompt", need_assistant=True)
        if problem:
            raise FormatProblem(problem)
    return {"prompt_messages": chosen[:shared], "chosen_messages": chosen[shared:], "rejected_messages": rejected[shared:]}


def _from_preference_messages(record: dict[str, Any]) -> dict[str, Any]:
    _require(record, "prompt_messages", "chosen_messages", "rejected_messages")
    return {
        "prompt_messages": _messages(record, "prompt_messages", need_assistant=False, last_role="user"),
        "chosen_messages": _messages(record, "chosen_messages", need_assistant=True),
        "rejected_messages": _messages(record, "rejected_messages", need_assistant=True),
    }


def _reward_fields(record: dict[str, Any], prompt_key: str) -> dict[str, Any]:
    reserved = {"prompt", "completion", "prompt_messages"} - {prompt_key}
    clash = sorted(reserved & set(record))
    if clash:
        raise FormatProblem(f"{', '.join(repr(key) for key in clash)}: reserved for the trainer (it writes the prompt and "
                            "generates the completions); rename these fields")
    return {key: value for key, value in record.items() if key != prompt_key}


def _from_prompt_only(record: dict[str, Any]) -> dict[str, Any]:
    prompt = _turns(record, "prompt", "user", need_assistant=False, last_role="user")
    return {"prompt_messages": prompt, **_reward_fields(record, "prompt")}


def _from_prompt_messages(record: dict[str, Any]) -> dict[str, Any]:
    prompt = _messages(record, "prompt_messages", need_assistant=False, last_role="user")
    return {"prompt_messages": prompt, **_reward_fields(record, "prompt_messages")}


# ---------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class DataFormat:
    name: str
    method: str
    keys: tuple[str, ...]  # the keys every record has; auto-detection looks for them
    example: str  # one JSON line
    convert: Callable[[dict[str, Any]], dict[str, Any]]


_HI = '[{"role": "user", "content": "Hi"}]'
# In auto-detection order within a method: the first whose keys a record has is its format.
FORMATS: tuple[DataFormat, ...] = (
    DataFormat("messages", "sft", ("messages",),
               '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}', _from_messages),
    DataFormat("sharegpt", "sft", ("conversations",),
               '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}', _from_sharegpt),
    DataFormat("alpaca", "sft", ("instruction", "output"),
               '{"instruction": "Translate to French", "input": "cat", "output": "chat"}', _from_alpaca),
    DataFormat("prompt_completion", "sft", ("prompt", "completion"),
               '{"prompt": "2+2=", "completion": "4"}', _from_prompt_completion),
    DataFormat("preference_messages", "dpo", ("prompt_messages", "chosen_messages", "rejected_messages"),
               f'{{"prompt_messages": {_HI}, "chosen_messages": [{{"role": "assistant", "content": "Hello!"}}], '
               '"rejected_messages": [{"role": "assistant", "content": "Go away."}]}', _from_preference_messages),
    DataFormat("preference", "dpo", ("chosen", "rejected"),  # `prompt` too, unless implicit
               '{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}', _from_preference),
    DataFormat("prompt_messages", "grpo", ("prompt_messages",),
               f'{{"prompt_messages": {_HI}, "answer": "Hello"}}', _from_prompt_messages),
    DataFormat("prompt_only", "grpo", ("prompt",), '{"prompt": "2+2=", "answer": "4"}', _from_prompt_only),
)
BY_NAME = {data_format.name: data_format for data_format in FORMATS}
FORMAT_NAMES = (AUTO, *BY_NAME)


def formats_of(method: str) -> list[DataFormat]:
    return [data_format for data_format in FORMATS if data_format.method == method]


def format_problem(name: str, method: str) -> str | None:
    """Why a dataset's `format` cannot be read by `method`, or None."""
    if name == AUTO or BY_NAME[name].method == method:
        return None
    allowed = ", ".join([AUTO, *(data_format.name for data_format in formats_of(method))])
    return f"format {name} is {BY_NAME[name].method.upper()} data; method {method} reads: {allowed}"


def accepted_shapes(method: str) -> str:
    lines = [f"  {data_format.name}: {data_format.example}" for data_format in formats_of(method)]
    return "\n".join([f"{method.upper()} data takes one of these shapes (one record per line; see docs/data.md):", *lines])


def detect(record: dict[str, Any], method: str) -> DataFormat:
    for data_format in formats_of(method):
        if all(key in record for key in data_format.keys):
            return data_format
    keys = sorted(record)
    shown = ", ".join(repr(key) for key in keys[:8]) + (", ..." if len(keys) > 8 else "")
    other = next((f for f in FORMATS if f.method != method and all(key in record for key in f.keys)), None)
    hint = f" (it looks like {other.method.upper()} data, format {other.name})" if other else ""
    raise FormatProblem(f"a record with the keys {shown or 'none'} matches no {method.upper()} data format{hint}.\n"
                        f"{accepted_shapes(method)}\nA dataset may name its format: datasets: [{{path: ..., format: alpaca}}]")


def converter(name: str, method: str, first: dict[str, Any]) -> DataFormat:
    """The format of a file: the one its dataset names, or the one detected from its first record."""
    problem = format_problem(name, method)
    if problem:
        raise FormatProblem(problem)
    return detect(first, method) if name == AUTO else BY_NAME[name]


def example_records(method: str) -> dict[str, dict[str, Any]]:
    """Each format's example as a record (the tests and the docs show these)."""
    return {data_format.name: json.loads(data_format.example) for data_format in formats_of(method)}
