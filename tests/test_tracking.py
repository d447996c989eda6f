import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from virtualcell import tracking


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = tracking.resolve_tracking_uri(None, workdir=tmp_path)
    assert default == f"sqlite:///{tmp_path}/results/mlflow.db?timeout={tracking.SQLITE_TIMEOUT_S}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri(None) == "http://127.0.0.1:5999"
    assert tracking.resolve_tracking_uri("http://127.0.0.1:6000") == "http://127.0.0.1:6000"


def test_job_run_logs_params_files_lineage_and_parent(tracking_store, tmp_path):
    parent = tracking.start_workflow_run(uri=tracking_store, experiment="test",
                                         parent_run_file=tmp_path / "parent_run_id", config={"a": 1})
    upstream_out = tmp_path / "up.txt"
    with tracking.job_run(rule="up", wildcards={"dataset": "d"}, params={}, inputs=[], outputs=[upstream_out]) as up:
        upstream_out.write_text("hello")
    down_out = tmp_path / "down.txt"
    with tracking.job_run(rule="down", wildcards={"dataset": "d"}, params={"epochs": 3, "opt": {"lr": 0.1}},
                          inputs=[upstream_out], outputs=[down_out], jobid="7") as job:
        job.log_metrics({"loss": 1.5}, step=0)
        job.epoch_logger("train")(1, {"loss": 0.5})
        down_out.write_text("world")
    client = MlflowClient(tracking_store)
    run = client.get_run(job.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"epochs": "3", "opt.lr": "0.1"}
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags[tracking.TAG_RULE] == "down"
    assert run.data.tags[tracking.TAG_JOBID] == "7"
    assert run.data.tags[tracking.TAG_UPSTREAM] == up.run_id
    assert [m.value for m in client.get_metric_history(job.run_id, "train/loss")] == [0.5]
    outputs = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=job.run_id,
                                                                  artifact_path="files/outputs.json")).read_text())
    assert outputs[str(down_out)]["size"] == 5
    assert outputs[str(down_out)]["sha256"] == tracking.sha256(down_out)
    assert tracking.read_lineage(down_out) == job.run_id


def test_a_failing_job_ends_failed_with_the_error(tracking_store, tmp_path):
    with pytest.raises(ValueError, match="boom"):
        with tracking.job_run(rule="bad", wildcards={}, params={}, inputs=[], outputs=[tmp_path / "x"]) as job:
            raise ValueError("boom")
    run = MlflowClient(tracking_store).get_run(job.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.TAG_ERROR] == "ValueError: boom"
    assert not tracking.lineage_file(tmp_path / "x").exists()


def test_epoch_metrics_are_written_in_batches_and_survive_a_failure(tracking_store, tmp_path, monkeypatch):
    """Per-epoch metrics are buffered and written a batch at a time (one SQLite write per epoch made
    tracking a sixth of the default run): every epoch arrives with its step, flushed while the job
    runs once EPOCH_FLUSH_S has passed, and a job that fails keeps its curve up to the failure."""
    out = tmp_path / "out.txt"
    monkeypatch.setattr(tracking, "EPOCH_FLUSH_S", 3600.0)
    client = MlflowClient(tracking_store)
    with tracking.job_run(rule="fit", wildcards={}, params={}, inputs=[], outputs=[out]) as job:
        hook = job.epoch_logger("fit")
        for epoch in range(1200):  # more than one MLflow batch (1,000)
            hook(epoch, {"loss": 1.0 / (epoch + 1)})
        assert client.get_metric_history(job.run_id, "fit/loss") == []  # still buffered
        out.write_text("done")
    history = client.get_metric_history(job.run_id, "fit/loss")
    assert [m.step for m in history] == list(range(1200))
    assert history[9].value == pytest.approx(0.1)
    with pytest.raises(ValueError, match="diverged"):
        with tracking.job_run(rule="fit", wildcards={}, params={}, inputs=[], outputs=[tmp_path / "x"]) as job:
            hook = job.epoch_logger("fit")
            hook(0, {"loss": 2.0})
            hook(1, {"loss": 1.0})
            raise ValueError("diverged")
    assert [m.step for m in client.get_metric_history(job.run_id, "fit/loss")] == [0, 1]
    monkeypatch.setattr(tracking, "EPOCH_FLUSH_S", 0.0)  # the interval passed: written while the job runs
    with tracking.job_run(rule="fit", wildcards={}, params={}, inputs=[], outputs=[out]) as job:
        job.epoch_logger("fit")(0, {"loss": 2.0})
        assert [m.value for m in client.get_metric_history(job.run_id, "fit/loss")] == [2.0]


def test_a_job_that_forgets_an_output_fails(tracking_store, tmp_path):
    with pytest.raises(RuntimeError, match="without writing"):
        with tracking.job_run(rule="lazy", wildcards={}, params={}, inputs=[], outputs=[tmp_path / "never"]):
            pass


def test_unreachable_server_is_named_quickly():
    import time

    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"http://127\.0\.0\.1:9 is not reachable"):
        tracking.check_reachable("http://127.0.0.1:9", timeout_s=5)
    assert time.monotonic() - start < 10


def test_a_silent_server_is_named_within_the_timeout():
    import socket
    import time

    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(tracking.UnreachableServerError, match=rf"mlflow\.tracking_uri: {uri} is not reachable"):
            tracking.check_reachable(uri, timeout_s=1)
        assert time.monotonic() - start < 3


def test_a_server_that_answers_is_reachable_even_when_it_refuses_us():
    """An auth proxy answers 401 to the health check: the server is there, the jobs bring credentials."""
    import http.server
    import threading

    class Deny(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracking.check_reachable(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()


def test_each_invocation_gets_its_own_parent_run_file(tmp_path):
    first, second = tracking.new_parent_run_file(tmp_path), tracking.new_parent_run_file(tmp_path)
    assert first != second and first.parent == second.parent == (tmp_path / tracking.PARENT_RUN_DIR).resolve()


def test_a_job_never_attaches_to_a_parent_run_of_another_experiment(tracking_store, tmp_path, capsys):
    other = tmp_path / "other_parent"
    tracking.start_workflow_run(uri=tracking_store, experiment="other", parent_run_file=other, config={})
    with tracking.job_run(rule="r", wildcards={}, params={}, inputs=[], outputs=[], experiment="test",
                          parent_run_file=other) as job:
        pass
    run = MlflowClient(tracking_store).get_run(job.run_id)
    assert "mlflow.parentRunId" not in run.data.tags
    assert "is not a parent run of this job's experiment" in capsys.readouterr().err


DIES = """
import os, signal, sys
from virtualcell import tracking
uri, parent_file, out = sys.argv[1:4]
tracking.start_workflow_run(uri=uri, experiment="test", parent_run_file=parent_file, config={})
with tracking.job_run(rule="train", wildcards={}, params={}, inputs=[], outputs=[out], uri=uri,
                      experiment="test", parent_run_file=parent_file):
    os.kill(os.getpid(), signal.SIGKILL)
"""

LIVES = """
import sys, time
from virtualcell import tracking
uri, parent_file = sys.argv[1:3]
tracking.start_workflow_run(uri=uri, experiment="test", parent_run_file=parent_file, config={})
print("started", flush=True)
time.sleep(120)
"""


def test_runs_of_a_killed_invocation_are_closed_by_the_next_and_a_live_ones_are_not(tracking_store, tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "results" / tracking.PARENT_RUN_DIR
    dead_file, live_file = folder / f"dead{tracking.PARENT_RUN_SUFFIX}", folder / f"live{tracking.PARENT_RUN_SUFFIX}"
    live = subprocess.Popen([sys.executable, "-c", LIVES, tracking_store, str(live_file)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert live.stdout.readline().strip() == "started"
        killed = subprocess.run([sys.executable, "-c", DIES, tracking_store, str(dead_file), str(tmp_path / "x")],
                                capture_output=True, text=True, timeout=120)
        assert killed.returncode == -9, killed.stderr[-2000:]
        client = MlflowClient(tracking_store)
        dead_parent = dead_file.read_text().split()[0]
        live_parent = live_file.read_text().split()[0]
        (dead_job,) = client.search_runs([client.get_run(dead_parent).info.experiment_id],
                                         filter_string=f"tags.mlflow.parentRunId = '{dead_parent}'")
        assert dead_job.info.status == "RUNNING"

        tracking.start_workflow_run(uri=tracking_store, experiment="test", parent_run_file=folder / "next",
                                    config={})

        for run_id in (dead_parent, dead_job.info.run_id):
            run = client.get_run(run_id)
            assert run.info.status == "KILLED" and run.data.tags[tracking.TAG_ERROR] == tracking.ABANDONED
        assert not dead_file.exists()
        assert client.get_run(live_parent).info.status == "RUNNING" and live_file.exists()
    finally:
        live.kill()
        live.wait()
