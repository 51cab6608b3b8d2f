"""Hand-written official-format inputs with the awkward parts, shared by the shard and stream tests.

(No tests here; the name keeps it inside the data package's test files.)
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_images(folder: Path) -> dict[int, str]:
    """Images 1-6 in COCO 2014 naming, in awkward modes; image 6 is a truncated JPEG.
    Returns image id -> file name (image 7 is referenced by the annotations but missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        1: ("JPEG", Image.new("RGB", (40, 30), (200, 30, 30))),
        2: ("PNG", Image.new("L", (32, 32), 90)),
        3: ("PNG", Image.new("RGBA", (24, 24), (0, 120, 255, 128))),
        4: ("JPEG", Image.new("CMYK", (20, 20), (0, 255, 255, 0))),
        5: ("PNG", Image.new("RGB", (16, 16), (10, 200, 10))),  # a PNG named .jpg: stored as .png
        6: ("JPEG", Image.effect_noise((64, 64), 60).convert("RGB")),
    }
    names = {}
    for image_id, (fmt, image) in files.items():
        name = f"COCO_val2014_{image_id:012d}.jpg"
        data = _encode(image, fmt)
        if image_id == 6:
            data = data[: len(data) // 2]  # truncated: the header survives, the pixels do not
        (folder / name).write_bytes(data)
        names[image_id] = name
    names[7] = f"COCO_val2014_{7:012d}.jpg"
    return names


def make_coco(root: Path) -> tuple[Path, Path]:
    images = root / "val2014"
    names = make_images(images)
    doc = {
        "info": {}, "licenses": [],
        "images": [{"id": i, "file_name": n, "height": 1, "width": 1} for i, n in names.items()]
        + [{"id": 8}],  # images[7]: no file_name
        "annotations": [{"id": 100 + k, "image_id": i, "caption": f"caption {k} of image {i}"}
                        for i in names for k in range(1 + i % 3)]
        + [{"id": 900, "image_id": 1}]  # no caption
        + [{"id": 901, "image_id": 42, "caption": "for an image that does not exist"}],
    }
    path = root / "captions_val2014.json"
    path.write_text(json.dumps(doc))
    return path, images


def make_vqav2(root: Path) -> tuple[Path, Path, Path]:
    images = root / "val2014"
    make_images(images)
    questions, annotations = [], []
    for image_id in range(1, 8):
        for k in range(2):
            qid = image_id * 1000 + k
            questions.append({"image_id": image_id, "question": f"What is {k}?", "question_id": qid})
            answers = ["yes"] * 9 + ["no"]
            annotations.append({"question_id": qid, "image_id": image_id, "question_type": "what is",
                                "answer_type": "yes/no", "multiple_choice_answer": "yes",
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                            for j, a in enumerate(answers)]})
    questions.append({"image_id": 1, "question_id": 1999})  # no "question"
    questions.append({"image_id": 1, "question": "Orphan?", "question_id": 1998})  # no annotation
    head = {"info": {}, "license": {}, "data_type": "mscoco", "data_subtype": "val2014"}
    q_path, a_path = root / "v2_OpenEnded_mscoco_val2014_questions.json", root / "v2_mscoco_val2014_annotations.json"
    q_path.write_text(json.dumps({**head, "task_type": "Open-Ended", "questions": questions}))
    a_path.write_text(json.dumps({**head, "annotations": annotations}))
    return q_path, a_path, images


def make_gqa(root: Path) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    for name in ("2354786", "2368326"):
        Image.new("RGB", (30, 20), (1, 2, 3)).save(images / f"{name}.jpg")
    questions = {
        "201307251": {"imageId": "2354786", "question": "Is the sky dark?", "answer": "yes",
                      "fullAnswer": "Yes, the sky is dark.", "isBalanced": True,
                      "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
        "201640614": {"imageId": "2354786", "question": "Who is wearing the shirt?", "answer": "girl",
                      "fullAnswer": "The girl is wearing a shirt.", "isBalanced": False,
                      "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}},
        "202223768": {"imageId": "2368326", "question": "Is it an outdoors scene?"},  # no answer
        "20968379": {"imageId": "9999999", "question": "Where?", "answer": "left"},  # missing image
    }
    path = root / "testdev_balanced_questions.json"
    path.write_text(json.dumps(questions))
    return path, images


def make_imagefolder(root: Path) -> Path:
    for cls, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (12, 12), colour).save(root / cls / f"{k}.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root
