"""Write a ShapeWorld split in the on-disk formats that flyeva's readers take.

`export_split(world, out_dir, num_samples)` writes samples `start_index .. start_index + n - 1`:

- imagefolder/NN_<class>/<index>.png   classification; every class folder exists (even empty), and
                                        the zero-padded label prefix makes sorted order = label order
- wds/shard-000000.tar ...             webdataset shards, members <index>.jpg / .txt (caption) / .cls
- coco/instances.json + coco/images/   COCO instances with compressed-RLE segmentations, ids from 1
- semantic/images, semantic/labels     PNG pairs; labels are uint8 (0 = background, c = category)
- video/<index>/frame_XX.png + video/list.txt   one clip folder per sample, "folder action" lines

Image ids in COCO are index + 1 (COCO ids start at 1); all other names use the 8-digit index.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import webdataset
from PIL import Image

from flyeva.data.synthetic import ShapeWorld

FORMATS = ("imagefolder", "wds", "coco", "semantic", "video")
JPEG_QUALITY = 95


def class_folder_name(label: int, class_name: str) -> str:
    """ "07_triangle_top_right": the label prefix keeps ImageFolder's sorted order equal to label order."""
    return f"{label:02d}_" + re.sub(r"[^a-z0-9]+", "_", class_name.lower()).strip("_")


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a bool [H, W] mask (column-major runs, starting with background)."""
    height, width = mask.shape
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:  # COCO runs always start with a (possibly empty) background run
        runs = [0, *runs]
    # Same string coding as pycocotools' rleToString: deltas against the run two back, 5 bits per char.
    chars = []
    for i, run in enumerate(runs):
        value = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            char = value & 0x1F
            value >>= 5
            more = value != -1 if char & 0x10 else value != 0
            if more:
                char |= 0x20
            chars.append(chr(char + 48))
    return {"size": [height, width], "counts": "".join(chars)}


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


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
    indices = range(start_index, start_index + num_samples)
    names = {index: f"{index:08d}" for index in indices}
    outputs: dict[str, Path] = {}

    if "imagefolder" in formats:
        outputs["imagefolder"] = folder = root / "imagefolder"
        class_dirs = [folder / class_folder_name(k, name) for k, name in enumerate(world.class_names)]
        for class_dir in class_dirs:
            class_dir.mkdir(parents=True, exist_ok=True)
        for index in indices:
            world.render(index).save(class_dirs[world.label(index)] / f"{names[index]}.png")

    if "wds" in formats:
        outputs["wds"] = folder = root / "wds"
        folder.mkdir(parents=True, exist_ok=True)
        for shard in range(math.ceil(num_samples / shard_size)):
            chunk = indices[shard * shard_size : (shard + 1) * shard_size]
            # A fixed mtime makes shards byte-identical across runs.
            with webdataset.TarWriter(str(folder / f"shard-{shard:06d}.tar"), mtime=0) as sink:
                for index in chunk:
                    scene = world.sample(index)
                    sink.write(
                        {
                            "__key__": names[index],
                            "jpg": _jpeg_bytes(scene.image),
                            "txt": scene.caption,
                            "cls": scene.label,
                        }
                    )

    if "coco" in formats or "semantic" in formats:
        images, annotations = [], []
        coco_dir, semantic_dir = root / "coco", root / "semantic"
        if "coco" in formats:
            (coco_dir / "images").mkdir(parents=True, exist_ok=True)
        if "semantic" in formats:
            (semantic_dir / "images").mkdir(parents=True, exist_ok=True)
            (semantic_dir / "labels").mkdir(parents=True, exist_ok=True)
        for index in indices:
            scene = world.sample(index)
            file_name = f"{names[index]}.png"
            if "semantic" in formats:
                scene.image.save(semantic_dir / "images" / file_name)
                # Masks are exact, so no pixel needs 255 (ignore); 0 is background.
                Image.fromarray(scene.semantic).save(semantic_dir / "labels" / file_name)
            if "coco" not in formats:
                continue
            scene.image.save(coco_dir / "images" / file_name)
            image_id = index + 1
            side = world.image_size
            images.append({"id": image_id, "file_name": file_name, "width": side, "height": side})
            for box, mask, category in zip(scene.boxes, scene.masks, scene.categories):
                x0, y0, x1, y1 = (float(v) for v in box)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(category),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": float(mask.sum()),
                        "iscrowd": 0,
                        "segmentation": encode_rle(mask),
                    }
                )
        if "coco" in formats:
            outputs["coco"] = coco_dir / "instances.json"
            document = {
                "info": {"description": f"ShapeWorld {world}", "version": "1.0"},
                "images": images,
                "annotations": annotations,
                "categories": world.categories,
            }
            outputs["coco"].write_text(json.dumps(document))
        if "semantic" in formats:
            outputs["semantic"] = semantic_dir

    if "video" in formats:
        folder = root / "video"
        lines = []
        for index in indices:
            clip = world.clip(index)
            clip_dir = folder / names[index]
            clip_dir.mkdir(parents=True, exist_ok=True)
            for step, frame in enumerate(clip.frames):
                frame.save(clip_dir / f"frame_{step:02d}.png")
            lines.append(f"{names[index]} {clip.action}")
        outputs["video"] = folder / "list.txt"
        outputs["video"].write_text("\n".join(lines) + "\n")
    return outputs
