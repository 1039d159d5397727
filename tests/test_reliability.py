"""A run never ends "successfully" with wrong weights (docs/reliability.md): one test per fault.

Engine faults run `train()` in-process on the miniature MIM model and fixed batches; CLI faults run
`flyeva pretrain` on a tiny config (a 1-layer random teacher, synthetic images).
"""

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_run import train
from safetensors.torch import load_file, save_file
from test_engine import ListStream, _pretrain, make_batches, regression_objective

from flyeva.cli import main as cli
from flyeva.config import ConfigError
from flyeva.engine import checkpoint as engine_checkpoint
from flyeva.engine.checkpoint import CheckpointWriteError, list_checkpoints
from flyeva.engine.loop import TrainConfig, TrainingDiverged
from flyeva.engine.optim import OptimConfig
from flyeva.models.eva import build_mim_model

TINY_PRETRAIN = """
model: {size: miniature, drop_path_rate: 0.0}
teacher:
  random_init: {image_size: 32, patch_size: 4, width: 32, layers: 1, heads: 2, mlp_ratio: 2.0, output_dim: 16}
mask: {num_masking_patches: 26, min_num_patches: 4}
data:
  sources: [{type: synthetic, num_samples: 96}]
optim: {lr: 1.0e-3, warmup_epochs: 0.5}
train: {epochs: 2, batch_size: 16, precision: fp32, strategy: ddp, device: cpu, num_workers: 1,
        checkpoint_every: 2, keep_last: 3, log_every: 1, tensorboard: false, progress: false}
"""


def config(out: Path, **changes) -> TrainConfig:
    base = dict(
        output_dir=str(out),
        epochs=1,
        batch_size=4,
        precision="fp32",
        strategy="ddp",
        device="cpu",
        num_workers=0,
        checkpoint_every=2,
        keep_last=5,
        resume="auto",
        tensorboard=False,
        progress=False,
        log_every=1,
    )
    return TrainConfig(**{**base, **changes})


def run(
    out: Path,
    steps: int = 4,
    seed: int = 0,
    optim: OptimConfig | None = None,
    objective=None,
    evaluate=None,
    **changes,
):
    torch.manual_seed(seed)
    model = build_mim_model("miniature", drop_path_rate=0.0)
    return train(
        model,
        objective or regression_objective,
        ListStream(make_batches(steps, seed=seed)),
        config(out, seed=seed, **changes),
        optim or OptimConfig(lr=1e-3, warmup_epochs=0),
        evaluate=evaluate,
    )


def checkpoint_steps(out: Path) -> list[int]:
    return [int(p.name.split("-")[1].split(".")[0]) for p in list_checkpoints(out / "checkpoints")]


# ----- A. one run per folder ---------------------------------------------------------------------


def test_a_new_run_refuses_a_folder_with_another_runs_checkpoints(tmp_path):
    out = tmp_path / "run"
    run(out, steps=8)
    first_id = json.loads((out / "run.json").read_text())["run_id"]
    with pytest.raises(ConfigError, match=r"train\.overwrite=true"):
        run(out, steps=4, seed=1, resume="never")
    assert checkpoint_steps(out) == [2, 4, 6, 8]  # nothing of run 1 was touched
    result = run(out, steps=4, seed=1, resume="never", overwrite=True)
    assert result.step == 4 and checkpoint_steps(out) == [2, 4]  # only run 2's checkpoints remain
    assert json.loads((out / "run.json").read_text())["run_id"] != first_id


# ----- B. two processes on one folder -------------------------------------------------------------

HOLD_LOCK = """
import pathlib, sys, time
from flyeva.engine.run import RunLock
lock = RunLock(pathlib.Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_a_locked_folder_names_the_holder_and_kill_9_frees_it(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"in use by another flyeva run \\(PID {holder.pid}\\)"):
            run(out)
    finally:
        holder.kill()  # SIGKILL: the OS releases the lock, nothing stale is left
        holder.wait()
    assert run(out).step == 4


def test_a_start_that_fails_removes_the_folder_it_created_and_keeps_one_it_found(tmp_path):
    from flyeva.engine.run import RunLock

    created = tmp_path / "new" / "run"
    with pytest.raises(ConfigError), RunLock.hold(created):
        raise ConfigError("bad data")
    assert not (tmp_path / "new").exists()  # both folders the lock made are gone, no stale .lock
    found = tmp_path / "found"
    found.mkdir()
    with pytest.raises(ConfigError), RunLock.hold(found):
        raise ConfigError("bad data")
    assert found.is_dir()
    with RunLock.hold(created):
        (created / "config.yaml").write_text("written")
    assert (created / "config.yaml").is_file()  # a folder a run wrote to stays


# ----- C. non-finite steps are never applied ----------------------------------------------------


class NaNGradientAt:
    """A finite loss whose gradient is NaN at the given steps (fp32 has no loss scaler to notice)."""

    def __init__(self, steps):
        self.steps = steps

    def __call__(self, model, batch, ctx):
        loss, metrics = regression_objective(model, batch, ctx)
        if ctx.step in self.steps:
            handles = []

            def poison_once(grad):
                handles.pop().remove()
                return grad * float("nan")

            handles.append(model.pos_embed.register_hook(poison_once))
        return loss, metrics


def test_a_nan_gradient_with_a_finite_loss_is_skipped_in_fp32_and_logged_as_skipped(tmp_path):
    out = tmp_path / "run"
    result = run(
        out, steps=4, objective=NaNGradientAt({2}), checkpoint_every=1, optim=OptimConfig(clip_grad=0.0)
    )
    assert result.nonfinite_steps == 1 and result.step == 4
    before = torch.load(out / "checkpoints" / "checkpoint-000000002.pt", weights_only=True)["model"]
    after = torch.load(out / "checkpoints" / "checkpoint-000000004.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(before["pos_embed"], after["pos_embed"])  # step 4 applied, step 3 did not
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3] and skipped[0]["loss"] is None  # null, never 0.0
    assert all(isinstance(r["loss"], float) for r in records if r["kind"] == "train" and not r.get("skipped"))


def test_a_run_ending_in_non_finite_steps_raises_instead_of_returning_weights(tmp_path):
    from test_engine import NaNAt

    with pytest.raises(TrainingDiverged, match="ended inside 2 non-finite steps"):
        run(tmp_path / "run", steps=4, objective=NaNAt({2, 3}), checkpoint_every=1)


@pytest.mark.slow
def test_diverging_pretraining_exits_3_with_one_line_and_writes_no_final(tmp_path):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(TINY_PRETRAIN)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "flyeva.cli", "pretrain", "--config", str(config_file)]
    overrides = [
        f"train.output_dir={out}",
        "optim.lr=1e30",
        "train.checkpoint_every=1",
        "train.max_consecutive_nonfinite=2",
    ]
    done = subprocess.run(command + overrides, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("flyeva:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "optim.lr" in errors[0]
    assert "Traceback" not in done.stderr
    assert not (out / "final").exists()


# ----- D. SIGTERM: finish the step, checkpoint, exit 143; the resume is bit-identical ----------


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_the_resume_is_bit_identical(tmp_path):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(TINY_PRETRAIN.replace("checkpoint_every: 2", "checkpoint_every: 100"))
    reference = _pretrain(config_file, tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    interrupted = _pretrain(config_file, tmp_path / "interrupted")
    metrics = tmp_path / "interrupted" / "metrics.jsonl"
    deadline = time.time() + 300
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 3:
        assert interrupted.poll() is None, interrupted.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    interrupted.send_signal(signal.SIGTERM)
    assert interrupted.wait(timeout=120) == 128 + signal.SIGTERM
    stderr = interrupted.stderr.read()
    assert "SIGTERM received" in stderr and "run the same command again to resume" in stderr
    steps = checkpoint_steps(tmp_path / "interrupted")
    assert len(steps) == 1 and 3 <= steps[0] < 12  # written at the stop, not at checkpoint_every
    resumed = _pretrain(config_file, tmp_path / "interrupted")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = load_file(tmp_path / "reference" / "final" / "model.safetensors")
    b = load_file(tmp_path / "interrupted" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


# ----- E. resume with a changed config; a corrupt newest checkpoint ---------------------------


def test_resume_refuses_a_changed_lr_listing_both_values_and_allows_log_every(tmp_path, caplog):
    out = tmp_path / "run"
    run(out, steps=6, max_steps=2)
    with pytest.raises(ConfigError, match=r"optim.lr: 0.001 -> 0.002"):
        run(out, steps=6, optim=OptimConfig(lr=2e-3, warmup_epochs=0))
    with pytest.raises(ConfigError, match=r"train.batch_size: 4 -> 8"):
        run(out, steps=6, batch_size=8)
    with caplog.at_level("INFO"):
        result = run(out, steps=6, log_every=3)
    assert result.step == 6
    assert "changed on resume: train.log_every: 1 -> 3" in caplog.text
    assert "resumed from" in caplog.text


def test_a_resumed_run_keeps_its_earlier_evaluations_and_counts_the_whole_epoch(tmp_path):
    def evaluate(model, ctx):
        return {"score": float(ctx.step)}

    def records(out, kind):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == kind]

    out = tmp_path / "run"
    run(out, steps=3, epochs=2, max_steps=4, checkpoint_every=1, evaluate=evaluate)
    with open(out / "metrics.jsonl", "a") as metrics:
        metrics.write('{"kind": "train", "st')  # a line torn by a kill
    result = run(out, steps=3, epochs=2, checkpoint_every=1, evaluate=evaluate)
    evaluations = [(h["step"], h["eval"]["score"]) for h in result.history if "eval" in h]
    assert evaluations == [(3, 3.0), (4, 4.0), (6, 6.0)]  # the first part's two, then the resumed one
    assert result.eval_epochs == [0, 1, 1]
    assert [(r["step"], r["images"]) for r in records(out, "epoch")] == [(3, 12), (6, 12)]  # 3 steps x 4
    assert [(r["step"], r["epoch"]) for r in records(out, "eval")] == [(3, 0), (4, 1), (6, 1)]


def test_a_run_counted_in_steps_is_extended_by_raising_max_steps_unless_its_lr_curve_spans_it(tmp_path):
    step_decay = OptimConfig(lr=1e-3, warmup_epochs=0, schedule="step", decay_steps=[3])
    reference = run(tmp_path / "reference", steps=3, epochs=0, max_steps=7, optim=step_decay)
    out = tmp_path / "extended"
    assert run(out, steps=3, epochs=0, max_steps=4, optim=step_decay).step == 4
    extended = run(out, steps=3, epochs=0, max_steps=7, optim=step_decay)
    assert extended.step == 7
    a, b = reference.model.state_dict(), extended.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cosine = OptimConfig(lr=1e-3, warmup_epochs=0, schedule="cosine")
    run(tmp_path / "cosine", steps=3, epochs=0, max_steps=4, optim=cosine)
    with pytest.raises(ConfigError, match=r"derived.schedule_steps: 4 -> 7"):
        run(tmp_path / "cosine", steps=3, epochs=0, max_steps=7, optim=cosine)
    with pytest.raises(ConfigError, match=r"epochs=0 with train.max_steps >= 1"):
        run(tmp_path / "neither", epochs=0, max_steps=0)


def test_a_step_whose_every_sample_was_unreadable_leaves_the_weights_as_they_were(tmp_path, capsys):
    def objective(model, batch, ctx):  # as a segmenter: zero gradients reach every parameter
        if len(batch["images"]) == 0:
            return sum(p.sum() for p in model.parameters()) * 0.0, {}
        return regression_objective(model, batch, ctx)

    first = make_batches(1)
    torch.manual_seed(0)
    one = train(
        build_mim_model("miniature", drop_path_rate=0.0),
        objective,
        ListStream(first),
        config(tmp_path / "one"),
        OptimConfig(lr=1e-3, warmup_epochs=0),
    )
    torch.manual_seed(0)
    two = train(
        build_mim_model("miniature", drop_path_rate=0.0),
        objective,
        ListStream([*first, torch.empty(0, 3, 32, 32)]),
        config(tmp_path / "two"),
        OptimConfig(lr=1e-3, warmup_epochs=0),
    )
    assert two.step == 2 and two.nonfinite_steps == 0
    a, b = one.model.state_dict(), two.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # AdamW would have moved them on zero gradients
    assert "step 1: every sample of the step was unreadable, update skipped" in capsys.readouterr().out


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    out = tmp_path / "run"
    reference = run(tmp_path / "reference", steps=6, checkpoint_every=1)
    run(out, steps=6, checkpoint_every=1, max_steps=4)
    newest = list_checkpoints(out / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # cut mid-write by a crash of the filesystem
    with caplog.at_level("INFO"):
        result = run(out, steps=6, checkpoint_every=1)
    assert "checkpoint-000000004.pt is truncated or corrupt" in caplog.text
    assert "resumed from" in caplog.text and "checkpoint-000000003.pt" in caplog.text
    for name, param in reference.model.named_parameters():
        assert torch.equal(param, dict(result.model.named_parameters())[name]), name


# ----- G. one clear line instead of a traceback ------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.accum_steps=0", "train.accum_steps must be at least 1"),
        ("train.checkpoint_every=0", "train.checkpoint_every must be at least 1"),
        ("train.log_every=0", "train.log_every must be at least 1"),
        ("train.eval_every_epochs=0", "train.eval_every_epochs must be at least 1"),
        ("train.keep_last=0", "train.keep_last must be at least 1"),
        ("train.epochs=0", "train.epochs=0: set epochs >= 1, or epochs=0 with train.max_steps >= 1"),
        ("data.scale=[1.0,0.2]", "data.scale must be [low, high]"),
        ("data.sources={type: synthetic}", "gives a value of the wrong kind"),
        ("train.device=cuda", "no usable CUDA GPU"),
        ("train.device=foo", "train.device must be auto, cpu, cuda or cuda:N"),
        ("mask.target=foo", "mask.target must be one of ['clip', 'pixels', 'distill']"),
        ("optim.schedule=linear", "optim.schedule='linear' is not one of"),
        ("model.init=", "override 'model.init=' has no value; for an empty string write \"model.init=''\""),
        ("train.max_skipped_fraction=1.5", "train.max_skipped_fraction must be in [0, 1)"),
    ],
)
def test_bad_values_fail_before_any_work_with_one_line(tmp_path, capsys, monkeypatch, override, message):
    if override == "train.device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(
        tmp_path
    )  # the default recipe trains its teacher into runs/ first: not before the check
    assert cli(["pretrain", override]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and message in error, error
    assert not (tmp_path / "runs").exists()


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  epochs: 3\n   batch_size: [1, 2\n")
    assert cli(["pretrain", "--config", str(broken)]) == 2
    error = capsys.readouterr().err.strip()
    assert f"{broken} is not valid YAML at line" in error and "\n" not in error


def test_a_misspelled_source_key_gets_the_source_keys_hint(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("data:\n  sources:\n    - {typ: folder, path: /data}\n")
    assert cli(["pretrain", "--config", str(recipe)]) == 2
    assert "did you mean 'data.sources.N.type'?" in capsys.readouterr().err


def test_resume_from_a_pickle_is_refused_with_one_line(tmp_path):
    pickle_file = tmp_path / "evil.pt"
    torch.save({"model": {}, "step": 1, "payload": Path("/etc")}, pickle_file)  # a class, not plain data
    with pytest.raises(ValueError, match="holds pickled Python objects"):
        run(tmp_path / "run", resume=str(pickle_file))


def test_disk_full_during_a_save_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(out, steps=4, max_steps=2)
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)  # a partial file exists when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine_checkpoint.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=f"in {out / 'checkpoints'}: the disk is full"):
        run(out, steps=4)
    monkeypatch.setattr(engine_checkpoint.torch, "save", real_save)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-000000002.pt"]  # the .tmp is gone, the previous checkpoint stays


# ----- H. bad values that used to be accepted silently ---------------------------------------


@pytest.mark.parametrize("bad", ["nan", "int"])
def test_model_init_with_nan_or_integer_weights_is_refused(tmp_path, bad):
    from flyeva.models.checkpoint import save_flyeva
    from flyeva.pretrain.run import load_init

    model = build_mim_model("miniature")
    folder = save_flyeva(model, tmp_path / "init")
    state = load_file(folder / "model.safetensors")
    state["pos_embed"] = state["pos_embed"] * float("nan") if bad == "nan" else state["pos_embed"].long()
    save_file(state, str(folder / "model.safetensors"))
    expected = "non-finite values" if bad == "nan" else "torch.int64 values"
    with pytest.raises(ConfigError, match=f"pos_embed holds {expected}"):
        load_init(build_mim_model("miniature"), str(folder))


def test_worker_ignores_stop_signals_so_the_main_process_decides(tmp_path):
    from flyeva.engine.preemption import ignore_stop_signals

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        ignore_stop_signals()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN == signal.getsignal(signal.SIGINT)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ----- I. captions ---------------------------------------------------------------------------


def test_invalid_utf8_in_a_caption_table_skips_that_pair_naming_file_and_line(tmp_path):
    from PIL import Image

    from flyeva.data.sources import CaptionTableSource, UnreadableTargetError

    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    table = tmp_path / "pairs.tsv"
    table.write_bytes(b"filepath\ttitle\na.png\ta red disc\nb.png\ta \xff\xfe disc\nc.png\ta blue star\n")
    source = CaptionTableSource(table)
    assert len(source) == 3 and source.target(0) == "a red disc" and source.target(2) == "a blue star"
    with pytest.raises(UnreadableTargetError, match=f"{table} line 3 is not valid UTF-8"):
        source.target(1)


# ----- F. decoded pixels are capped ---------------------------------------------------------------


def test_a_large_jpeg_decodes_at_reduced_size_and_a_large_png_is_skipped(tmp_path):
    from PIL import Image

    from flyeva.data.sources import UnreadableImageError, decode_rgb

    Image.new("RGB", (3000, 2000), (200, 10, 10)).save(tmp_path / "big.jpg", quality=70)
    Image.new("RGB", (3000, 2000), (200, 10, 10)).save(tmp_path / "big.png")
    image = decode_rgb(tmp_path / "big.jpg", max_pixels=2_000_000)  # 6 MP: libjpeg decodes at 1/2
    assert image.size == (1500, 1000) and image.getpixel((10, 10))[0] > 150
    assert decode_rgb(tmp_path / "big.jpg", max_pixels=400_000).size == (750, 500)  # 1/4
    with pytest.raises(
        UnreadableImageError, match="3000x2000 = 6000000 pixels, more than max_pixels=2000000"
    ):
        decode_rgb(tmp_path / "big.png", max_pixels=2_000_000)  # no draft mode for PNG: skipped


def test_retrieval_sets_follow_the_caption_convention_and_skip_invalid_utf8(tmp_path, caplog):
    from PIL import Image

    from flyeva.tasks.clip.datasets import captioned_set

    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(folder / f"{name}.png")
    (folder / "a.txt").write_text("a red disc\non grass\n")  # one caption: the whole file
    (folder / "b.txt").write_bytes(b"a \xff disc")
    (folder / "c.txt").write_text("a blue star")
    with caplog.at_level("WARNING"):
        images, captions, owners = captioned_set(folder)
    assert [p.name for p in images] == ["a.png", "c.png"] and owners == [0, 1]
    assert captions == ["a red disc\non grass", "a blue star"]
    assert f"{folder / 'b.txt'} is not valid UTF-8" in caplog.text
    table = tmp_path / "pairs.csv"
    table.write_bytes(
        b"filepath,title\nfolder/a.png,one\nfolder/a.png,two\nfolder/b.png,\xfe\nfolder/c.png,three\n"
    )
    images, captions, owners = captioned_set(table)
    assert captions == ["one", "two", "three"] and owners == [0, 0, 1]
    assert f"{table} line 4 is not valid UTF-8" in caplog.text


def test_a_corrupt_clip_folder_is_one_clear_error(tmp_path):
    from flyeva.models.weights import WeightsError, save_weights
    from flyeva.tasks.clip.model import load_clip

    folder = save_weights(torch.nn.Linear(4, 4), tmp_path / "clip", kind="clip", arch={})
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:40])
    with pytest.raises(WeightsError, match=r"model\.safetensors is truncated or corrupt"):
        load_clip(folder)


def test_a_class_whose_images_are_all_unreadable_is_an_error_naming_it(tmp_path):
    from PIL import Image

    from flyeva.tasks.classify.data import DataSection, prepare_data

    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "a.png")
    for index in range(3):
        (tmp_path / "train" / "dog" / f"broken{index}.png").write_bytes(b"not a png")
    assert prepare_data(DataSection(root=str(tmp_path))).num_classes == 2
    (tmp_path / "train" / "dog" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"1 classes have no readable training image: \['dog'\]"):
        prepare_data(DataSection(root=str(tmp_path)))


# ----- detection, segmentation and video: bad input is one line before any work -----------------


def _folder_as_it_was(folder: Path) -> bool:
    """Nothing of a run in `folder`: no config, checkpoint, data or weights (the lock is the engine's)."""
    return not folder.exists() or sorted(p.name for p in folder.iterdir()) == [".lock"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["detect", "train", "test.size=0"], "test.size=0 must be in [1, 4096] px"),
        (["detect", "eval", "test.size=0", "model.init=x"], "test.size=0 must be in [1, 4096] px"),
        (["detect", "train", "test.detections_per_image=0"],
         "test.detections_per_image and test.extra_caps must be >= 1, got [0]"),
        (["detect", "train", "test.extra_caps=[1000,0]"], "must be >= 1, got [100, 1000, 0]"),
        (["detect", "train", "model.img_size=100000", "model.patch_size=16"],
         "model.img_size=100000 is over the limit of 4096 px"),
        (["segment", "train", "aug.crop_size=100000"], "aug.crop_size=100000 is over the limit of 4096 px"),
        (["segment", "train", "eval.crop_size=65536"], "eval.crop_size=65536 is over the limit of 4096 px"),
        (["video", "train", "model.img_size=5000"], "model.img_size=5000 must be in [1, 1024] px"),
    ],
)  # fmt: skip
def test_absurd_sizes_and_zero_caps_of_the_task_stages_fail_before_any_work(
    tmp_path, capsys, monkeypatch, argv, message
):
    monkeypatch.chdir(tmp_path)  # the default output folders are under runs/: nothing may appear there
    assert cli([*argv, f"train.output_dir={tmp_path / 'run'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and message in error, error
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_a_segmenter_from_a_video_folder_says_what_to_pass_instead(tmp_path, capsys):
    from flyeva.models.eva import get_size
    from flyeva.models.weights import save_weights
    from flyeva.tasks.video.model import build_video_model, video_arch

    video = build_video_model(get_size("miniature"), 3, num_frames=2)
    folder = save_weights(video, tmp_path / "video", kind="video", arch=video_arch(video))
    out = tmp_path / "run"
    assert cli(["segment", "train", f"model.init={folder}", f"train.output_dir={out}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"model.init={folder} holds a video model" in error, error
    assert "pass the image encoder it was inflated from" in error and "re-export" not in error
    assert not out.exists()  # refused with the config, before the ShapeWorld data is written


def test_a_corrupt_detector_folder_is_one_line_naming_the_file(tmp_path, capsys):
    from test_detect_train import tiny_arch

    from flyeva.models.weights import save_weights
    from flyeva.tasks.detect.model import EvaDetector

    detector = EvaDetector(tiny_arch())
    folder = save_weights(detector, tmp_path / "det", kind="detector", arch=detector.arch)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    out = tmp_path / "eval"
    command = ["detect", "eval", f"model.init={folder}", "model.img_size=64", "data.shapeworld_val=2"]
    for broken in (data[:40], data[: len(data) // 2], b"\xff" * len(data)):
        weights.write_bytes(broken)
        assert cli([*command, f"train.output_dir={out}"]) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and f"{weights} is truncated or corrupt" in error, error
        assert _folder_as_it_was(out)
    weights.write_bytes(data)  # a NaN in a tensor: named, nothing evaluated
    state = load_file(str(weights))
    state["roi_heads.box_predictor.0.cls_score.weight"][0, 0] = float("nan")
    save_file(state, str(weights))
    assert cli([*command, f"train.output_dir={out}"]) == 2
    error = capsys.readouterr().err.strip()
    assert "roi_heads.box_predictor.0.cls_score.weight holds NaN or Inf" in error and _folder_as_it_was(out)


@pytest.mark.slow
def test_a_second_detect_train_from_another_init_into_the_same_folder_is_refused(tmp_path, capsys):
    """The first run's numbers are never reported as the second's: the recorded config differs."""
    from test_detect_train import TINY_RUN

    out = tmp_path / "run"
    first = ["detect", "train", f"train.output_dir={out}", *TINY_RUN, "data.shapeworld_val=0"]
    assert cli(first) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    other = tmp_path / "other"
    shutil.copytree(out / "final", other / "final")
    assert cli([*first, f"model.init={other / 'final'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"model.init: '' -> '{other / 'final'}'" in error, error
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # config.yaml, run.json, checkpoints, final/ and result.json as they were


def _mini_video(tmp_path) -> Path:
    from flyeva.data.video.decode import write_video

    frames = [np.full((32, 32, 3), 10 * k, np.uint8) for k in range(8)]
    return write_video(tmp_path / "clip.mp4", frames)


@pytest.mark.parametrize(
    ("listing", "message"),
    [
        (b"clip.mp4 0\nclip.mp4 \xff1\n", "list.txt line 2 is not valid UTF-8 (byte 0xff)"),
        (b"clip.mp4 0\nclip.mp4 1\nclip.mp4 999\n",
         "integer labels without data.classes make 1000 classes (0..999), but 997 of them label no video "
         "(e.g. [2, 3, 4, 5, 6]); the largest label is 999 (line 3)"),
    ],
    ids=["non-utf8 list", "integer label typo"],
)  # fmt: skip
def test_a_video_list_that_cannot_be_read_as_written_is_one_line(tmp_path, capsys, listing, message):
    from flyeva.config import recipe_path

    _mini_video(tmp_path)
    (tmp_path / "list.txt").write_bytes(listing)
    out = tmp_path / "run"
    recipe = str(recipe_path("video", "miniature"))
    listing_file = tmp_path / "list.txt"
    argv = ["video", "train", "--config", recipe, "data.train.type=list", f"data.train.path={listing_file}",
            "data.val.type=none", f"train.output_dir={out}"]  # fmt: skip
    assert cli(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and message in error, error
    assert _folder_as_it_was(out)
