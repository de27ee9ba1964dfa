"""train.report_to: config errors name the choices and the fix; TensorBoard files read back with its own reader."""

import importlib.util

import pytest

from slm_cli.config.schema import TrainConfig
from slm_cli.engine.trackers import Trackers, tracker_names


@pytest.mark.parametrize("value, names", [([], []), ("none", []), (["none"], []), ("tensorboard", ["tensorboard"]),
                                          (["tensorboard"], ["tensorboard"])])
def test_report_to_accepts_a_list_a_name_or_none(value, names):
    assert tracker_names(value) == names
    assert TrainConfig(report_to=value).problems("train") == []


def test_an_unknown_tracker_names_the_choices():
    (problem,) = TrainConfig(report_to=["tensorbord"]).problems("train")
    assert problem == ("train.report_to: unknown tracker 'tensorbord'; choose from tensorboard, wandb "
                       "(e.g. train.report_to=[tensorboard]), or none")
    assert "'none' cannot be combined" in TrainConfig(report_to=["none", "tensorboard"]).problems("train")[0]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_the_package_says_how_to_install_it():
    (problem,) = TrainConfig(report_to=["wandb"]).problems("train")
    assert problem.startswith("train.report_to=[wandb] needs the wandb package, which is not installed: pip install wandb")


def test_a_bad_tracker_stops_the_stage_before_any_work(slm, capsys):
    assert slm("teacher", "train.report_to=[mlflow]") == 2
    err = capsys.readouterr().err
    assert "unknown tracker 'mlflow'; choose from tensorboard, wandb" in err


def test_tensorboard_scalars_read_back_and_non_finite_values_are_left_out(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = Trackers(["tensorboard"], tmp_path, run_name="teacher")
    trackers.log_step({"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": float("nan"), "tokens_per_s": 900.0,
                       "kd_loss": 0.4, "val_loss": 2.75, "tokens": 100}, 1)
    trackers.log_step({"step": 2, "loss": 2.0, "lr": 5e-4, "grad_norm": 1.5, "tokens_per_s": 1000.0}, 2)
    trackers.close()
    assert trackers.paths == [] and (tmp_path / "tensorboard").is_dir()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert got == {
        "train/loss": [(1, 2.5), (2, 2.0)],
        "train/learning_rate": [(1, pytest.approx(1e-3)), (2, pytest.approx(5e-4))],
        "train/grad_norm": [(2, 1.5)],  # the NaN of a skipped step is not plotted
        "train/tokens_per_s": [(1, 900.0), (2, 1000.0)],
        "train/kd_loss": [(1, pytest.approx(0.4))],
        "eval/loss": [(1, 2.75)],
    }


def test_wandb_logs_offline_into_the_run_folder(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # slm's default: offline, nothing leaves the machine
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    trackers = Trackers(["wandb"], tmp_path, run_name="teacher")
    trackers.log_step({"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 900.0}, 1)
    trackers.log({"eval/loss": 2.0, "eval/ce": 2.0}, 1)
    trackers.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")  # `wandb sync <run>` uploads it later
    assert list(run.glob("run-*.wandb"))
    said = capsys.readouterr().err  # wandb's own messages: the mode, and a run summary naming the logged series
    assert "W&B syncing is set to `offline`" in said and "train/learning_rate" in said and "eval/ce" in said
