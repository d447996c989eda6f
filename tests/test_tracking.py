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
    assert [m.value for m in client.get_metric_history(job.run_id, "train.loss")] == [0.5]
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
