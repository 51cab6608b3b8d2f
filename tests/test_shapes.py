"""The synthetic shapes world: official schemas, determinism, vocabulary, noise, layout."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from data.errors import DataError
from data.shapes import SPLITS, SUMMARY_NAME, split_counts, world_vocabulary, write_shapes_world
from data.shapes_text import tokens

NUM_IMAGES = 300


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "shapes"
    write_shapes_world(out, seed=3, num_images=NUM_IMAGES, size=64)
    return out


def _load(world: Path, name: str):
    return json.loads((world / "annotations" / name).read_text())


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def test_split_counts_sum_and_minimum():
    counts = split_counts(2000)
    assert counts == {"base": 400, "train": 1120, "val": 240, "test": 240}
    for n in (4, 5, 7, 13, 301):
        c = split_counts(n)
        assert sum(c.values()) == n and min(c.values()) >= 1
    with pytest.raises(DataError, match="at least 4"):
        split_counts(3)


def test_summary_counts_match_files(world):
    summary = json.loads((world / SUMMARY_NAME).read_text())
    assert sum(s["images"] for s in summary["splits"].values()) == NUM_IMAGES
    for split in SPLITS:
        counts, files = summary["splits"][split], summary["files"][split]
        assert len(list((world / files["images"]).iterdir())) == counts["images"]
        assert len(_load(world, f"captions_{split}.json")["annotations"]) == counts["captions"] == 5 * counts["images"]
        assert len(_load(world, f"gqa_{split}_questions.json")) == counts["gqa_questions"]
        assert len(list((world / files["classification"]).rglob("*.png"))) == counts["classification_images"]
    assert str(world) not in (world / SUMMARY_NAME).read_text(), "summary.json must not hold absolute paths"


def test_coco_captions_schema_and_images_exist(world):
    seen_ids = set()
    for split in SPLITS:
        doc = _load(world, f"captions_{split}.json")
        assert set(doc) == {"info", "licenses", "images", "annotations"}
        for image in doc["images"]:
            assert {"id", "file_name", "height", "width"} <= set(image)
            assert _is_int(image["id"]) and image["height"] == image["width"] == 64
            assert (world / "images" / split / image["file_name"]).is_file()
            assert image["id"] not in seen_ids, "image ids must be unique across splits"
            seen_ids.add(image["id"])
        ids = {image["id"] for image in doc["images"]}
        per_image: dict[int, list[str]] = {}
        for ann in doc["annotations"]:
            assert set(ann) == {"id", "image_id", "caption"} and _is_int(ann["id"]) and isinstance(ann["caption"], str)
            assert ann["image_id"] in ids
            per_image.setdefault(ann["image_id"], []).append(ann["caption"])
        assert set(per_image) == ids
        assert all(len(set(c)) == 5 for c in per_image.values()), "5 different captions per image"
        assert len({a["id"] for a in doc["annotations"]}) == len(doc["annotations"])


def test_images_decode_at_requested_size(world):
    for split in SPLITS:
        path = next((world / "images" / split).iterdir())
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)


def test_vqav2_schema(world):
    for split in SPLITS:
        questions = _load(world, f"vqav2_{split}_questions.json")
        annotations = _load(world, f"vqav2_{split}_annotations.json")
        assert {"info", "task_type", "data_type", "data_subtype", "license", "questions"} <= set(questions)
        assert {"info", "data_type", "data_subtype", "license", "annotations"} <= set(annotations)
        image_ids = {i["id"] for i in _load(world, f"captions_{split}.json")["images"]}
        qids = []
        for q in questions["questions"]:
            assert set(q) == {"image_id", "question", "question_id"} and q["image_id"] in image_ids
            assert _is_int(q["question_id"]) and q["question"].endswith("?")
            qids.append(q["question_id"])
        assert len(set(qids)) == len(qids)
        assert [a["question_id"] for a in annotations["annotations"]] == qids
        for ann in annotations["annotations"]:
            assert {"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer",
                    "answers"} <= set(ann)
            assert ann["answer_type"] in {"yes/no", "number", "other"}
            assert len(ann["answers"]) == 10
            assert [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
            for a in ann["answers"]:
                assert set(a) == {"answer", "answer_confidence", "answer_id"}
                assert a["answer_confidence"] in {"yes", "maybe", "no"}


def test_vqav2_noise_present_but_majority_correct(world):
    """Answers are checked against the scene graphs (independent ground truth)."""
    noisy = checked = total = 0
    for split in SPLITS:
        graphs = _load(world, f"gqa_{split}_scene_graphs.json")
        questions = {q["question_id"]: q for q in _load(world, f"vqav2_{split}_questions.json")["questions"]}
        for ann in _load(world, f"vqav2_{split}_annotations.json")["annotations"]:
            total += 1
            answers = [a["answer"] for a in ann["answers"]]
            mca = ann["multiple_choice_answer"]
            assert answers.count(mca) >= 8 and answers.count(mca) == max(answers.count(a) for a in answers)
            noisy += len(set(answers)) > 1
            objects = list(graphs[str(ann["image_id"])]["objects"].values())
            question = questions[ann["question_id"]]["question"]
            if re.fullmatch(r"How many (shapes are there|objects are in the image)\?", question):
                assert mca == str(len(objects)), question
                checked += 1
            match = re.fullmatch(r"What (?:color is|is the color of) the (\w+)\?", question)
            if match and match.group(1) in {o["name"] for o in objects}:
                (obj,) = [o for o in objects if o["name"] == match.group(1)]
                assert mca == obj["attributes"][0], question
                checked += 1
            match = re.fullmatch(r"Is there an? (\w+) (\w+)\?", question)
            if match and ann["answer_type"] == "yes/no":
                present = any(o["attributes"][0] == match.group(1) and o["name"] == match.group(2) for o in objects)
                assert mca == ("yes" if present else "no"), question
                checked += 1
    assert checked > 50
    assert 0.1 * total < noisy < 0.6 * total


def test_gqa_schema_and_yes_no_consistency(world):
    structural = set()
    for split in SPLITS:
        image_ids = {str(i["id"]) for i in _load(world, f"captions_{split}.json")["images"]}
        questions = _load(world, f"gqa_{split}_questions.json")
        assert isinstance(questions, dict) and questions
        for qid, q in questions.items():
            assert isinstance(qid, str)
            assert {"imageId", "question", "answer", "fullAnswer", "types", "isBalanced"} <= set(q)
            assert q["imageId"] in image_ids and isinstance(q["isBalanced"], bool)
            assert set(q["types"]) == {"structural", "semantic", "detailed"}
            assert q["answer"] == q["answer"].lower() and not q["answer"].endswith(".")
            if q["answer"] in {"yes", "no"}:
                assert q["fullAnswer"].lower().startswith(q["answer"])
            structural.add(q["types"]["structural"])
        assert any(q["isBalanced"] for q in questions.values())
    assert structural == {"query", "verify", "logical", "compare", "choose"}


def test_base_split_is_single_objects_with_shape_and_colour_captions(world):
    graphs = _load(world, "gqa_base_scene_graphs.json")
    assert all(len(g["objects"]) == 1 for g in graphs.values())
    words = {w for a in _load(world, "captions_base.json")["annotations"] for w in tokens(a["caption"])}
    assert not words & {"small", "large", "left", "right", "top", "bottom", "center", "two", "three"}
    train = _load(world, "gqa_train_scene_graphs.json")
    assert {len(g["objects"]) for g in train.values()} == {1, 2, 3, 4}


def test_classification_view_matches_images_and_labels(world):
    for split in SPLITS:
        graphs = _load(world, f"gqa_{split}_scene_graphs.json")
        for path in (world / "classification" / split).rglob("*.png"):
            assert path.read_bytes() == (world / "images" / split / path.name).read_bytes()
            objects = list(graphs[str(int(path.stem))]["objects"].values())
            large = [o for o in objects if o["attributes"][1] == "large"]
            label = objects[0] if len(objects) == 1 else large[0]
            assert len(objects) == 1 or len(large) == 1
            assert path.parent.name == label["name"]


def test_every_text_is_in_the_vocabulary(world):
    vocabulary = world_vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    texts = []
    for split in SPLITS:
        texts += [a["caption"] for a in _load(world, f"captions_{split}.json")["annotations"]]
        texts += [q["question"] for q in _load(world, f"vqav2_{split}_questions.json")["questions"]]
        for ann in _load(world, f"vqav2_{split}_annotations.json")["annotations"]:
            texts += [a["answer"] for a in ann["answers"]] + [ann["multiple_choice_answer"]]
        for q in _load(world, f"gqa_{split}_questions.json").values():
            texts += [q["question"], q["answer"], q["fullAnswer"]]
    used = {t for text in texts for t in tokens(text)}
    assert used - set(vocabulary) == set()
    assert len(used) > 0.8 * len(vocabulary), "the vocabulary should not be padded with unused words"


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    again = tmp_path / "again"
    write_shapes_world(again, seed=3, num_images=NUM_IMAGES, size=64)
    assert _hashes(again) == _hashes(world)
    other = tmp_path / "other"
    write_shapes_world(other, seed=4, num_images=NUM_IMAGES, size=64)
    a, b = _hashes(world), _hashes(other)
    assert a["annotations/captions_train.json"] != b["annotations/captions_train.json"]
    shared_images = [k for k in a if k.startswith("images/") and k in b]
    assert sum(a[k] != b[k] for k in shared_images) > 0.9 * len(shared_images)


def test_jpeg_and_size_options_are_deterministic(tmp_path):
    summaries = [write_shapes_world(tmp_path / name, seed=1, num_images=12, size=96, image_format="jpg")
                 for name in ("a", "b")]
    assert summaries[0]["splits"] == summaries[1]["splits"]
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    image = next((tmp_path / "a" / "images" / "train").glob("*.jpg"))
    with Image.open(image) as im:
        assert im.format == "JPEG" and im.size == (96, 96)
    doc = json.loads((tmp_path / "a" / "annotations" / "captions_train.json").read_text())
    assert all(i["file_name"].endswith(".jpg") for i in doc["images"])


def test_overwrite_policy(tmp_path):
    out = tmp_path / "w"
    write_shapes_world(out, seed=0, num_images=8, size=32)
    write_shapes_world(out, seed=1, num_images=8, size=32)  # our own world: replaced
    assert json.loads((out / SUMMARY_NAME).read_text())["seed"] == 1
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to overwrite"):
        write_shapes_world(foreign, seed=0, num_images=8, size=32)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no staging directory left"
    with pytest.raises(DataError, match="image format"):
        write_shapes_world(tmp_path / "x", seed=0, num_images=8, size=32, image_format="gif")
