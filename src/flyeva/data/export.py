"""Write a ShapeWorld split in the on-disk formats that flyeva's readers take.

`export_split(world, out_dir, num_samples)` writes samples `start_index .. start_index + n - 1`:

- imagefolder/NN_<class>/<index>.png   classification; every class folder exists (even empty), and
                                        the zero-padded label prefix makes sorted order = label order
- wds/shard-000000.tar ...             webdataset shards, members <index>.jpg / .txt (caption) / .cls
- coco/instances.json + coco/images/   COCO instances with compressed-RLE segmentations, ids from 1
- semantic/images, semantic/labels     PNG pairs; labels are uint8 (0 = background, c = category)
- video/clips/<index>.mp4 + video/list.csv   H.264 clips, `path,label` lines and video/classes.txt

Image ids in COCO are index + 1 (COCO ids start at 1); all other names use the 8-digit index.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import webdataset
from faster_coco_eval.core import mask as mask_util
from PIL import Image

from flyeva.data.synthetic import ShapeWorld

FORMATS = ("imagefolder", "wds", "coco", "semantic", "video")
JPEG_QUALITY = 95


def class_folder_name(label: int, class_name: str) -> str:
    """ "07_triangle_top_right": the label prefix keeps ImageFolder's sorted order equal to label order."""
    return f"{label:02d}_" + re.sub(r"[^a-z0-9]+", "_", class_name.lower()).strip("_")


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a bool [H, W] mask, as pycocotools encodes it (JSON-ready: counts a str)."""
    rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(side) for side in rle["size"]], "counts": rle["counts"].decode()}


def _write_imagefolder(world: ShapeWorld, root: Path, names: dict[int, str]) -> Path:
    folder = root / "imagefolder"
    drawn = {world.label(index) for index in names}
    if len(drawn) < world.num_classes:  # an empty class folder is refused by every ImageFolder reader
        missing = [name for k, name in enumerate(world.class_names) if k not in drawn]
        raise ValueError(
            f"{len(names)} images leave {len(missing)} of the {world.num_classes} ShapeWorld classes without "
            f"an image (e.g. {missing[0]}); export more (--num {8 * world.num_classes} gives every class "
            "several), or leave out the imagefolder format (--formats)"
        )
    class_dirs = [folder / class_folder_name(k, name) for k, name in enumerate(world.class_names)]
    for class_dir in class_dirs:
        class_dir.mkdir(parents=True, exist_ok=True)
    for index, name in names.items():
        world.render(index).save(class_dirs[world.label(index)] / f"{name}.png")
    return folder


def _write_wds(world: ShapeWorld, root: Path, names: dict[int, str], shard_size: int) -> Path:
    folder = root / "wds"
    folder.mkdir(parents=True, exist_ok=True)
    indices = list(names)
    for shard in range(math.ceil(len(indices) / shard_size)):
        # A fixed mtime makes shards byte-identical across runs.
        with webdataset.TarWriter(str(folder / f"shard-{shard:06d}.tar"), mtime=0) as sink:
            for index in indices[shard * shard_size : (shard + 1) * shard_size]:
                scene, jpg = world.sample(index), io.BytesIO()
                scene.image.save(jpg, format="JPEG", quality=JPEG_QUALITY)
                sink.write(
                    {"__key__": names[index], "jpg": jpg.getvalue(), "txt": scene.caption, "cls": scene.label}
                )
    return folder


def _coco_annotations(scene: Any, image_id: int, first_id: int) -> list[dict[str, Any]]:
    annotations = []
    for box, mask, category in zip(scene.boxes, scene.masks, scene.categories):
        x0, y0, x1, y1 = (float(v) for v in box)
        annotations.append(
            {
                "id": first_id + len(annotations),
                "image_id": image_id,
                "category_id": int(category),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float(mask.sum()),
                "iscrowd": 0,
                "segmentation": encode_rle(mask),
            }
        )
    return annotations


def _write_scenes(
    world: ShapeWorld, root: Path, names: dict[int, str], coco: bool, semantic: bool
) -> dict[str, Path]:
    """COCO instances (images + instances.json) and/or semantic maps, from one pass over the scenes."""
    images, annotations = [], []
    coco_dir, semantic_dir = root / "coco", root / "semantic"
    for folder in ([coco_dir / "images"] if coco else []) + (
        [semantic_dir / "images", semantic_dir / "labels"] if semantic else []
    ):
        folder.mkdir(parents=True, exist_ok=True)
    for index, name in names.items():
        scene, file_name = world.sample(index), f"{name}.png"
        if semantic:
            scene.image.save(semantic_dir / "images" / file_name)
            # Masks are exact, so no pixel needs 255 (ignore); 0 is background.
            Image.fromarray(scene.semantic).save(semantic_dir / "labels" / file_name)
        if coco:
            scene.image.save(coco_dir / "images" / file_name)
            side = world.image_size
            images.append({"id": index + 1, "file_name": file_name, "width": side, "height": side})
            annotations += _coco_annotations(scene, index + 1, len(annotations) + 1)
    outputs: dict[str, Path] = {}
    if coco:
        outputs["coco"] = coco_dir / "instances.json"
        document = {
            "info": {"description": f"ShapeWorld {world}", "version": "1.0"},
            "images": images,
            "annotations": annotations,
            "categories": world.categories,
        }
        outputs["coco"].write_text(json.dumps(document))
    if semantic:
        outputs["semantic"] = semantic_dir
    return outputs


def write_video_split(world: ShapeWorld, folder: Path, names: dict[int, str]) -> Path:
    """Clips `names` of `world` as H.264 files under `folder`/clips, with `list.csv` (path,label) and
    `classes.txt`, the files `flyeva video` and `clip zeroshot` read. The list is written last, so a
    folder with a list holds every clip. Returns the list file."""
    from flyeva.data.video.decode import write_video

    lines = ["path,label"]
    for index, name in names.items():
        clip = world.clip(index)
        write_video(folder / "clips" / f"{name}.mp4", [np.asarray(frame) for frame in clip.frames])
        lines.append(f"clips/{name}.mp4,{clip.action}")
    (folder / "classes.txt").write_text("\n".join(world.action_names) + "\n")
    list_file = folder / "list.csv"
    tmp = list_file.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(list_file)
    return list_file


def export_split(
    world: ShapeWorld,
    out_dir: str | Path,
    num_samples: int,
    formats: tuple[str, ...] | list[str] = FORMATS,
    start_index: int = 0,
    shard_size: int = 256,
) -> dict[str, Path]:
    """Write samples [start_index, start_index + num_samples) of `world` under `out_dir`.

    Returns, per format, the path its reader takes: the ImageFolder root, the shard folder, the
    COCO json (images next to it), the semantic folder, and the video list file.
    """
    unknown = [name for name in formats if name not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    if num_samples <= 0 or start_index < 0 or shard_size <= 0:
        raise ValueError(
            f"export_split needs num_samples > 0, start_index >= 0 and shard_size > 0, "
            f"got {num_samples}, {start_index}, {shard_size}"
        )
    root = Path(out_dir)
    names = {index: f"{index:08d}" for index in range(start_index, start_index + num_samples)}
    outputs: dict[str, Path] = {}
    if "imagefolder" in formats:
        outputs["imagefolder"] = _write_imagefolder(world, root, names)
    if "wds" in formats:
        outputs["wds"] = _write_wds(world, root, names, shard_size)
    if "coco" in formats or "semantic" in formats:
        outputs.update(_write_scenes(world, root, names, "coco" in formats, "semantic" in formats))
    if "video" in formats:
        outputs["video"] = write_video_split(world, root / "video", names)
    return outputs
