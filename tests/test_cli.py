"""The command line is a contract (DESIGN.md section 6): every subcommand exists and has --help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.cli_parser import build_parser

SUBCOMMANDS = [
    ["run"], ["prepare", "shapes"], ["prepare", "coco"], ["prepare", "vqav2"], ["prepare", "gqa"],
    ["prepare", "imagefolder"], ["prepare", "conversations"], ["score", "caption"], ["score", "vqa"], ["score", "gqa"], ["merge"], ["demo"],
]


def test_top_level_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("run", "prepare", "score", "merge", "demo"):
        assert f"    {name}" in out.stdout


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    assert "usage: structlora " + " ".join(argv) in capsys.readouterr().out


def test_prepare_lists_datasets_and_score_lists_tasks():
    parser = build_parser()
    text = parser.format_help()
    assert "prepare" in text and "score" in text


def test_config_error_is_one_line_without_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  max_step: 3\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'train.max_step'" in lines[0] and str(cfg) in lines[0]


def test_merge_refuses_to_overwrite_an_existing_folder(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "out").mkdir()
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    assert "exists: choose another --out, or pass --overwrite" in capsys.readouterr().err


def test_fp16_on_cpu_is_refused_before_any_stage_runs(tmp_path):
    run = tmp_path / "run"
    config = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--run-dir", str(run),
                           "--set", "train.precision=fp16"], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.precision=fp16 needs a GPU" in lines[0]
    assert not (run / "prepare").exists(), "a stage ran before the refusal"


def test_every_prepare_command_can_write_the_layout_that_eval_data_reads(tmp_path, capsys):
    """`--data` (structlora eval) and data.source: shards read {task}/{split}/: `--split` writes it."""
    from test_shards_fixtures import make_coco, make_gqa, make_imagefolder, make_vqav2

    from pipeline.stages.evaluate import load_split

    out = tmp_path / "shards"
    captions, images = make_coco(tmp_path / "coco")
    assert main(["prepare", "coco", "--captions", str(captions), "--images", str(images), "--out", str(out),
                 "--split", "test", "--workers", "1"]) == 0
    questions, annotations, vqa_images = make_vqav2(tmp_path / "vqa")
    assert main(["prepare", "vqav2", "--questions", str(questions), "--annotations", str(annotations), "--images",
                 str(vqa_images), "--out", str(out), "--split", "test", "--workers", "1"]) == 0
    gqa_questions, gqa_images = make_gqa(tmp_path / "gqa")
    assert main(["prepare", "gqa", "--questions", str(gqa_questions), "--images", str(gqa_images), "--out", str(out),
                 "--split", "test", "--workers", "1"]) == 0
    root = make_imagefolder(tmp_path / "folder")
    assert main(["prepare", "imagefolder", "--root", str(root), "--out", str(out), "--split", "test",
                 "--workers", "1"]) == 0
    for task in ("caption", "vqav2", "gqa", "classification"):
        examples, account = load_split(out, task, "test")
        assert examples and account["scored"] == len(examples)
    world = tmp_path / "world"
    assert main(["prepare", "shapes", "--out", str(world), "--images", "40", "--size", "32",
                 "--shards", str(tmp_path / "shapes_shards"), "--as", "conversations"]) == 0
    files = sorted(p.name for p in (world / "conversation_files").iterdir())
    assert files == ["shapes_test.json", "shapes_train.json", "shapes_val.json"]
    assert main(["prepare", "conversations", "--train", str(world / "conversation_files" / "shapes_train.json"),
                 "--val", str(world / "conversation_files" / "shapes_val.json"), "--test",
                 str(world / "conversation_files" / "shapes_test.json"), "--out", str(out), "--workers", "1"]) == 0
    examples, account = load_split(out, "conversations", "test")
    assert examples and all(len(e["images"]) == 1 for e in examples) and not account["lost_anything"]
    for task in ("caption", "vqav2", "gqa", "classification"):
        assert load_split(tmp_path / "shapes_shards", task, "test")[0]
    capsys.readouterr()


@pytest.mark.parametrize("in_container", [False, True], ids=["host", "container"])
def test_a_run_folder_the_user_cannot_write_is_one_clear_line(tmp_path, monkeypatch, capsys, in_container):
    # What a non-root container user meets on a host volume owned by another uid (issue 43). Root writes
    # anywhere, so the refusal is simulated at the point the run folder is created.
    blocked = tmp_path / "runs"
    blocked.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.is_relative_to(blocked):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    if in_container:
        monkeypatch.setenv("STRUCTLORA_CONTAINER", "1")
    else:
        monkeypatch.delenv("STRUCTLORA_CONTAINER", raising=False)
    root = Path(__file__).resolve().parents[1]
    code = main(["run", str(root / "configs" / "smoke.yaml"), "--run-dir", str(blocked / "smoke")])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"error: permission denied: {blocked / 'smoke'} (running as uid {os.getuid()}")
    assert f"{blocked} belongs to uid {os.getuid()}" in line
    assert ("docker run --user $(id -u):$(id -g)" in line) == in_container


def test_other_os_errors_still_raise(monkeypatch):
    import argparse

    def boom(args):
        raise FileNotFoundError(2, "No such file or directory", "/nowhere")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, argv=None: argparse.Namespace(handler=boom))
    with pytest.raises(FileNotFoundError):
        main(["run", "x.yaml"])
