"""ShapeWorld: determinism, label consistency, the class task's difficulty, clips, and exports."""

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flyeva.data.export import FORMATS, class_folder_name, encode_rle, export_split
from flyeva.data.synthetic import COLOURS, SHAPES, ShapeWorld, ShapeWorldSource

WORLD = ShapeWorld(image_size=64, seed=0)
# pycocotools' C decoder predates NumPy 2's copy keyword; the warning is theirs, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def scenes():
    return [WORLD.sample(index) for index in range(300)]


def pixels(image):
    return np.asarray(image)


def test_vocabularies():
    assert WORLD.num_classes == len(WORLD.class_names) == 20
    assert WORLD.class_names[0] == "circle in the top left"
    assert WORLD.class_names[9] == "triangle in the top right"  # shape 2 * 4 quadrants + quadrant 1
    assert [c["id"] for c in WORLD.categories] == [1, 2, 3, 4, 5]
    assert [c["name"] for c in WORLD.categories] == list(SHAPES)
    assert len(WORLD.action_names) == 8 and len(COLOURS) == 8


def test_same_seed_and_index_give_identical_samples_and_other_seeds_differ():
    first, again = WORLD.sample(17), ShapeWorld(seed=0).sample(17)
    assert np.array_equal(pixels(first.image), pixels(again.image))
    assert np.array_equal(first.masks, again.masks) and np.array_equal(first.boxes, again.boxes)
    assert (first.caption, first.label) == (again.caption, again.label)
    # Order of calls does not matter: index 17 after others equals index 17 first.
    assert np.array_equal(pixels(WORLD.render(17)), pixels(first.image))
    other_seed = [ShapeWorld(seed=1).render(index) for index in range(20)]
    differing = sum(not np.array_equal(pixels(a), pixels(WORLD.render(i))) for i, a in enumerate(other_seed))
    assert differing == 20
    clip_a, clip_b = WORLD.clip(3), ShapeWorld(seed=0).clip(3)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(clip_a.frames, clip_b.frames))


def test_render_fast_path_and_cheap_getters_match_sample(scenes):
    for index in range(0, 300, 7):
        scene = scenes[index]
        assert np.array_equal(pixels(WORLD.render(index)), pixels(scene.image))
        assert WORLD.label(index) == scene.label and WORLD.caption(index) == scene.caption


def test_annotations_are_consistent(scenes):
    size = WORLD.image_size
    for scene in scenes:
        n = len(scene.objects)
        assert WORLD.min_objects <= n <= WORLD.max_objects
        assert scene.image.size == (size, size) and scene.image.mode == "RGB"
        assert scene.boxes.shape == (n, 4) and scene.boxes.dtype == np.float32
        assert scene.masks.shape == (n, size, size) and scene.masks.dtype == bool
        assert scene.semantic.shape == (size, size) and scene.semantic.dtype == np.uint8
        painted = np.zeros((size, size), np.uint8)
        for mask, box, category, obj in zip(scene.masks, scene.boxes, scene.categories, scene.objects):
            ys, xs = np.nonzero(mask)
            # Tight xyxy box in pixel edges around the visible mask (so the mask lies inside it).
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert category == SHAPES.index(obj["shape"]) + 1
            assert mask.sum() == obj["visible_pixels"] <= obj["full_pixels"]
            assert obj["visible_pixels"] >= 0.5 * obj["full_pixels"]  # no object is mostly hidden
            painted[mask] = category
        assert (scene.masks.sum(axis=0) <= 1).all()  # visible parts never overlap
        assert np.array_equal(painted, scene.semantic)
        # Class = shape of the largest object x quadrant of its centre, recomputed here from `objects`.
        largest = max(scene.objects, key=lambda obj: obj["size"])
        x, y = largest["position"]
        quadrant = 2 * (y >= size / 2) + (x >= size / 2)
        assert scene.label == SHAPES.index(largest["shape"]) * 4 + quadrant
        assert scene.class_name == f"{largest['shape']} in the {WORLD.QUADRANTS[quadrant]}"
        # The class in words: colour, fill and background words would be contrastive shortcuts.
        assert scene.caption == f"a large {largest['shape']} in the {WORLD.QUADRANTS[quadrant]}"


def test_occlusion_happens_and_is_reflected_in_masks(scenes):
    full_pixels = [sum(obj["full_pixels"] for obj in scene.objects) for scene in scenes]
    occluded = [scene for scene, full in zip(scenes, full_pixels) if scene.masks.sum() < full]
    assert 20 <= len(occluded) < len(scenes)
    for scene in occluded:
        # Visible pixels of all objects = pixels covered by any shape < the sum of whole shapes.
        assert scene.masks.sum() == (scene.semantic > 0).sum() < sum(o["full_pixels"] for o in scene.objects)


def test_classes_are_balanced_and_colours_vary_within_a_class():
    labels = np.array([WORLD.label(index) for index in range(4000)])
    counts = np.bincount(labels, minlength=20)
    assert counts.min() >= 0.75 * 200 and counts.max() <= 1.25 * 200
    colours_in_class_0 = {WORLD.sample(int(i)).objects[0]["colour"] for i in np.flatnonzero(labels == 0)[:60]}
    assert len(colours_in_class_0) >= 6


def colour_histogram(image):
    """Joint RGB histogram, 8 bins per channel (512 bins), as a fraction of the pixels."""
    bins = pixels(image).reshape(-1, 3) // 32
    return np.bincount(bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2], minlength=512) / len(bins)


def nearest_centroid_accuracy(features, labels, num_classes, split):
    """Fit class means on features[:split] (z-scored with its statistics), score on the rest."""
    mean, std = features[:split].mean(axis=0), features[:split].std(axis=0) + 1e-6
    features = (features - mean) / std
    centroids = np.stack([features[:split][labels[:split] == k].mean(axis=0) for k in range(num_classes)])
    distances = ((features[split:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    return float((distances.argmin(axis=1) == labels[split:]).mean())


def test_class_task_is_not_solvable_from_colour_histograms():
    scenes = [WORLD.sample(index) for index in range(2000)]
    features = np.stack([colour_histogram(scene.image) for scene in scenes])
    labels = np.array([scene.label for scene in scenes])
    # Measured 0.047 (chance 0.05); shapes alone 0.190 (chance 0.2): equal-area shapes hide in histograms.
    assert nearest_centroid_accuracy(features, labels, 20, split=1000) < 2 * (1 / 20)
    assert nearest_centroid_accuracy(features, labels // 4, 5, split=1000) < 1.5 * (1 / 5)
    # The same classifier does read colour: it finds the largest object's colour (measured 0.98, chance 1/8).
    largest_colour = np.array(
        [list(COLOURS).index(max(s.objects, key=lambda o: o["size"])["colour"]) for s in scenes]
    )
    assert nearest_centroid_accuracy(features, largest_colour, 8, split=1000) > 0.6


def test_clips_move_the_way_their_action_says():
    world = ShapeWorld(num_frames=10)
    clips = [world.clip(index) for index in range(80)]
    assert sorted({clip.action_name for clip in clips}) == sorted(world.action_names)
    for clip in clips:
        name = clip.action_name
        assert clip.action == world.action_names.index(name) and clip.caption.endswith(name)
        assert len(clip.frames) == 10 and clip.masks.shape == (10, 64, 64)
        assert all(not np.array_equal(pixels(a), pixels(b)) for a, b in zip(clip.frames, clip.frames[1:]))
        ys, xs = zip(*(np.nonzero(mask) for mask in clip.masks))
        centre_x = np.array([x.mean() for x in xs])
        centre_y = np.array([y.mean() for y in ys])
        area = clip.masks.sum(axis=(1, 2))
        moving, steady = {
            "moving left": (-centre_x, centre_y),
            "moving right": (centre_x, centre_y),
            "moving up": (-centre_y, centre_x),
            "moving down": (centre_y, centre_x),
        }.get(name, (None, None))
        if moving is not None:
            assert (np.diff(moving) > 0).all() and moving[-1] - moving[0] >= 0.25 * 64 - 1
            assert np.ptp(steady) < 1.5
        elif name in ("growing", "shrinking"):
            growth = area if name == "growing" else -area
            assert (np.diff(growth) > 0).all() and area.max() >= 2 * area.min()
            assert np.ptp(centre_x) < 1.5 and np.ptp(centre_y) < 1.5
        else:
            angles = np.array([obj["angle"] for obj in clip.objects])
            step = np.diff(angles)
            assert (step > 0).all() if name == "rotating clockwise" else (step < 0).all()
            assert np.ptp(centre_x) < 1.5 and np.ptp(centre_y) < 1.5
            # Pixels agree: turning frame t by the stated step on screen matches frame t+1 better than
            # turning it the other way (PIL's positive angle is counter-clockwise on screen).
            right = wrong = 0
            for t in range(9):
                centre = (centre_x[t] + 0.5, centre_y[t] + 0.5)
                mask = Image.fromarray(clip.masks[t].astype(np.uint8) * 255)
                for sign in (1, -1):
                    turned = np.asarray(mask.rotate(-sign * math.degrees(step[t]), center=centre)) > 127
                    iou = (turned & clip.masks[t + 1]).sum() / (turned | clip.masks[t + 1]).sum()
                    right, wrong = (right + iou, wrong) if sign == 1 else (right, wrong + iou)
            assert right > wrong + 0.5, (right, wrong)


def test_source_follows_the_indexable_source_protocol():
    images_only = ShapeWorldSource(WORLD, 50)
    assert len(images_only) == 50 and images_only.classes is None
    assert len({images_only.key(i) for i in range(50)}) == 50
    assert np.array_equal(pixels(images_only.load(4)), pixels(WORLD.sample(4).image))
    with pytest.raises(ValueError, match="has no target"):
        images_only.target(0)
    with pytest.raises(IndexError, match="out of range"):
        images_only.load(50)
    labelled = ShapeWorldSource(WORLD, 50, target="label")
    assert labelled.classes == WORLD.class_names and labelled.target(4) == WORLD.sample(4).label
    assert ShapeWorldSource(WORLD, 50, target="caption").target(4) == WORLD.sample(4).caption
    from flyeva.data.stream import ImageBatchStream

    def to_tensor(image):
        import torch

        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    batch = next(iter(ImageBatchStream(images_only, to_tensor, batch_size=8)))
    assert tuple(batch["images"].shape) == (8, 3, 64, 64)


def test_min_objects_is_met_even_when_crowded():
    crowded = ShapeWorld(min_objects=6, max_objects=6)
    assert [len(crowded.sample(index).objects) for index in range(100)] == [6] * 100


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="image_size >= 32"):
        ShapeWorld(image_size=16)
    with pytest.raises(ValueError, match="min_objects <= max_objects"):
        ShapeWorld(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="target must be None, 'label' or 'caption'"):
        ShapeWorldSource(WORLD, 10, target="labels")
    with pytest.raises(ValueError, match="unknown export format"):
        export_split(WORLD, "/nonexistent", 1, formats=("coco", "voc"))


def test_rle_encoding_matches_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    masks = [rng.random((13, 9)) > 0.5, np.ones((4, 5), bool), np.zeros((4, 5), bool)]
    for mask in [*masks, *WORLD.sample(5).masks]:
        reference = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert encode_rle(mask)["counts"] == reference["counts"].decode()
        assert np.array_equal(mask_utils.decode(encode_rle(mask)), mask)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapeworld")
    others = [name for name in FORMATS if name != "imagefolder"]
    written = export_split(WORLD, out, num_samples=24, start_index=5, shard_size=10, formats=others)
    # 73 uniform draws from index 5 on are the first to give each of the 20 classes an image
    return written | export_split(WORLD, out, num_samples=80, start_index=5, formats=["imagefolder"])


def test_coco_export_scores_perfect_ap_for_ground_truth_predictions(exported):
    coco_module = pytest.importorskip("pycocotools.coco")
    from pycocotools.cocoeval import COCOeval

    ground_truth = coco_module.COCO(str(exported["coco"]))
    assert len(ground_truth.getImgIds()) == 24
    assert ground_truth.loadImgs(6)[0]["file_name"] == "00000005.png"
    assert (exported["coco"].parent / "images" / "00000005.png").is_file()
    scene = WORLD.sample(5)
    annotations = ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=6))
    decoded = np.stack([ground_truth.annToMask(annotation) for annotation in annotations])
    assert np.array_equal(decoded.astype(bool), scene.masks)
    predictions = [
        {k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation")} | {"score": 1.0}
        for a in ground_truth.dataset["annotations"]
    ]
    detections = ground_truth.loadRes(predictions)
    for iou_type in ("bbox", "segm"):
        evaluation = COCOeval(ground_truth, detections, iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        assert evaluation.stats[0] == pytest.approx(1.0)  # AP @[.5:.95]


def test_imagefolder_export_orders_classes_like_labels(exported):
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(exported["imagefolder"]))  # every class holds an image
    assert dataset.classes == [class_folder_name(k, n) for k, n in enumerate(WORLD.class_names)]
    assert dataset.classes[9] == "09_triangle_in_the_top_right"
    indices = [int(Path(path).stem) for path, _ in dataset.samples]
    assert sorted(indices) == list(range(5, 85))
    assert [label for _, label in dataset.samples] == [WORLD.label(index) for index in indices]
    path, _ = dataset.samples[0]
    assert np.array_equal(pixels(Image.open(path).convert("RGB")), pixels(WORLD.render(indices[0])))


def test_webdataset_export_round_trips(exported):
    shards = sorted(exported["wds"].glob("shard-*.tar"))
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    members = {}
    for shard in shards:
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                members[member.name] = archive.extractfile(member).read()
    assert len(members) == 3 * 24
    for index in (5, 17, 28):
        scene = WORLD.sample(index)
        assert members[f"{index:08d}.txt"].decode() == scene.caption
        assert int(members[f"{index:08d}.cls"]) == scene.label
        decoded = np.asarray(Image.open(io.BytesIO(members[f"{index:08d}.jpg"])).convert("RGB"))
        assert decoded.shape == (64, 64, 3)
        assert np.abs(decoded.astype(int) - pixels(scene.image)).mean() < 6  # JPEG at quality 95


def test_semantic_export_round_trips_exactly(exported):
    for index in (5, 28):
        label_png = Image.open(exported["semantic"] / "labels" / f"{index:08d}.png")
        assert label_png.mode == "L"
        scene = WORLD.sample(index)
        assert np.array_equal(np.asarray(label_png), scene.semantic)
        image_png = Image.open(exported["semantic"] / "images" / f"{index:08d}.png")
        assert np.array_equal(np.asarray(image_png), pixels(scene.image))


def test_video_export_is_h264_clips_the_video_reader_takes(exported):
    from flyeva.data.video.datasets import load_video_list
    from flyeva.data.video.decode import get_decoder

    classes = exported["video"].parent / "classes.txt"
    videos = load_video_list("list", str(exported["video"]), classes_file=str(classes))
    assert exported["video"].name == "list.csv" and len(videos.paths) == 24
    assert videos.classes == list(WORLD.action_names)
    assert videos.labels == [WORLD.clip(index).action for index in range(5, 29)]
    clip = WORLD.clip(28)
    frames = get_decoder("pyav").read(videos.paths[-1], lambda n: list(range(n)))
    assert frames.shape == (WORLD.num_frames, 64, 64, 3)
    expected = np.stack([pixels(frame) for frame in clip.frames]).astype(int)
    assert np.abs(frames.astype(int) - expected).mean() < 4  # H.264 at crf 10, chroma at half resolution


def test_coco_json_is_plain_json(exported):
    document = json.loads(exported["coco"].read_text())
    assert document["categories"] == WORLD.categories
    assert {a["image_id"] for a in document["annotations"]} == set(range(6, 30))
    assert sum(len(WORLD.sample(i).objects) for i in range(5, 29)) == len(document["annotations"])


def test_an_imagefolder_export_that_would_leave_a_class_empty_is_refused_before_writing(tmp_path, capsys):
    """Every ImageFolder reader refuses an empty class folder: the export says so first, writing nothing."""
    from flyeva.cli import main

    code = main(["shapeworld", "export", "--out", str(tmp_path / "few"), "--num", "3"])
    error = capsys.readouterr().err
    assert code == 2 and "3 images leave" in error and "--num" in error, error
    assert not (tmp_path / "few").exists()
    boxes = ["shapeworld", "export", "--out", str(tmp_path / "boxes"), "--num", "3", "--formats", "coco"]
    assert main(boxes) == 0
