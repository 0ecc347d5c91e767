"""resolve_train_config: a run's settings by precedence (defaults < the resumed run's train_config.json < the config
file < options), the schedule options, and the errors, without the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facesearch.model.train_config import (
    PAPER_STAGES,
    MissingDataError,
    TrainConfig,
    rescale_stage,
    resolve_train_config,
)


def _write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_later_sources_win(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write(run / "train_config.json", {"data": "from-run", "seed": 1, "width": 0.5, "log_every": 7, "stop_at": 3})
    config = _write(tmp_path / "c.json", {"seed": 2, "width": 0.25})
    opts = {"out": run, "resume": True, "seed": 3, "width": None, "arch": None}
    cfg = resolve_train_config(opts, config)
    assert (cfg.data, cfg.seed, cfg.width, cfg.log_every) == (Path("from-run"), 3, 0.25, 7)
    assert cfg.stop_at is None  # a stop point belongs to the invocation that set it
    assert cfg.arch == TrainConfig(data=Path("x")).arch  # unset everywhere: the default


def test_run_config_is_read_only_when_resuming(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write(run / "train_config.json", {"data": "from-run", "seed": 1})
    cfg = resolve_train_config({"out": run, "resume": None, "data": "given"})
    assert (cfg.data, cfg.seed) == (Path("given"), 0)
    with pytest.raises(MissingDataError):
        resolve_train_config({"out": run, "resume": False})
    with pytest.raises(ValueError):  # MissingDataError is a ValueError: a library caller needs no special case
        resolve_train_config({})


def test_identities_mean_a_flat_folder_unless_a_format_is_given(tmp_path: Path) -> None:
    assert resolve_train_config({"data": "d", "identities": "ids.txt"}).data_format == "flat"
    cfg = resolve_train_config({"data": "d", "identities": "ids.txt", "data_format": "celeba"})
    assert cfg.data_format == "celeba"


def test_stage_options_rescale_the_schedule() -> None:
    cfg = resolve_train_config({"data": "d", "stage1_iterations": 200, "finetune_lr": 0.5, "lr": None})
    assert cfg.stages == (rescale_stage(PAPER_STAGES[0], 200), rescale_stage(PAPER_STAGES[1], lr=0.5))
    assert cfg.stages[0].milestones == (114, 166)  # 40k and 58k of 70k, scaled along


def test_a_stage_the_schedule_lacks(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.json", {"stages": [{"iterations": 5, "lr": 0.1}]})
    assert resolve_train_config({"data": "d", "stage1_iterations": 3}, config).total_steps == 3
    with pytest.raises(ValueError, match=r"the schedule has 1 stage\(s\); cannot set stage 2"):
        resolve_train_config({"data": "d", "stage2_iterations": 3}, config)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"config .*c\.json is not valid JSON: .* at line 1"),
        ("[1, 2]", r"config .*c\.json must hold a JSON object of TrainConfig fields"),
        ('{"colour": 1}', r"unknown TrainConfig key\(s\) \['colour'\]; valid keys: \['data'"),
    ],
)
def test_bad_config_files(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "c.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        resolve_train_config({"data": "d"}, tmp_path / "c.json")
    with pytest.raises(ValueError, match=r"cannot read config .*missing\.json"):
        resolve_train_config({"data": "d"}, tmp_path / "missing.json")
