"""Training progress reads right at 80 columns: whole fields per line, the run's ETA, the selecting metric."""

from __future__ import annotations

import pytest

from ftsgd.utils import console
from ftsgd.utils.console import TrainingProgress, epoch_lines

RECORD = {
    "epoch": 12,
    "train_loss": 1.23456,
    "train_accuracy": 0.56789,
    "splits": {
        "val": {"accuracy": 0.81234, "loss": 0.61234},
        "ood": {"accuracy": 0.51234, "loss": 1.2},
        "sketch": {"accuracy": 0.41234, "loss": 1.5},
        "worst": {"accuracy": 0.41234},
    },
    "images_per_s": 1234.5,
    "epoch_time_s": 123.4,
}


def test_epoch_lines_fit_80_columns_and_break_between_fields() -> None:
    lines = epoch_lines(RECORD, 100, True)
    assert all(len(line) <= 80 for line in lines) and len(lines) >= 2
    text = " ".join(" ".join(lines).split())
    for field in ("epoch 12/100", "val acc 0.8123", "ood acc 0.5123", "sketch acc 0.4123", "(best)"):
        assert field in text


def test_the_selecting_metric_is_printed_when_it_is_not_an_accuracy() -> None:
    assert "val acc 0.8123 loss 0.6123" in " ".join(epoch_lines(RECORD, 100, True, "val.loss"))
    assert "loss 0.6123" not in " ".join(epoch_lines(RECORD, 100, True))


def test_plain_lines_carry_a_timestamp_and_the_whole_run_s_eta(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = iter([100.0, 115.0])  # steps 5 -> 20 in 15 s: 1 step/s
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    progress = TrainingProgress("plain", epochs=3, steps_per_epoch=100, log_every=10)
    progress.step(0, 5, 1.0, 0.1, 5.0)  # starts the clock (no line: not a multiple of 10)
    progress.step(0, 20, 1.0, 0.1, 5.0)
    (line,) = capsys.readouterr().out.splitlines()
    assert line[:4].isdigit() and line[19:].startswith(" epoch 1/3 step 20/100")
    assert line.endswith("run ETA 4:40")  # 280 steps left of the run, not 80 of the epoch
