"""slm_cli.ui: progress lines off a terminal, what the log file gets, and no wrapping at 80 columns.

No test here depends on timing: SLM_LOG_EVERY=0 prints every update, and an interval of 1e9 s
can never elapse during a test, so only the first and the last line are due.
"""

import logging

import pytest

from slm_cli import ui
from slm_cli.errors import SlmError


@pytest.fixture
def slm_log(caplog, monkeypatch):
    """The INFO records of logger `slm`, as Hydra's job_logging writes them to <stage>.log."""
    caplog.set_level(logging.INFO, logger="slm")
    monkeypatch.setattr(ui.log, "propagate", True)  # a stage run earlier in this process sent it to its file only
    return lambda: [r.getMessage() for r in caplog.records if r.name == "slm"]


def test_off_a_terminal_every_update_is_a_line_with_eta_when_every_s_is_0(capsys, slm_log, monkeypatch):
    monkeypatch.setenv(ui.LOG_EVERY_ENV, "0")
    with ui.progress("pruning with osscar", total=4, unit="layers") as bar:
        for i in range(4):
            bar.update(completed=i + 1, err=f"0.{i}")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("pruning with osscar: 1/4 layers (25%) | err 0.0 | elapsed 0:00:")
    assert [line.split(" | ")[0] for line in out] == [f"pruning with osscar: {i}/4 layers ({25 * i}%)" for i in range(1, 5)]
    assert all(" | eta " in line for line in out)
    assert out[-1].endswith("eta 0:00:00")  # nothing left
    assert slm_log() == out  # the log file gets the same lines


def test_lines_come_at_most_every_n_seconds_and_the_last_one_always(capsys, slm_log, monkeypatch):
    monkeypatch.setenv(ui.LOG_EVERY_ENV, "1e9")
    with ui.training_progress() as progress:
        task = progress.add_task("teacher", total=100, completed=40)  # a resumed run
        for _ in range(60):
            progress.update(task, advance=1, loss="2.5000", lr="1.00e-03", **{"tok/s": "1,234"})
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[:4] for line in out] == [
        ["teacher: 41/100 steps (41%)", "loss 2.5000", "lr 1.00e-03", "tok/s 1,234"],
        ["teacher: 100/100 steps (100%)", "loss 2.5000", "lr 1.00e-03", "tok/s 1,234"],
    ]
    assert slm_log() == out


def test_disabled_progress_prints_nothing(capsys, slm_log, monkeypatch):
    monkeypatch.setenv(ui.LOG_EVERY_ENV, "0")
    with ui.progress("other rank", total=2, enabled=False) as bar:
        bar.advance(2)
    assert capsys.readouterr().out == "" and slm_log() == []


def test_library_callbacks_set_the_total(capsys, monkeypatch):
    monkeypatch.setenv(ui.LOG_EVERY_ENV, "0")
    with ui.progress("perplexity", unit="windows") as bar:  # the total is known only once the work starts
        bar.callback(3, 8)
    assert capsys.readouterr().out.startswith("perplexity: 3/8 windows (38%) | elapsed ")


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_interval_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(ui.LOG_EVERY_ENV, value)
    with pytest.raises(SlmError, match=f"SLM_LOG_EVERY='{value}'.*number >= 0"):
        ui.log_every_s()


def test_default_interval(monkeypatch):
    monkeypatch.delenv(ui.LOG_EVERY_ENV, raising=False)
    assert ui.log_every_s() == ui.DEFAULT_LOG_EVERY_S == 30


def test_printed_tables_reach_the_log_as_plain_unwrapped_text(capsys, slm_log):
    long_value = "x" * 150
    ui.console.print(ui.kv_table("teacher: setup", [("model", "LlamaForCausalLM"), ("path", long_value)]))
    ui.console.print("[bold yellow]warning:[/bold yellow] markup is rendered, not logged raw")
    (table, warning) = slm_log()
    assert "\x1b[" not in table  # no colour codes in the file
    assert any(long_value in line for line in table.splitlines())  # one line, not cut at 80 columns
    assert "LlamaForCausalLM" in table and warning == "warning: markup is rendered, not logged raw"
    assert long_value in capsys.readouterr().out  # off a terminal, stdout is not cut at 80 columns either


def test_on_a_terminal_the_bar_shows_and_only_the_log_gets_the_lines(slm_log, monkeypatch):
    import io

    screen = io.StringIO()
    monkeypatch.setattr(ui, "console", ui.LoggedConsole(file=screen, force_terminal=True, width=120))
    monkeypatch.setenv(ui.LOG_EVERY_ENV, "0")
    with ui.progress("pruning with osscar", total=2, unit="layers") as bar:
        bar.advance(1)
        bar.advance(1)
    shown = screen.getvalue()
    assert "\x1b[" in shown and "2/2" in shown  # rich's bar, drawn with terminal codes
    assert "| eta" not in shown  # no plain lines on the terminal
    assert [line.split(" | ")[0] for line in slm_log()] == ["pruning with osscar: 1/2 layers (50%)",
                                                            "pruning with osscar: 2/2 layers (100%)"]


def test_an_error_outside_a_hydra_log_prints_once(capsys, monkeypatch):
    from slm_cli import runner

    # no log file and nothing above it, as in a process whose logging Hydra did not configure: logging's
    # last-resort handler must not repeat the message on stderr
    monkeypatch.setattr(ui.log, "handlers", [])
    monkeypatch.setattr(ui.log, "propagate", False)
    with pytest.raises(SystemExit) as exc:
        runner.fail("train.lr=-1: must be > 0")
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("train.lr=-1: must be > 0") == 1
