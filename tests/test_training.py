"""Training with Lightning: seeding, checkpoints (safetensors), reuse, divergence and corrupt files."""

import json

import pytest
import torch

from toylab.errors import DivergenceError, ToylabError
from toylab.registry import get_task
from toylab.training import SequenceModel, TrainConfig, build_model, load_trained, sequence_loss, train, trim_unscored

TINY_MODEL = {"d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 1}
TINY_TRAIN = TrainConfig(steps=12, batch_size=16, n_train=64, n_val=32, eval_every=6, warmup_steps=2)


@pytest.fixture(scope="module")
def task():
    return get_task("brackets", max_length=10, min_length=2)


@pytest.fixture(scope="module")
def trained(task, tmp_path_factory):
    return train(task, {**TINY_MODEL, "ffn": "moe"}, TINY_TRAIN, tmp_path_factory.mktemp("run") / "moe", progress=False)


def test_run_directory_contents(trained):
    files = {p.name for p in trained.run_dir.iterdir()}
    assert {"config.json", "metrics.csv", "model.safetensors", "final.json"} <= files and ".lock" not in files  # finished: no lock file left
    assert set(trained.metrics) >= {"loss", "closing_accuracy", "sequence_accuracy"}
    header = (trained.run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "train_loss" in header and "val_closing_accuracy" in header


def test_a_run_shorter_than_the_log_interval_still_logs(task, tmp_path):
    short = TrainConfig(**{**TINY_TRAIN.__dict__, "steps": 3, "eval_every": 60, "n_train": 256})
    run = train(task, {**TINY_MODEL, "ffn": "dense"}, short, tmp_path / "short", progress=False)
    assert "train_loss" in (run.run_dir / "metrics.csv").read_text().splitlines()[0]


def test_checkpoint_round_trip(trained, task):
    loaded = load_trained(trained.run_dir)
    tokens = torch.from_numpy(task.sample(4, seed=0).inputs)
    torch.testing.assert_close(loaded.model(tokens), trained.model(tokens))
    assert loaded.metrics == trained.metrics


def test_same_seed_same_weights_and_reuse(trained, task, tmp_path):
    again = train(task, {**TINY_MODEL, "ffn": "moe"}, TINY_TRAIN, tmp_path / "again", progress=False)
    for (name, a), b in zip(trained.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
    stamp = (tmp_path / "again" / "model.safetensors").stat().st_mtime_ns
    train(task, {**TINY_MODEL, "ffn": "moe"}, TINY_TRAIN, tmp_path / "again", progress=False)
    assert (tmp_path / "again" / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained


def test_half_written_run_is_not_reused(task, tmp_path):
    run_dir = tmp_path / "half"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    (run_dir / "model.safetensors").write_bytes(b"partial")
    result = train(task, {**TINY_MODEL, "ffn": "dense"}, TINY_TRAIN, run_dir, progress=False)
    assert (run_dir / "final.json").is_file() and result.metrics["loss"] > 0


def _nan_weights(run_dir) -> None:
    from toylab.io import load_tensors, save_tensors

    weights = load_tensors(run_dir / "model.safetensors")
    save_tensors(run_dir / "model.safetensors", {name: torch.full_like(w, float("nan")) for name, w in weights.items()})


def _dense_checkpoint(run_dir, task=None) -> None:
    from toylab.io import save_tensors

    dense = build_model(get_task("brackets", max_length=10, min_length=2), {**TINY_MODEL, "ffn": "dense"})
    save_tensors(run_dir / "model.safetensors", dense.state_dict())


CORRUPTIONS = {
    "final.json {}": (lambda d: (d / "final.json").write_text("{}"), "final.json"),
    "final.json []": (lambda d: (d / "final.json").write_text("[]"), "final.json"),
    "final.json truncated": (lambda d: (d / "final.json").write_text("{truncated"), "final.json"),
    "config.json null": (lambda d: (d / "config.json").write_text("null"), "config.json"),
    "empty metrics.csv": (lambda d: (d / "metrics.csv").write_text(""), "metrics.csv"),
    "missing metrics.csv": (lambda d: (d / "metrics.csv").unlink(), "metrics.csv"),
    "garbage checkpoint": (lambda d: (d / "model.safetensors").write_bytes(b"not a checkpoint"), "model.safetensors"),
    "missing checkpoint": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    "NaN weights": (_nan_weights, "model.safetensors"),
    "another model's checkpoint": (_dense_checkpoint, "model.safetensors"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_finished_run_is_named_then_retrained(trained, task, tmp_path, corruption, caplog):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir)
    corrupt, culprit = CORRUPTIONS[corruption]
    corrupt(run_dir)
    with pytest.raises(ToylabError, match=culprit) as error:
        load_trained(run_dir)
    assert "\n" not in str(error.value)
    again = train(task, {**TINY_MODEL, "ffn": "moe"}, TINY_TRAIN, run_dir, progress=False)
    assert f"retraining {run_dir}" in caplog.text and culprit in caplog.text
    assert again.metrics == trained.metrics  # the same run, trained anew, and now intact
    assert load_trained(run_dir).metrics == trained.metrics


def test_a_missing_run_gives_a_clear_error(tmp_path):
    with pytest.raises(ToylabError, match="no finished run"):
        load_trained(tmp_path)


def test_nan_loss_raises_divergence_error(task):
    model = build_model(task, {**TINY_MODEL, "ffn": "dense"})
    with torch.no_grad():
        model.W_U.weight.fill_(float("nan"))
    module = SequenceModel(model, task, TINY_TRAIN)
    batch = tuple(task.sample(4, seed=0).tensors())
    with pytest.raises(DivergenceError, match="diverged"):
        module.training_step(batch, 0)


def test_diverging_run_fails_alone(task, tmp_path):
    with pytest.raises(DivergenceError):
        train(task, {**TINY_MODEL, "ffn": "dense"}, TrainConfig(**{**TINY_TRAIN.__dict__, "lr": 1e30, "grad_clip": 0.0}),
              tmp_path / "diverge", progress=False)
    assert not (tmp_path / "diverge" / "final.json").exists() and (tmp_path / "diverge" / ".lock").exists()  # unfinished: kept
    assert json.loads((tmp_path / "diverge" / "config.json").read_text())["train"]["lr"] == 1e30


def test_changed_config_retrains_and_stale_marker_is_removed_first(trained, task, tmp_path, monkeypatch):
    import shutil

    import toylab.training

    run_dir = tmp_path / "changed"
    shutil.copytree(trained.run_dir, run_dir)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while training the new config

    monkeypatch.setattr(toylab.training.pl.Trainer, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        train(task, {**TINY_MODEL, "ffn": "dense"}, TINY_TRAIN, run_dir, progress=False)
    assert not (run_dir / "final.json").exists()
    with pytest.raises(ToylabError, match="no finished run"):
        load_trained(run_dir)


def test_runs_with_tuple_options_are_reused(tmp_path):
    maze = get_task("gridworld")  # its `generators` option is a tuple, saved as a JSON list
    assert isinstance(maze.options["generators"], tuple)
    first = train(maze, {**TINY_MODEL, "ffn": "dense"}, TINY_TRAIN, tmp_path / "maze", progress=False)
    stamp = (first.run_dir / "model.safetensors").stat().st_mtime_ns
    train(maze, {**TINY_MODEL, "ffn": "dense"}, TINY_TRAIN, tmp_path / "maze", progress=False)
    assert (first.run_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_max_len_gives_room_for_longer_sequences(task):
    assert build_model(task, {**TINY_MODEL, "max_len": 50}).W_pos.shape[0] == 50
    with pytest.raises(ToylabError, match="shorter than the task's sequences"):
        build_model(task, {**TINY_MODEL, "max_len": 3})


def test_trimming_unscored_positions_leaves_a_causal_models_loss_unchanged() -> None:
    task = get_task("gridworld", size=3, canvas=4)
    tokens, targets, mask = task.sample(32, seed=0).tensors()
    trimmed = trim_unscored(tokens, targets, mask)
    assert trimmed[0].shape[1] < tokens.shape[1] and trimmed[2][:, -1].any()  # padding dropped, nothing scored lost
    assert trimmed[2].sum() == mask.sum()
    model = build_model(task, {**TINY_MODEL, "ffn": "dense"})
    full, short = sequence_loss(model(tokens), targets, mask), sequence_loss(model(trimmed[0]), *trimmed[1:])
    torch.testing.assert_close(full, short)
