"""Console progress (util.progress.Progress): a tqdm bar on a terminal, time-based lines elsewhere, and the
engine's loops printing from their first step."""
from __future__ import annotations

import io
import random
import sys

import numpy as np
import paddle

import engine_finetune as engine
from models import create_model
from util.losses import build_loss
from util.lr_decay import build_optimizer
from util.progress import Progress, format_duration


class Clock:
    """A fake time function: returns ``now``, which the test moves."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _steps(stream) -> list[str]:
    return [line.split(" [")[1].split("]")[0] for line in stream.getvalue().splitlines()]


def test_plain_lines_at_step_one_then_by_time_and_at_the_end():
    clock, out = Clock(), io.StringIO()
    p = Progress(10, "Epoch 0", stream=out, clock=clock)
    times = [1, 5, 10, 31, 32, 40, 60, 61, 62, 63]  # 30 s after the last line: at step 4 (31 s), step 8 (61 s)
    for step, t in enumerate(times):
        clock.now = t
        p.update(step, images=4, loss=0.5, lr=1e-3)
        if step == 0:
            assert out.getvalue() == "Epoch 0 [1/10] loss=0.5 lr=0.001 images/s=4.0 elapsed=1s eta=9s\n"
        if step in (1, 2):
            assert _steps(out) == ["1/10"]  # nothing before the interval has elapsed
    assert _steps(out) == ["1/10", "4/10", "8/10", "10/10"]
    assert out.getvalue().splitlines()[-1] == "Epoch 0 [10/10] loss=0.5 lr=0.001 images/s=0.6 elapsed=1m03s eta=0s"


def test_interval_is_a_parameter_and_every_bounds_the_steps_between_lines():
    clock, out = Clock(), io.StringIO()
    p = Progress(9, "Val", stream=out, clock=clock, interval=5)
    for step in range(9):
        clock.now = 3.0 * step  # 5 s have passed at steps 3 (6 s), 5 (12 s), 7 (18 s)
        p.update(step)
    assert _steps(out) == ["1/9", "3/9", "5/9", "7/9", "9/9"]
    assert "images/s" not in out.getvalue()  # no images counted: no rate

    out = io.StringIO()
    p = Progress(50, "Val", 20, stream=out, clock=Clock())  # the clock stands still: only every 20 steps
    for step in range(50):
        p.update(step)
    assert _steps(out) == ["1/50", "20/50", "40/50", "50/50"]


def test_run_eta_counts_the_remaining_epochs():
    clock, out = Clock(), io.StringIO()
    p = Progress(4, "Epoch 1", stream=out, clock=clock, epoch=1, epochs=4)
    clock.now = 5.0
    p.update(0)
    # this epoch: 5 s a step, 3 steps left (15 s); then epochs 2 and 3 at 4 x 5 s each (40 s)
    assert out.getvalue() == "Epoch 1 [1/4] elapsed=5s eta=15s run_eta=55s\n"


def test_format_duration():
    assert [format_duration(s) for s in (0, 42, 185, 7380)] == ["0s", "42s", "3m05s", "2h03m"]


def test_a_terminal_gets_a_tqdm_bar_not_lines():
    term = Terminal()
    p = Progress(5, "Epoch 0", stream=term)
    for step in range(5):
        p.update(step, images=4, loss=0.25)
    p.close()
    text = term.getvalue()
    assert "Epoch 0:" in text and "it/s" in text and "|" in text and "\r" in text
    assert "[1/5]" not in text  # no plain line

    term = Terminal()
    with Progress(5, "Epoch 0", stream=term, leave=True, epoch=0, epochs=2) as p:
        for step in range(5):
            p.update(step, images=4, loss=0.25)
    final = term.getvalue().split("\r")[-1]  # the finished bar, left on the terminal
    assert final.startswith("Epoch 0: 100%") and "5/5" in final and final.endswith("\n")
    assert "loss=0.25" in final and "img/s=" in final and "run_eta=" in final


def test_disabled_prints_nothing():
    for stream in (io.StringIO(), Terminal()):
        shown = Progress(3, "Epoch 0", stream=stream)
        shown.update(0, images=2, loss=1.0)
        assert "Epoch 0" in stream.getvalue()  # enabled: a line or a bar from the first step
        shown.close()
        stream.seek(0)
        stream.truncate()
        p = Progress(3, "Epoch 0", 1, enabled=False, stream=stream)  # the other ranks
        for step in range(3):
            p.update(step, images=2, loss=1.0)
        p.close()
        assert stream.getvalue() == ""


# ---------------------------------------------------------------------------------------------------
# the engine's loops, on a tiny model

def _model(seed=0):
    paddle.seed(seed)
    return create_model("vit_test", num_classes=3, drop_path_rate=0.1, input_size=32)


def _loader(n=12, batch=4, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 3, size=n).astype(np.int64)
    return [(paddle.to_tensor(x[i:i + batch]), paddle.to_tensor(y[i:i + batch])) for i in range(0, n, batch)]


class _Fixed:
    def adjust(self, optimizer, e):
        optimizer.set_lr(1e-3)
        return 1e-3


def _train(**kw):
    model = _model()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    engine.train_one_epoch(model, build_loss("single_label", "ce"), _loader(), opt, 0, schedule=_Fixed(), **kw)
    return model


def test_evaluate_and_train_print_from_step_one_when_piped(capsys):
    engine.evaluate(_model(), _loader(), engine.get_task("single_label"), 3, header="Val")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Val [1/3] images/s=") and " elapsed=" in lines[0] and " eta=" in lines[0]
    assert lines[-1].startswith("Val [3/3] ")

    _train()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Epoch 0 [1/3] loss=") and " lr=0.001 images/s=" in lines[0]
    assert lines[-1].startswith("Epoch 0 [3/3] ")


def test_print_freq_bounds_the_steps_between_engine_lines(capsys):
    loader = _loader(n=20)  # 5 batches
    engine.evaluate(_model(), loader, engine.get_task("single_label"), 3, header="Test", print_freq=2,
                    print_interval=float("inf"))
    assert [line.split(" ")[1] for line in capsys.readouterr().out.splitlines()] == [
        "[1/5]", "[2/5]", "[4/5]", "[5/5]"]


def test_a_terminal_bar_leaves_training_numbers_and_random_state_unchanged(monkeypatch, capsys):
    def run(stdout):
        monkeypatch.setattr(sys, "stdout", stdout)
        random.seed(3)
        np.random.seed(3)
        model = _train(epochs=2)  # drop_path 0.1: the epoch draws from Paddle's generator
        after = (random.random(), np.random.rand(), float(paddle.rand([1])))
        return {k: v.numpy() for k, v in model.state_dict().items()}, after, stdout.getvalue()

    piped, piped_after, piped_text = run(io.StringIO())
    term, term_after, term_text = run(Terminal())
    assert "Epoch 0 [1/3]" in piped_text and "Epoch 0:" in term_text and "it/s" in term_text
    assert term_after == piped_after
    for k in piped:
        np.testing.assert_array_equal(term[k], piped[k], err_msg=k)
