"""A workdir saved under another learning-rate schedule version refuses to resume (one line saying
why), rather than continuing with rates its first steps were not trained at."""

from __future__ import annotations

import json
import os

import pytest

import _helpers_train as h
from gqa_uptrain import optim, run_config


def test_a_workdir_from_before_the_schedule_version_is_refused(tmp_path):
    config = h.config(num_steps=4)
    saved = run_config.config_dict(config)
    assert saved[run_config.SCHEDULE_VERSION_KEY] == optim.SCHEDULE_VERSION == 2
    run = {"num_steps": 4, "source_step": None}
    workdir = str(tmp_path)
    path = os.path.join(workdir, run_config.CONFIG_FILE)
    with open(path, "w") as f:
        json.dump(saved, f)
    assert run_config.check_resume_config(config, workdir, run, 2) == run  # same version: fine
    for old, words in ((None, "none recorded, i.e. version 1, whose warmup started at lr 0"),
                       (1, "version 1;")):
        before = {k: v for k, v in saved.items() if k != run_config.SCHEDULE_VERSION_KEY}
        if old is not None:
            before[run_config.SCHEDULE_VERSION_KEY] = old
        with open(path, "w") as f:
            json.dump(before, f)
        with pytest.raises(run_config.TrainError) as e:
            run_config.check_resume_config(config, workdir, run, 2)
        message = str(e.value)
        assert words in message and "use a new --workdir" in message and "\n" not in message
    assert not os.path.exists(os.path.join(workdir, run_config.CHANGES_FILE))
