"""Caption metrics where pycocoevalcap's package folder is read-only to the running user (issue 43).

pycocoevalcap's PTBTokenizer writes a temporary file into its own package folder; in a container image
run as a non-root user (or any system-wide / admin-owned install) that is a PermissionError. The scorer
must give the same scores as pycocoevalcap's own tokenizer there, byte for byte.

Two ways to make the folder read-only, each skipped with its reason where it cannot run:
- ``non-root``: a read-only copy of the package (directories 0555, files 0444) first on PYTHONPATH, the
  scorer run by a non-root user (``nobody`` when the tests run as root, else the test user itself);
- ``read-only-bind``: as root, the installed package folder bind-mounted read-only in a private mount
  namespace (``unshare --mount``); root ignores file modes but not a read-only mount.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from eval.caption_metrics import METRICS, ptb_tokenize

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs a Java runtime")

ROOT = Path(__file__).resolve().parents[1]

REFERENCES = {
    1: ["A red square on the left.", "a red square next to a blue circle", "The red square is left of the circle."],
    2: ["two green triangles", "Two green triangles, side by side.", "a pair of green triangles"],
    3: ["A small yellow star.", "a yellow star in the middle", "one small star, yellow"],
    4: ["a blue circle above a red square", "Blue circle over a red square."],
}
PREDICTIONS = {1: "a red square left of a blue circle.", 2: "Two green triangles.", 3: "a big blue star", 4: "a circle"}

# score_captions(REFERENCES, PREDICTIONS) as computed before issue 43 (pycocoevalcap's PTBTokenizer writing
# into its package folder, run as root), recorded with repr().
TODAY = {
    "ROUGE_L": 0.6634933774834437, "CIDEr": 2.0260548991629643, "Bleu_1": 0.6973573790192801,
    "Bleu_2": 0.5447679834223322, "Bleu_3": 0.4276006137633551, "Bleu_4": 5.664925373402756e-05,
    "METEOR": 0.2966943202977266,
}

# Captions that exercise the tokenizer: punctuation it drops or keeps, brackets, quotes, contractions,
# abbreviations, numbers, non-ASCII, empty and blank captions, a caption with inner line breaks.
HELD_OUT = {
    "a": ["A man's hat (red) -- on a table...", "\"Two\" dogs; one cat: 3 birds!", "It's U.S. made, isn't it?"],
    "b": ["", "   ", "a café with naïve art — 50% off & more", "e-mail: x@y.com / {braces} [brackets]"],
    "c": ["line one\nline two", "tabs\there", "`back` 'single' ``double'' ?! , ."],
    "d": [],
}


def _package_dir() -> Path:
    from pycocoevalcap.tokenizer import ptbtokenizer  # pycocoevalcap is a namespace package: no __file__

    return Path(ptbtokenizer.__file__).resolve().parents[1]


def _writable(folder: Path) -> bool:
    """Can this process create a file in `folder` (a real try: root passes os.access on any mode)?"""
    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _reference_scores() -> tuple[dict, dict]:
    """What COCOEvalCap.evaluate computes: pycocoevalcap's PTBTokenizer (twice), then each scorer.

    METEOR is left out (a second JVM with a 2 GB heap, ~8 s): its code is pycocoevalcap's, unchanged, on the
    tokens compared here; the read-only run's METEOR is checked against TODAY.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in PREDICTIONS.items()})
    corpus: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {str(k): {} for k in gts}
    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        corpus[f"Bleu_{n + 1}"] = bleu[n]
        for k, v in zip(gts, bleu_per[n]):
            per_image[str(k)][f"Bleu_{n + 1}"] = v
    for name, scorer in (("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        value, values = scorer.compute_score(gts, res)
        corpus[name] = float(value)
        for k, v in zip(gts, values):
            per_image[str(k)][name] = float(v)
    return corpus, per_image


@pytest.fixture(scope="module")
def reference():
    """Today's scores, live: only where the installed package folder is writable (pycocoevalcap's own way)."""
    if not _writable(_package_dir() / "tokenizer"):
        return None
    return _reference_scores()


# Run by the non-root user / in the read-only mount namespace: check that the package folder really is
# read-only there, then score.
_SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path
from pycocoevalcap.tokenizer import ptbtokenizer
from eval.caption_metrics import METRICS, score_captions

pkg = Path(ptbtokenizer.__file__).resolve().parents[1]
try:
    with tempfile.NamedTemporaryFile(dir=pkg / "tokenizer"):
        pass
    sys.exit("SETUP: the package folder " + str(pkg) + " is writable here")
except OSError:
    pass
refs = {int(k): v for k, v in json.loads(sys.argv[1]).items()}
preds = {int(k): v for k, v in json.loads(sys.argv[2]).items()}
result = score_captions(refs, preds, metrics=METRICS)
print(json.dumps({"package": str(pkg), "metrics": result["metrics"],
                  "per_image": {str(k): v for k, v in result["per_image"].items()}}))
"""
_PROBE = "import numpy, pycocoevalcap.tokenizer.ptbtokenizer, eval.caption_metrics"


def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _make_read_only(tree: Path) -> None:
    for path in sorted(tree.rglob("*"), reverse=True):
        path.chmod(0o555 if path.is_dir() else 0o444)
    tree.chmod(0o555)


def _make_writable(tree: Path) -> None:
    tree.chmod(0o755)
    for path in tree.rglob("*"):
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def _run_non_root(tmp: Path) -> subprocess.CompletedProcess:
    site = tmp / "site"
    shutil.copytree(_package_dir(), site / "pycocoevalcap", ignore=shutil.ignore_patterns("__pycache__"))
    _make_read_only(site / "pycocoevalcap")
    tmp.chmod(0o755)
    site.chmod(0o755)
    path = os.pathsep.join([str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, PYTHONPATH=path, PYTHONDONTWRITEBYTECODE="1")
    kwargs: dict = {}
    if os.geteuid() == 0:
        uid, gid = _nobody()
        kwargs = {"user": uid, "group": gid, "extra_groups": []}
        env["HOME"] = str(tmp)
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=tmp, capture_output=True, text=True,
                               timeout=120, **kwargs)
    except PermissionError as err:  # no CAP_SETUID here, or the interpreter is not executable by nobody
        pytest.skip(f"cannot run {sys.executable} as a non-root user here (the read-only-bind case runs "
                    f"instead): {err}")
    if probe.returncode != 0:
        who = "nobody" if kwargs else "this user"
        pytest.skip(f"{who} cannot import this Python environment (the interpreter or the project is not "
                    f"readable by {who}): {probe.stderr.strip().splitlines()[-1:]}")
    return subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(REFERENCES), json.dumps(PREDICTIONS)],
                          env=env, cwd=tmp, capture_output=True, text=True, timeout=300, **kwargs)


def _run_read_only_bind(tmp: Path) -> subprocess.CompletedProcess:
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (the non-root case covers this user)")
    if shutil.which("unshare") is None:
        pytest.skip("no 'unshare' (util-linux) for a private mount namespace")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace here: {probe.stderr.strip()}")
    pkg = str(_package_dir())
    shell = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, PYTHONPATH=path, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, "sh", pkg,
                           sys.executable, "-c", _SCRIPT, json.dumps(REFERENCES), json.dumps(PREDICTIONS)],
                          env=env, cwd=tmp, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("how", ["non-root", "read-only-bind"])
def test_scores_with_the_package_folder_read_only(how, reference):
    tmp = Path(tempfile.mkdtemp(prefix="structlora-ro-"))
    try:
        proc = _run_non_root(tmp) if how == "non-root" else _run_read_only_bind(tmp)
    finally:
        _make_writable(tmp)
        shutil.rmtree(tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if how == "non-root":
        assert got["package"].startswith(str(tmp)), got["package"]  # the read-only copy was the one used
    assert set(got["metrics"]) == set(METRICS)
    for name, value in TODAY.items():
        assert got["metrics"][name] == pytest.approx(value, rel=1e-12, abs=0), name
    if reference is not None:  # byte-identical to pycocoevalcap's own tokenizer and scorers, run here
        corpus, per_image = reference
        assert {k: v for k, v in got["metrics"].items() if k != "METEOR"} == corpus
        assert {image: {k: v for k, v in values.items() if k != "METEOR"}
                for image, values in got["per_image"].items()} == per_image


def test_tokenizer_is_pycocoevalcaps_caption_for_caption():
    if not _writable(_package_dir() / "tokenizer"):
        pytest.skip("pycocoevalcap's own PTBTokenizer cannot run here: its package folder is read-only")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ours = ptb_tokenize(HELD_OUT)
    request = {k: [{"caption": c} for c in caps] for k, caps in HELD_OUT.items() if caps}
    theirs = PTBTokenizer().tokenize(request)
    assert ours == {**theirs, "d": []}
    # pycocoevalcap's quirk, kept: -lowerCase turns -LRB- into -lrb-, which its punctuation list misses
    assert ours["a"][0] == "a man 's hat -lrb- red -rrb- on a table"


def test_nothing_is_written_into_the_package_folder():
    before = {p: p.stat().st_mtime_ns for p in _package_dir().rglob("*") if "__pycache__" not in p.parts}
    ptb_tokenize({1: ["a red square."], 2: ["two green triangles"]})
    after = {p: p.stat().st_mtime_ns for p in _package_dir().rglob("*") if "__pycache__" not in p.parts}
    assert after == before
