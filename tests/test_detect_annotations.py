"""Hostile COCO-format annotation files (docs/reliability.md): one test per fault.

A record of the wrong shape is refused up front with one line naming the file, the record and the
field (exit 2 from the CLI); a record whose values cannot be trained on is dropped, counted and
named, and `check_usable` stops a run whose data is mostly or entirely unusable.
"""

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from flyeva.cli import main as cli
from flyeva.data.export import encode_rle
from flyeva.data.sources import UnreadableImageError
from flyeva.tasks.detect.annotations import (
    check_usable,
    evaluation_ground_truth,
    load_annotation_file,
    rle_string_total,
)
from flyeva.tasks.detect.data import CocoDetectionDataset
from flyeva.tasks.detect.lvis import fed_loss_classes, fed_loss_weights


def square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def ann(ann_id, image_id, bbox=(2, 2, 8, 8), segmentation=None, category_id=1, **extra):
    segmentation = square(2, 2, 10, 10) if segmentation is None else segmentation
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
            "segmentation": segmentation, "iscrowd": 0, **extra}  # fmt: skip


def document(images=2, annotations=None):
    return {
        "images": [
            {"id": i, "file_name": f"{i}.png", "height": 30, "width": 40} for i in range(1, images + 1)
        ],
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
        "annotations": [ann(i, i) for i in range(1, images + 1)] if annotations is None else annotations,
    }


def write(folder, doc, images=True):
    """`doc` as folder/instances.json, with its images (40x30 PNGs, or the size given) next to it."""
    (folder / "images").mkdir(exist_ok=True)
    if images:
        for image in doc.get("images", []) if isinstance(doc, dict) else []:
            if isinstance(image, dict) and isinstance(image.get("file_name"), str):
                Image.new("RGB", (40, 30)).save(folder / "images" / image["file_name"])
    path = folder / "instances.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def changed(change):
    doc = document()
    change(doc)
    return doc


# ----- one line for every record of the wrong shape ------------------------------------------------


def set_ann(index, **values):
    return lambda d: d["annotations"][index].update(values)


def set_image(index, **values):
    return lambda d: d["images"][index].update(values)


def set_category(index, **values):
    return lambda d: d["categories"][index].update(values)


def pop(section, index, key):
    return lambda d: d[section][index].pop(key)


WRONG_SIZE_RLE = encode_rle(np.ones((10, 10), bool))
SCHEMA_FAULTS = [
    ("top-level list", lambda d: [d], "instances.json: the top level: is a list, not an object"),
    ("category without id", pop("categories", 0, "id"), "categories[0]: 'id' must be an integer"),
    ("categories as a dict", lambda d: d.update(categories={"1": "one"}),
     "'categories': must be a list of objects, got a dict"),
    ("image without height", pop("images", 0, "height"),
     "images[0] (id 1): 'height' must be a positive integer (pixels), got None"),
    ("float width (crashes evaluation)", set_image(1, width=40.0),
     "images[1] (id 2): 'width' must be a positive integer"),
    ("image without a path", pop("images", 0, "file_name"),
     "images[0] (id 1): has neither 'file_name' nor 'coco_url'"),
    ("list-valued image id", set_image(1, id=[2]), "images[1]: 'id' must be an integer, got [2]"),
    ("list-valued annotation id", set_ann(1, id=[2]), "annotations[1]: 'id' must be an integer, got [2]"),
    ("annotation without image_id", pop("annotations", 1, "image_id"),
     "annotations[1] (id 2): 'image_id' must be an integer, got None"),
    ("string category_id", set_ann(0, category_id="1"),
     "annotations[0] (id 1): 'category_id' must be an integer, got '1'"),
    ("string bbox (crashes evaluation)", set_ann(1, bbox="2,2,8,8"),
     "annotations[1] (id 2): 'bbox' must be 4 numbers [x, y, width, height], got '2,2,8,8'"),
    ("three-number bbox", set_ann(0, bbox=[1, 2, 3]), "annotations[0] (id 1): 'bbox'"),
    ("string polygons", set_ann(0, segmentation=["2,2,10,2,10,10"]),
     "annotations[0] (id 1): 'segmentation' polygons must be lists of numbers, got '2,2,10,2,10,10'"),
    ("string segmentation", set_ann(0, segmentation="abc"),
     "annotations[0] (id 1): 'segmentation' must be a list of polygons or an RLE object"),
    ("iscrowd 2", set_ann(0, iscrowd=2), "annotations[0] (id 1): 'iscrowd' must be 0 or 1"),
    ("string area", set_ann(0, area="64"), "annotations[0] (id 1): 'area' must be a number"),
    ("duplicate image id (merged silently)", set_image(1, id=1),
     "images[1] (id 1): duplicate image id 1 (also images[0]); image ids must be unique"),
    ("duplicate annotation id (scores wrong)", set_ann(1, id=1),
     "annotations[1] (id 1): duplicate annotation id 1 (also annotations[0])"),
    ("duplicate category id", set_category(1, id=1),
     "categories[1] (id 1): duplicate category id 1 (also categories[0])"),
    ("LVIS negative image_count", set_category(0, image_count=-3),
     "categories[0] (id 1): 'image_count' must be a count of images (>= 0), got -3"),
    ("LVIS infinite image_count", set_category(1, image_count=math.inf),
     "categories[1] (id 2): 'image_count' must be a count of images (>= 0), got inf"),
    ("LVIS bad frequency", set_category(1, frequency="x"), "categories[1] (id 2): 'frequency'"),
    ("LVIS neg_category_ids not a list", set_image(0, neg_category_ids=3),
     "images[0] (id 1): 'neg_category_ids' must be a list of category ids"),
    ("RLE of the wrong size", set_ann(1, segmentation=WRONG_SIZE_RLE),
     "annotations[1] (id 2): 'segmentation' is an RLE of size 10x10 but its image is 30x40 "
     "(height x width); re-encode the mask"),
    ("RLE runs not covering the image", set_ann(0, segmentation={"size": [30, 40], "counts": [5, 5]}),
     "annotations[0] (id 1): RLE 'segmentation.counts' must be runs summing to 1200 pixels"),
    ("RLE string of garbage", set_ann(0, segmentation={"size": [30, 40], "counts": "zz"}),
     "annotations[0] (id 1): RLE 'segmentation.counts' is not a compressed RLE of 1200 pixels"),
    ("RLE without size", set_ann(0, segmentation={"counts": [1200]}),
     "annotations[0] (id 1): RLE 'segmentation.size' must be [height, width], got None"),
]  # fmt: skip


@pytest.mark.parametrize("fault, change, message", SCHEMA_FAULTS, ids=[f[0] for f in SCHEMA_FAULTS])
def test_a_record_of_the_wrong_shape_is_refused_naming_file_record_and_field(
    tmp_path, fault, change, message
):
    doc = document()
    doc = change(doc) if fault == "top-level list" else (change(doc), doc)[1]
    path = write(tmp_path, doc)
    with pytest.raises(ValueError) as error:
        CocoDetectionDataset(path)
    text = str(error.value)
    assert message in text and str(path) in text and "\n" not in text, text


def test_unparseable_and_absurdly_nested_json_is_one_line(tmp_path):
    for text, message in (("{", "is not valid JSON"), ("[" * 100_000, "nests too deeply")):
        path = write(tmp_path, text)
        with pytest.raises(ValueError, match=message):
            load_annotation_file(path)
    with pytest.raises(FileNotFoundError, match=r"does not exist; set data\.train_json"):
        load_annotation_file(tmp_path / "missing.json")


def test_a_schema_error_exits_2_with_one_line_before_any_training(tmp_path, capsys):
    bad = write(tmp_path, changed(lambda d: d["annotations"][1].update(bbox="2,2,8,8")))
    out = tmp_path / "run"
    code = cli(["detect", "train", f"train.output_dir={out}", f"data.train_json={bad}",
                "data.shapeworld_val=0", "train.device=cpu", "train.num_workers=0"])  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error, error
    assert f"{bad}: annotations[1] (id 2): 'bbox' must be 4 numbers" in error
    assert not (out / "final").exists()


def test_rle_string_total_reads_compressed_runs():
    mask = np.zeros((30, 40), bool)
    mask[5:15, 20:30] = True
    assert rle_string_total(encode_rle(mask)["counts"]) == 1200
    assert rle_string_total(encode_rle(np.ones((7, 9), bool))["counts"]) == 63
    assert rle_string_total("zz") is None and rle_string_total("0\x7f") is None
    assert rle_string_total(encode_rle(mask)["counts"] + "P") is None  # a run that stops mid-number


# ----- values that cannot be trained on: dropped, counted, named ---------------------------------


def test_non_finite_boxes_and_polygons_are_dropped_counted_and_named(tmp_path, caplog):
    doc = document(images=3, annotations=[
        ann(1, 1, bbox=(math.nan, 2, 8, 8)),
        ann(2, 1, bbox=(2, 2, math.inf, 8)),
        ann(3, 2, segmentation=[[2, 2, 10, math.nan, 10, 10, 2, 10]]),  # rasterizing it exhausts memory
        ann(4, 2, segmentation=[[2, 2, 1e12, 2, 10, 10]]),  # so does a polygon reaching 1e12
        ann(5, 3, segmentation=[*square(2, 2, 10, 10), [1, math.inf, 2, 2, 3, 3]]),  # one is left
        ann(6, 3, segmentation=[]),
        ann(7, 3, segmentation=None),
        ann(8, 3, category_id=9),
    ])  # fmt: skip
    doc["annotations"][6].pop("segmentation")
    dataset = CocoDetectionDataset(write(tmp_path, doc))
    assert dict(dataset.problems) == {
        "non-finite box": 2,
        "non-finite polygon": 2,  # id 3 dropped; id 5 keeps its good polygon
        "polygon far outside the image": 1,
        "empty segmentation": 1,
        "missing segmentation": 1,
        "unknown category id": 1,
    }
    usage = dataset.usage
    assert (usage.images, usage.usable_images, usage.annotations, usage.kept, usage.dropped) == (
        3,
        1,
        8,
        1,
        7,
    )
    assert usage.first_dropped[:3] == [
        "annotation 1 (non-finite box)",
        "annotation 2 (non-finite box)",
        "annotation 3 (non-finite polygon)",
    ]
    assert dataset.records[2].instances[0].segmentation == square(2, 2, 10, 10)
    assert dataset.masks(2).shape == (1, 30, 40)
    assert "instances.json: annotation 1: bbox [nan, 2, 8, 8]" in caplog.text
    with pytest.raises(
        ValueError, match=r"7 of 8 annotations were dropped, more than 50% \(1 of 3 images usable"
    ):
        check_usable(dataset)


def test_a_claimed_size_over_max_pixels_is_skipped_before_any_mask_is_allocated(tmp_path, caplog):
    doc = document(images=3)
    doc["images"][1].update(height=60_000, width=60_000)  # 3.35 GB of mask per instance
    dataset = CocoDetectionDataset(write(tmp_path, doc))
    assert [r.image_id for r in dataset.records] == [1, 3]
    assert dataset.problems["image over max_pixels (skipped)"] == 1
    assert dataset.problems["annotation of a skipped image"] == 1
    assert dataset.usage.first_skipped == ["images[1] (id 2) 2.png"]
    assert "claims 60000x60000 = 3600000000 pixels, more than max_pixels=40000000" in caplog.text
    check_usable(dataset, probe_images=0)  # 2 of 3 annotations kept


def test_a_claimed_size_that_is_not_the_images_is_an_unreadable_image(tmp_path):
    doc = document(images=2)
    doc["images"][1].update(height=60, width=80)  # the file is 40x30
    dataset = CocoDetectionDataset(write(tmp_path, doc))
    assert dataset.load_image(0).size == (40, 30)
    with pytest.raises(
        UnreadableImageError, match=r"decodes to 40x30 but instances.json claims 80x60 .* image id 2"
    ):
        dataset.load_image(1)  # the stream skips and counts it, naming the file


def test_check_usable_refuses_a_set_with_no_usable_annotation(tmp_path):
    cases = {
        "empty annotation list": document(annotations=[]),
        "all NaN polygons": document(annotations=[ann(1, 1, segmentation=[[math.nan] * 6]),
                                                  ann(2, 2, segmentation=[[1, 1, 5, 1, math.nan, 5]])]),
        "NaN/inf boxes": document(annotations=[ann(1, 1, bbox=(math.nan,) * 4),
                                               ann(2, 2, bbox=(0, 0, math.inf, 1))]),
    }  # fmt: skip
    for name, doc in cases.items():
        dataset = CocoDetectionDataset(write(tmp_path, doc))
        with pytest.raises(ValueError, match="no image has a usable annotation") as error:
            check_usable(dataset)
        assert str(tmp_path / "instances.json") in str(error.value), name
    with pytest.raises(ValueError, match=r"annotation 1 \(non-finite polygon\), annotation 2"):
        check_usable(CocoDetectionDataset(write(tmp_path, cases["all NaN polygons"])))


def test_check_usable_probes_image_headers_for_missing_files_and_wrong_sizes(tmp_path, caplog):
    doc = document(images=4)
    for image in doc["images"]:
        image.update(height=60, width=80)  # every file is 40x30
    dataset = CocoDetectionDataset(write(tmp_path, doc))
    with pytest.raises(
        ValueError, match=r"4 of 4 probed images cannot be used \(.*1.png is 40x30 but the annotation"
    ):
        check_usable(dataset)
    doc["images"][0].update(height=30, width=40)
    doc["images"][1].update(height=30, width=40)
    doc["images"][2].update(height=30, width=40)
    check_usable(CocoDetectionDataset(write(tmp_path, doc)))  # one of four: a warning; the stream skips it
    assert "1 of 4 probed images cannot be used" in caplog.text
    missing = CocoDetectionDataset(write(tmp_path, document(images=2)), image_root=tmp_path / "elsewhere")
    with pytest.raises(
        ValueError, match=r"2 of 2 probed images cannot be used \(.*elsewhere/1.png does not exist"
    ):
        check_usable(missing)


def test_a_healthy_set_passes_check_usable(tmp_path):
    dataset = CocoDetectionDataset(write(tmp_path, document(images=3)))
    check_usable(dataset)
    assert dataset.usage.summary() == "3 of 3 images usable, 3 of 3 annotations kept, 0 dropped"


# ----- evaluation and the federated loss -----------------------------------------------------------


def test_evaluation_ground_truth_leaves_out_what_would_crash_the_evaluator(tmp_path, caplog):
    doc = document(images=2, annotations=[
        ann(1, 1), ann(2, 1, bbox=(1, 1, math.nan, 2)),
        ann(3, 2, segmentation=[[2, 2, 10, math.nan, 10, 10]]),  # the mask rasterizer would exhaust memory
        ann(4, 2, segmentation=[[2, 2, 10, 2, 10, 10], [1, 2, 3]]),  # trimmed to its good polygon
    ])  # fmt: skip
    gt = evaluation_ground_truth(write(tmp_path, doc))
    assert [a["id"] for a in gt["annotations"]] == [1, 4]
    assert gt["annotations"][1]["segmentation"] == [[2, 2, 10, 2, 10, 10]]
    assert "2 annotations left out of evaluation" in caplog.text and "[2, 3]" in caplog.text


def test_fed_loss_refuses_bad_counts_and_copes_with_no_negatives():
    with pytest.raises(ValueError, match=r"image_count of class 1 is -1\.0"):
        fed_loss_weights([3, -1])
    with pytest.raises(ValueError, match="image_count of class 0 is inf"):
        fed_loss_weights([math.inf, 1])
    # one class, or no other class with images: no negative to draw, the ground truth alone
    assert fed_loss_classes(torch.tensor([0]), 1, torch.tensor([5.0])).tolist() == [0]
    assert fed_loss_classes(torch.tensor([0]), 3, torch.tensor([5.0, 0, 0])).tolist() == [0]


# ----- speed -----------------------------------------------------------------------------------------


def test_the_shapeworld_export_passes_unchanged(tmp_path):
    from flyeva.data.export import export_split
    from flyeva.data.synthetic import ShapeWorld

    out = export_split(ShapeWorld(image_size=48, seed=5), tmp_path, 6, formats=("coco",))
    dataset = CocoDetectionDataset(out["coco"])
    check_usable(dataset)
    assert dataset.usage.dropped == 0 and not dataset.problems
    gt = json.loads(out["coco"].read_text())
    assert evaluation_ground_truth(out["coco"]) == copy.deepcopy(gt)
