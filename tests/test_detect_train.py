"""Detection end to end: release key map, weights format, layer decay, config checks, the CLI."""

import json
import re
import subprocess
import sys

import pytest
import torch

from flyeva.cli import main
from flyeva.config import ConfigError, load_config, recipe_path
from flyeva.engine.optim import OptimConfig
from flyeva.models.weights import load
from flyeva.tasks.detect.build import build_detector, release_param_groups
from flyeva.tasks.detect.config import DetectConfig, validate
from flyeva.tasks.detect.model import EvaDetector, default_arch
from flyeva.tasks.detect.release import detector_state_from_release

torch.set_num_threads(1)
DIM, C, FC, K = 32, 16, 32, 3


def tiny_arch() -> dict:
    arch = default_arch(K)
    arch["backbone"].update(img_size=64, patch_size=16, embed_dim=DIM, depth=2, num_heads=2, mlp_dim=64,
                            pos_grid=4, window=2, global_blocks=[1], out_channels=C)  # fmt: skip
    arch["roi_heads"].update(conv_dims=[C] * 4, fc_dims=[FC], mask_dims=[C] * 4)
    arch["square_size"] = 64
    return arch


def release_state_dict() -> dict[str, torch.Tensor]:
    """Key names and shapes of the release's detectron2 EVA Cascade Mask R-CNN (tiny sizes)."""
    shapes: dict[str, tuple] = {}

    def add(prefix: str, **named: tuple) -> None:
        shapes.update({f"{prefix}{name.replace('__', '.')}": shape for name, shape in named.items()})

    def conv_ln(prefix: str, shape: tuple) -> None:  # detectron2 Conv2d with LN: no bias, a `.norm` child
        add(prefix, weight=shape, norm__weight=(shape[0],), norm__bias=(shape[0],))

    add("", pixel_mean=(3, 1, 1), pixel_std=(3, 1, 1))
    add("backbone.net.", pos_embed=(1, 17, DIM), patch_embed__proj__weight=(DIM, 3, 16, 16),
        patch_embed__proj__bias=(DIM,))  # fmt: skip
    for block, window in ((0, 2), (1, 4)):
        add(f"backbone.net.blocks.{block}.", norm1__weight=(DIM,), norm1__bias=(DIM,),
            attn__qkv__weight=(3 * DIM, DIM), attn__q_bias=(DIM,), attn__v_bias=(DIM,),
            attn__rel_pos_h=(2 * window - 1, 16), attn__rel_pos_w=(2 * window - 1, 16),
            attn__proj__weight=(DIM, DIM), attn__proj__bias=(DIM,), norm2__weight=(DIM,),
            norm2__bias=(DIM,), mlp__fc1__weight=(64, DIM), mlp__fc1__bias=(64,),
            mlp__fc2__weight=(DIM, 64), mlp__fc2__bias=(DIM,))  # fmt: skip
    half, quarter = DIM // 2, DIM // 4
    simfp_2 = {"0__weight": (DIM, half, 2, 2), "0__bias": (half,), "1__weight": (half,), "1__bias": (half,),
               "3__weight": (half, quarter, 2, 2), "3__bias": (quarter,)}  # fmt: skip
    add("backbone.simfp_2.", **simfp_2)
    conv_ln("backbone.simfp_2.4.", (C, quarter, 1, 1))
    conv_ln("backbone.simfp_2.5.", (C, C, 3, 3))
    add("backbone.simfp_3.", **{"0__weight": (DIM, half, 2, 2), "0__bias": (half,)})
    conv_ln("backbone.simfp_3.1.", (C, half, 1, 1))
    conv_ln("backbone.simfp_3.2.", (C, C, 3, 3))
    for level, first in ((4, 0), (5, 1)):  # simfp_5.0 is the max pool
        conv_ln(f"backbone.simfp_{level}.{first}.", (C, DIM, 1, 1))
        conv_ln(f"backbone.simfp_{level}.{first + 1}.", (C, C, 3, 3))
    rpn = "proposal_generator.rpn_head."
    for k in (0, 1):
        add(f"{rpn}conv.conv{k}.", weight=(C, C, 3, 3), bias=(C,))
    add(rpn, objectness_logits__weight=(3, C, 1, 1), objectness_logits__bias=(3,),
        anchor_deltas__weight=(12, C, 1, 1), anchor_deltas__bias=(12,))  # fmt: skip
    for stage in range(3):
        for conv in range(1, 5):
            conv_ln(f"roi_heads.box_head.{stage}.conv{conv}.", (C, C, 3, 3))
        add(f"roi_heads.box_head.{stage}.", fc1__weight=(FC, C * 49), fc1__bias=(FC,))
        add(f"roi_heads.box_predictor.{stage}.", cls_score__weight=(K + 1, FC), cls_score__bias=(K + 1,),
            bbox_pred__weight=(4, FC), bbox_pred__bias=(4,))  # fmt: skip
    for conv in range(1, 5):
        conv_ln(f"roi_heads.mask_head.mask_fcn{conv}.", (C, C, 3, 3))
    add("roi_heads.mask_head.", deconv__weight=(C, C, 2, 2), deconv__bias=(C,),
        predictor__weight=(K, C, 1, 1), predictor__bias=(K,))  # fmt: skip
    return {key: torch.full(shape, float(i)) for i, (key, shape) in enumerate(shapes.items())}


def test_release_detection_checkpoint_imports_by_key_map():
    release = release_state_dict()
    renamed = detector_state_from_release(release)
    detector = EvaDetector(tiny_arch())
    detector.load_state_dict(renamed, strict=True)  # every key present, every shape right
    state = detector.state_dict()
    pairs = {
        "roi_heads.mask_head.deconv.weight": "roi_heads.mask_predictor.conv5_mask.weight",
        "roi_heads.box_head.2.fc1.weight": "roi_heads.box_head.2.5.weight",
        "roi_heads.box_head.1.conv3.norm.bias": "roi_heads.box_head.1.2.1.bias",
        "proposal_generator.rpn_head.conv.conv1.weight": "proposal_generator.head.conv.1.0.weight",
        "backbone.simfp_2.4.norm.weight": "backbone.simfp_2.4.norm.weight",
    }
    for release_key, ours in pairs.items():  # each tensor holds its own index: it landed in the right place
        torch.testing.assert_close(state[ours], release[release_key])
    with pytest.raises(ValueError, match="no flyeva counterpart"):
        detector_state_from_release({"roi_heads.keypoint_head.x": torch.zeros(1)})


def test_release_file_builds_a_detector(tmp_path):
    path = tmp_path / "eva_coco_det.pth"
    release = release_state_dict()
    torch.save({"model": release, "iteration": 35000}, path)
    overrides = [f"model.init={path}", "model.window=2", "model.img_size=64", "model.box_fc_dims=[32]",
                 "model.out_channels=16", "model.box_conv_dims=[16,16,16,16]",
                 "model.mask_dims=[16,16,16,16]", "model.global_blocks=[1]"]  # fmt: skip
    cfg = load_config(DetectConfig, None, overrides)
    detector = build_detector(cfg, num_classes=K)
    torch.testing.assert_close(detector.state_dict()["roi_heads.box_predictor.0.cls_score.bias"],
                               release["roi_heads.box_predictor.0.cls_score.bias"])  # fmt: skip
    assert detector.backbone.net.pos_embed.shape == (1, 17, DIM)


def test_release_layer_decay_and_weight_decay_on_every_parameter():
    detector = EvaDetector(tiny_arch())
    optim = OptimConfig(weight_decay=0.1, layer_decay=0.9)
    groups = release_param_groups(detector, optim)
    scale = {name: g["lr_scale"] for g in groups for name in g["param_names"]}
    assert scale["backbone.net.pos_embed"] == pytest.approx(0.9**3)  # layer 0 of 2 blocks
    assert scale["backbone.net.blocks.0.norm1.weight"] == pytest.approx(0.9**2)
    assert scale["backbone.net.blocks.1.attn.rel_pos_h"] == pytest.approx(0.9)
    assert scale["backbone.simfp_2.0.weight"] == scale["roi_heads.box_predictor.0.cls_score.weight"] == 1.0
    assert {g["weight_decay"] for g in groups} == {0.1}  # norms, biases and pos_embed too (the release)
    exempt = release_param_groups(detector, optim, decay_all=False)
    decay = {name: g["weight_decay"] for g in exempt for name in g["param_names"]}
    assert (
        decay["backbone.net.blocks.0.norm1.weight"] == 0.0
        and decay["backbone.net.blocks.0.mlp.fc1.weight"] == 0.1
    )


def test_recipes_load_and_bad_values_are_rejected():
    for name in ("eva_giant_coco", "eva_giant_lvis", "eva_giant_o365", "eva_base_coco", "miniature"):
        load_config(DetectConfig, recipe_path("detect", name), [])
    o365 = load_config(DetectConfig, recipe_path("detect", "eva_giant_o365"), ["data.train_json=x"])
    validate(o365)  # the release's EVA-g Objects365 config (..._1B_attn_1024.py): boxes only, batch 128
    assert (o365.model.mask_head, o365.model.img_size, o365.test.size) == (False, 1024, 1024)
    assert (o365.optim.lr, o365.optim.warmup_steps, o365.train.max_steps) == (1e-4, 15000, 350057)
    assert o365.optim.decay_steps == [350050, 350056] and o365.train.accum_steps * 64 == 128
    lvis = load_config(DetectConfig, recipe_path("detect", "eva_giant_lvis"), [])
    assert (lvis.model.classifier, lvis.data.repeat_threshold, lvis.optim.lr) == ("sigmoid_fed", 0.001, 2e-4)
    with pytest.raises(ConfigError, match=r"data\.train_json"):
        validate(load_config(DetectConfig, recipe_path("detect", "eva_giant_coco"), []))
    with pytest.raises(ConfigError, match=r"model\.classifier"):
        validate(load_config(DetectConfig, None, ["model.classifier=focal", "data.train_json=x"]))
    with pytest.raises(ConfigError, match="anchor_sizes"):
        validate(load_config(DetectConfig, None, ["model.anchor_sizes=[32]", "data.train_json=x"]))


TINY_RUN = [
    "data.shapeworld_train=8", "data.shapeworld_val=4", "data.shapeworld_size=32", "model.img_size=32",
    "model.window=4", "model.anchor_sizes=[8,16,32,64]", "test.size=32", "train.batch_size=4",
    "train.max_steps=3", "train.num_workers=0", "train.progress=false", "train.tensorboard=false",
    "test.score_threshold=0.0", "model.mask_dims=[16]", "model.box_fc_dims=[32]", "model.out_channels=16",
]  # fmt: skip


@pytest.mark.slow
def test_cli_train_eval_predict_and_weights_round_trip(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["detect", "train", f"train.output_dir={out}", *TINY_RUN]) == 0
    trained = json.loads((out / "result.json").read_text())["metrics"]
    names = {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}
    assert set(trained) >= {f"bbox_{name}" for name in names} | {f"segm_{name}" for name in names}
    assert isinstance(json.loads((out / "detections.json").read_text()), list)
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["kind"] == "detector" and config["classes"] == [
        "circle",
        "square",
        "triangle",
        "star",
        "cross",
    ]
    detector = load(out / "final")  # the shared weights format rebuilds it from `arch`
    assert isinstance(detector, EvaDetector)
    evaluated = tmp_path / "eval"
    evaluate = ["detect", "eval", f"model.init={out / 'final'}", f"train.output_dir={evaluated}"]
    assert main([*evaluate, *TINY_RUN]) == 0
    again = json.loads((evaluated / "eval.json").read_text())["metrics"]
    assert again == pytest.approx(trained)
    # data.val_json alone (no train_json) is the set evaluated, never the ShapeWorld default
    other = tmp_path / "other"
    export = ["shapeworld", "export", "--out", str(other), "--num", "3", "--start", "100"]
    assert main([*export, "--formats", "coco", "--image-size", "32"]) == 0
    val_json = other / "coco" / "instances.json"
    elsewhere = [f"train.output_dir={tmp_path / 'eval_other'}", f"data.val_json={val_json}"]
    assert main([*evaluate[:3], *TINY_RUN, *elsewhere, "data.shapeworld_val=0"]) == 0
    ids = {image["id"] for image in json.loads(val_json.read_text())["images"]}
    detections = json.loads((tmp_path / "eval_other" / "detections.json").read_text())
    assert len(ids) == 3 and {d["image_id"] for d in detections} == ids  # threshold 0: every image has some
    images = out / "shapeworld" / "val" / "coco" / "images"
    main(["detect", "predict", str(images), f"model.init={out / 'final'}", *TINY_RUN,
          "--out", str(tmp_path / "drawn"), "--threshold", "0.0"])  # fmt: skip
    assert len(list((tmp_path / "drawn").glob("*.png"))) == 4
    assert "wrote 4 images" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_stage_from_an_encoder_folder(tmp_path, caplog):
    from safetensors.torch import load_file

    from flyeva.models.eva import build_encoder, size_arch
    from flyeva.models.weights import save_weights
    from flyeva.tasks.detect.demo import run_demo_stage

    encoder = build_encoder("miniature")
    save_weights(encoder, tmp_path / "encoder", kind="encoder", arch=size_arch(encoder))
    with caplog.at_level("INFO", logger="flyeva.tasks.detect.build"):
        result = run_demo_stage(
            tmp_path / "run", str(tmp_path / "encoder"), seed=0, steps=2, train_images=8, val_images=4
        )
    assert set(result) == {"box_AP", "box_AP50", "mask_AP", "mask_AP50"}
    assert all(0.0 <= value <= 1.0 for value in result.values())
    weights = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert weights["arch"]["backbone"]["pos_grid"] == 8  # the miniature encoder's 32 / 4 table
    # every encoder tensor but the final norm and cls token: 4 blocks x 13 + patch kernel, bias, pos_embed
    total = len(load_file(tmp_path / "run" / "final" / "model.safetensors"))
    line = f"model.init={tmp_path / 'encoder'}: 55 tensors loaded, {total - 55} start fresh"
    assert line in caplog.text


@pytest.mark.slow
def test_resumed_run_trains_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    from flyeva.engine.stage import run_stage
    from flyeva.tasks.detect import DETECT

    common = [o for o in TINY_RUN if not o.startswith(("train.max_steps", "data.shapeworld_val"))]
    common += [
        "data.shapeworld_val=0",
        "train.checkpoint_every=2",
        "train.epochs=2",
    ]

    def run(folder, steps):
        overrides = [*common, f"train.output_dir={folder}", f"train.max_steps={steps}"]
        run_stage(DETECT, load_config(DetectConfig, recipe_path("detect", "miniature"), overrides))
        return load_file(str(folder / "final" / "model.safetensors"))

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)  # stops after the first epoch (2 batches of 4 images)
    resumed = run(tmp_path / "resumed", 4)  # resume=auto continues from step 2
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


def test_fsdp_shards_the_detector_backbone_blocks():
    from flyeva.engine.distributed import shard_units

    detector = EvaDetector(tiny_arch())
    units = shard_units(detector)
    assert units == list(detector.backbone.net.blocks) and len(units) == 2  # not the whole detector


@pytest.mark.slow
def test_a_diverging_detector_exits_3_with_one_line_and_writes_no_final(tmp_path):
    """lr 1e30: boxes go non-finite and every proposal is dropped; the engine's non-finite handling
    (skip, roll back, give up) ends it with exit 3, not a data error."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "flyeva.cli", "detect", "train", f"train.output_dir={out}", *TINY_RUN]
    command += ["optim.lr=1e30", "optim.warmup_steps=0", "train.max_steps=12", "train.checkpoint_every=1",
                "train.max_consecutive_nonfinite=2", "train.max_rollbacks=1"]  # fmt: skip
    command.append("data.shapeworld_val=0")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("flyeva:")]
    assert len(errors) == 1 and "training diverged" in errors[0], done.stderr[-2000:]
    assert not (out / "final").exists()


def to_release_layout(state: dict[str, torch.Tensor], num_box_convs: int) -> dict[str, torch.Tensor]:
    """flyeva's detector names -> detectron2's, written independently of flyeva's key map."""
    rules = [
        (r"^proposal_generator\.head\.conv\.(\d+)\.0\.", r"proposal_generator.rpn_head.conv.conv\1."),
        (r"^proposal_generator\.head\.cls_logits\.", "proposal_generator.rpn_head.objectness_logits."),
        (r"^proposal_generator\.head\.bbox_pred\.", "proposal_generator.rpn_head.anchor_deltas."),
        (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_heads.mask_head.deconv."),
        (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_heads.mask_head.predictor."),
    ]
    released = {}
    for key, value in state.items():
        new = next((re.sub(p, r, key) for p, r in rules if re.match(p, key)), key)
        if match := re.match(r"^roi_heads\.box_head\.(\d+)\.(\d+)\.(.*)$", key):
            stage, index, rest = match.groups()
            if int(index) == num_box_convs + 1:  # after the convs and a Flatten
                new = f"roi_heads.box_head.{stage}.fc1.{rest}"
            else:
                norm = "norm." if rest.startswith("1.") else ""
                new = f"roi_heads.box_head.{stage}.conv{int(index) + 1}.{norm}{rest[2:]}"
        elif match := re.match(r"^roi_heads\.mask_head\.(\d+)\.(\d)\.(.*)$", key):
            index, part, rest = match.groups()
            norm = "norm." if part == "1" else ""
            new = f"roi_heads.mask_head.mask_fcn{int(index) + 1}.{norm}{rest}"
        released[new] = value
    return released


@pytest.mark.slow
def test_a_release_layout_detector_evaluates_as_the_detector_that_wrote_it(tmp_path, caplog):
    """The label set (5 ShapeWorld classes), the heads (3 of width 96) and the window come from the file:
    `detect eval` gives the trained detector's numbers; a training start keeps every layer but the class
    layers of another label set; a backbone-only file initialises the backbone."""
    from safetensors.torch import load_file

    from flyeva.models.weights import read_config

    out = tmp_path / "run"
    run = ["detect", "train", f"train.output_dir={out}", *TINY_RUN, "model.size=miniature"]
    assert main(run) == 0
    trained = json.loads((out / "result.json").read_text())["metrics"]
    state = load_file(str(out / "final" / "model.safetensors"))
    arch = read_config(out / "final")["arch"]
    released = to_release_layout(state, len(arch["roi_heads"]["conv_dims"]))
    assert detector_state_from_release(released, len(arch["roi_heads"]["conv_dims"])).keys() == state.keys()
    path = tmp_path / "model_final.pth"
    torch.save({"model": released, "iteration": 3}, path)
    evaluate = ["detect", "eval", f"model.init={path}", f"train.output_dir={tmp_path / 'eval'}", *TINY_RUN]
    assert main([*evaluate, "model.window=2"]) == 0  # the file's window (4) applies, not the config's
    again = json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]
    assert again == pytest.approx(trained, abs=1e-6)
    # Training from it on a 3-class set: only the class layers start fresh, named with their count.
    cfg = load_config(DetectConfig, recipe_path("detect", "miniature"), [*TINY_RUN, f"model.init={path}"])
    with caplog.at_level("INFO"):
        detector = build_detector(cfg, 3)
    # cls_score (weight, bias) of 3 stages and the mask predictor's logits
    assert "8 class-specific tensors start fresh" in caplog.text
    own = detector.state_dict()
    kept = [k for k in state if ".cls_score." not in k and ".mask_fcn_logits." not in k]
    assert all(torch.equal(own[k], state[k]) for k in kept)
    assert own["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 3
    # ... and evaluating it with 3 classes instead of the file's 5 is one clear error.
    with pytest.raises(ConfigError, match="predicts 5 classes"):
        build_detector(cfg, 3, training=False)
    # A backbone-only file (`backbone.net.*`) is a detector initialisation.
    backbone = {k: v for k, v in released.items() if k.startswith("backbone.net.")}
    torch.save({"model": backbone}, tmp_path / "backbone.pth")
    cfg.model.init = str(tmp_path / "backbone.pth")
    detector = build_detector(cfg, 3)
    assert all(torch.equal(detector.state_dict()[k], v) for k, v in backbone.items())


def test_an_evaluation_that_could_read_no_image_is_an_error_not_zero_ap(tmp_path):
    """Every validation image missing: AP 0.0 would read as a detector that found nothing."""
    from flyeva.tasks.detect.data import CocoDetectionDataset
    from flyeva.tasks.detect.evaluate import DetectionEvaluator

    assert main(["shapeworld", "export", "--out", str(tmp_path), "--num", "2", "--formats", "coco"]) == 0
    val_json = tmp_path / "coco" / "instances.json"
    for image in (tmp_path / "coco" / "images").iterdir():
        image.unlink()
    cfg = load_config(
        DetectConfig, recipe_path("detect", "miniature"), [*TINY_RUN, f"data.val_json={val_json}"]
    )
    evaluator = DetectionEvaluator(CocoDetectionDataset(val_json), val_json, cfg)
    with pytest.raises(ValueError, match="none of the 2 validation images"):
        evaluator.evaluate(build_detector(cfg, 5).eval())


def test_a_detector_folder_claiming_a_giant_architecture_is_refused_before_allocation(tmp_path):
    """config.json edited to EVA-g sizes over tiny weights: one error from the header, no 4 GB build."""
    import resource

    from flyeva.models.weights import save_weights

    detector = EvaDetector(tiny_arch())
    folder = save_weights(detector, tmp_path / "det", kind="detector", arch=detector.arch)
    config = json.loads((folder / "config.json").read_text())
    config["arch"]["backbone"].update(
        embed_dim=1408, depth=40, num_heads=16, mlp_dim=6144, global_blocks=[39]
    )
    (folder / "config.json").write_text(json.dumps(config))
    cfg = load_config(DetectConfig, None, [f"model.init={folder}", "model.img_size=64"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConfigError, match=r"does not fit this detector: .* tensors differ"):
        build_detector(cfg, None, training=False)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: far below EVA-g
