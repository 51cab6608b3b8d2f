"""Caption metrics with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.

The values are pycocoevalcap's raw ones (CIDEr 1.162 is "116.2" in a paper), computed the way
``COCOEvalCap.evaluate`` computes them: PTB-tokenise references and candidates (Stanford
CoreNLP via Java, lower-cased, punctuation dropped), then each scorer on the tokenised text.
Differences from ``COCOEvalCap``, and why:

- One PTB tokenizer run for references and candidates together (one Java start, not two);
  tokenisation is line by line, so the result is identical.
- The PTB tokenizer runs from a temporary directory. pycocoevalcap's ``PTBTokenizer`` writes its
  input into a temporary file inside its own package folder, next to the Stanford CoreNLP jar,
  which fails wherever that folder is not writable by the running user (a system-wide install
  in a container image run as a non-root user, a shared or admin-owned environment). The same
  Java command runs on the same jar with the same input file, written into a fresh temporary
  directory, and its output is processed the same way; nothing is written into a package
  folder. METEOR writes nothing (it only reads its jar and paraphrase table).
- Carriage returns and other Unicode line breaks in a caption are replaced by spaces before
  tokenising (pycocoevalcap only replaces '\\n'; the Java tokenizer would split such a caption
  into two lines and shift every later caption onto the wrong image). The tokenised result is
  checked caption by caption.
- SPICE is left out: it needs a separate Stanford CoreNLP download that these machines
  cannot make.
- An image with references but no prediction is scored as an empty caption (what a model that
  said nothing gets: 0 for CIDEr, METEOR and ROUGE-L, and it counts in BLEU's corpus lengths),
  and is reported in ``missing`` / ``coverage``. ``COCOEvalCap`` would crash instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from eval.errors import EvalInputError, JavaNotFoundError

BLEU_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
METRICS = (*BLEU_KEYS, "METEOR", "ROUGE_L", "CIDEr")
_JAVA_METRICS = frozenset({"METEOR"})  # plus tokenisation, which always needs Java
_LINE_BREAKS = re.compile(r"[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def require_java() -> str:
    """Path of `java`; a clear error if there is none (pycocoevalcap would fail with a bare OSError)."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "caption metrics need a Java runtime (pycocoevalcap's PTB tokenizer and METEOR run Java), "
            "and no 'java' was found on PATH: install one, e.g. 'apt-get install -y default-jre-headless'"
        )
    return java


def _one_line(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text.replace("\n", " "))


def _run_ptb_tokenizer(java: str, lines: list[str]) -> list[str]:
    """pycocoevalcap's ``PTBTokenizer.tokenize`` on one-line captions, without writing into its package folder.

    The same command (``java -cp stanford-corenlp-3.4.1.jar edu.stanford.nlp.process.PTBTokenizer
    -preserveLines -lowerCase FILE``, the jar pycocoevalcap ships), the same input file (the
    captions joined by '\\n', UTF-8) and the same post-processing (split the output on '\\n',
    drop pycocoevalcap's punctuation tokens); only the input file and Java's working directory
    are a fresh temporary directory instead of the jar's folder.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                       ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    if not os.path.isfile(jar):
        raise RuntimeError(f"pycocoevalcap's Stanford CoreNLP jar is missing: {jar}")
    with tempfile.TemporaryDirectory(prefix="structlora-ptb-") as tmp:
        with open(os.path.join(tmp, "captions.txt"), "wb") as f:
            f.write("\n".join(lines).encode())
        cmd = [java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
               "captions.txt"]
        proc = subprocess.run(cmd, cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"PTB tokenizer (Java) failed with exit code {proc.returncode}: {tail}")
    out = proc.stdout.decode().split("\n")
    if any(line.strip() for line in out[len(lines):]):
        raise RuntimeError(f"PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in out[:len(lines)]]


def ptb_tokenize(captions: Mapping[Any, Sequence[str]]) -> dict[Any, list[str]]:
    """PTB-tokenise ``{key: [caption, ...]}`` in one Java run, as pycocoevalcap does.

    Returns the same keys with lists of the same length (empty lists stay empty). The result is
    pycocoevalcap's ``PTBTokenizer().tokenize``'s, caption for caption; unlike it, this never
    writes into the pycocoevalcap package folder (module docstring).
    """
    java = require_java()
    keys = [key for key, caps in captions.items() for _ in caps]
    lines = [_one_line(c) for caps in captions.values() for c in caps]
    tokenized = _run_ptb_tokenizer(java, lines) if lines else []
    if len(tokenized) != len(lines):
        raise RuntimeError(f"PTB tokenizer returned {len(tokenized)} lines for {len(lines)} captions")
    out: dict[Any, list[str]] = {key: [] for key in captions}
    for key, tokens in zip(keys, tokenized):
        out[key].append(tokens)
    return out


def _bleu(gts: dict, res: dict) -> tuple[dict[str, float], dict[str, list[float]]]:
    from pycocoevalcap.bleu.bleu import Bleu

    corpus, per_image = Bleu(4).compute_score(gts, res, verbose=0)
    return dict(zip(BLEU_KEYS, corpus)), dict(zip(BLEU_KEYS, per_image))


def _meteor(gts: dict, res: dict) -> tuple[dict[str, float], dict[str, list[float]]]:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        corpus, per_image = scorer.compute_score(gts, res)
    finally:
        # Stop the Java subprocess now rather than whenever the garbage collector runs.
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return {"METEOR": corpus}, {"METEOR": list(per_image)}


def _rouge(gts: dict, res: dict) -> tuple[dict[str, float], dict[str, list[float]]]:
    from pycocoevalcap.rouge.rouge import Rouge

    corpus, per_image = Rouge().compute_score(gts, res)
    return {"ROUGE_L": corpus}, {"ROUGE_L": list(per_image)}


def _cider(gts: dict, res: dict) -> tuple[dict[str, float], dict[str, list[float]]]:
    from pycocoevalcap.cider.cider import Cider

    corpus, per_image = Cider().compute_score(gts, res)
    return {"CIDEr": corpus}, {"CIDEr": list(per_image)}


_SCORERS: dict[str, Callable[[dict, dict], tuple[dict[str, float], dict[str, list[float]]]]] = {
    "Bleu": _bleu, "METEOR": _meteor, "ROUGE_L": _rouge, "CIDEr": _cider,
}


def _scorer_names(metrics: Iterable[str]) -> list[str]:
    names: list[str] = []
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"unknown caption metric {metric!r}; choose from {', '.join(METRICS)}")
        name = "Bleu" if metric in BLEU_KEYS else metric
        if name not in names:
            names.append(name)
    return names


def score_tokenized(gts: Mapping[Any, list[str]], res: Mapping[Any, list[str]],
                    metrics: Iterable[str] = METRICS) -> tuple[dict[str, float], dict[Any, dict[str, float]]]:
    """pycocoevalcap scorers on already tokenised text: (corpus values, per-image values).

    `gts` maps image -> tokenised references, `res` image -> [tokenised candidate]; same keys.
    """
    if set(gts) != set(res):
        raise ValueError("references and candidates must cover the same images")
    if not gts:
        raise EvalInputError("no images to score")
    keys = list(gts)
    gts_d = {k: list(gts[k]) for k in keys}
    res_d = {k: list(res[k]) for k in keys}
    wanted = set(metrics)
    corpus: dict[str, float] = {}
    per_image: dict[Any, dict[str, float]] = {k: {} for k in keys}
    for name in _scorer_names(wanted):
        values, images = _SCORERS[name](gts_d, res_d)
        for metric, value in values.items():
            if metric in wanted:
                corpus[metric] = float(value)
                for key, score in zip(keys, images[metric]):
                    per_image[key][metric] = float(score)
    return corpus, per_image


def score_captions(references: Mapping[Any, Sequence[str]], predictions: Mapping[Any, str],
                   metrics: Iterable[str] = METRICS) -> dict:
    """Caption metrics of `predictions` (image_id -> caption) against `references` (image_id -> captions).

    Every image in `references` is scored; ids are matched as strings (7 and "7" agree). A
    prediction for an image without references is an EvalInputError naming the id. Nothing
    passed in is modified.

    Returns ``metrics`` (corpus values, pycocoevalcap names: Bleu_1..4, METEOR, ROUGE_L,
    CIDEr), ``per_image`` (image_id -> values), ``num_images``, ``num_predictions``,
    ``missing``, ``coverage`` and ``missing_ids`` (first 20), and ``notes``.
    """
    metrics = list(metrics)
    _scorer_names(metrics)  # validate names before starting Java
    preds = {str(k): v for k, v in predictions.items()}
    ref_keys = {str(k): k for k in references}
    unknown = [k for k in preds if k not in ref_keys]
    if unknown:
        raise EvalInputError(f"image_id {unknown[0]} has a prediction but no reference captions "
                             f"({len(unknown)} such ids)")
    for image_id, caps in references.items():
        if not caps:
            raise EvalInputError(f"image_id {image_id} has no reference captions")
    missing = [image_id for image_id in references if str(image_id) not in preds]
    # Tokenise references and candidates together: keys (0, id) and (1, id).
    request: dict[Any, list[str]] = {}
    for image_id, caps in references.items():
        request[(0, image_id)] = list(caps)
        request[(1, image_id)] = [preds.get(str(image_id), "")]
    tokens = ptb_tokenize(request)
    gts = {image_id: tokens[(0, image_id)] for image_id in references}
    res = {image_id: tokens[(1, image_id)] for image_id in references}
    corpus, per_image = score_tokenized(gts, res, metrics)
    n = len(references)
    return {
        "metrics": corpus,
        "per_image": per_image,
        "num_images": n,
        "num_predictions": n - len(missing),
        "missing": len(missing),
        "coverage": (n - len(missing)) / n,
        "missing_ids": missing[:20],
        "notes": "pycocoevalcap raw values; SPICE not computed (needs a Stanford CoreNLP download); "
                 "missing predictions scored as empty captions",
    }

