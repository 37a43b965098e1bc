"""The README's `tensorboard --logdir WORKDIR/tensorboard` works: the trainer's own writer
(metrics_log.MetricsLog) writes events that the real `tensorboard` executable, installed by the
README's install command (pyproject.toml), serves back over its HTTP API with the values written.

Local only: tensorboard binds 127.0.0.1 on a free port; nothing is downloaded.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from gqa_uptrain import metrics_log

TENSORBOARD = os.path.join(os.path.dirname(sys.executable), "tensorboard")
WRITTEN = {0: 5.5, 10: 4.25, 20: 3.125}  # step -> train/loss


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, **query: str):
    url = f"http://127.0.0.1:{port}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def test_tensorboard_serves_the_trainers_scalars(tmp_path):
    assert os.path.exists(TENSORBOARD), "the install command must install tensorboard"
    log = metrics_log.MetricsLog(str(tmp_path), 0, resumed=False)
    for step, loss in WRITTEN.items():
        log.write(step, {"train/loss": loss, "train/lr": 1e-3 * (step + 1)})
    log.close()
    logdir = tmp_path / metrics_log.TB_DIR
    assert logdir.is_dir()

    port, output = _free_port(), open(tmp_path / "tensorboard.log", "w+")
    proc = subprocess.Popen(
        [TENSORBOARD, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port),
         "--load_fast=false", "--reload_interval", "1"],
        stdout=output, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, tags, last_error = time.monotonic() + 60, {}, None
        while time.monotonic() < deadline:  # up, and has loaded the events
            if proc.poll() is not None:
                output.seek(0)
                pytest.fail(f"tensorboard exited {proc.returncode}: {output.read()[-3000:]}")
            try:
                tags = _get(port, "/data/plugin/scalars/tags")
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                last_error = e
            if any("train/loss" in run_tags for run_tags in tags.values()):
                break
            time.sleep(0.25)
        else:
            pytest.fail(f"tensorboard listed no train/loss within 60 s: tags {tags}, "
                        f"last error {last_error}")
        (run,) = [run for run, run_tags in tags.items() if "train/loss" in run_tags]
        assert {"train/loss", "train/lr"} <= set(tags[run])
        points = _get(port, "/data/plugin/scalars/scalars", run=run, tag="train/loss")
        # [wall_time, step, value] per point; events hold float32.
        assert {step: value for _, step, value in points} == pytest.approx(WRITTEN, rel=1e-6)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        output.close()
