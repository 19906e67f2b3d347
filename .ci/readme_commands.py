"""Runs the README commands that need no dataset or download, as written (paths aside).

The quickstart (`python train.py --config configs/tiny.py --workdir /tmp/detr_tiny`, the full
20-epoch run), `python eval.py --workdir DIR` on its workdir, and the predict example (the
synthetic images written by the README's `python -c` snippet, then `predict.py ...
--attention`), with every `/tmp/` path moved into a fresh temporary directory. Fails if a
command fails or the quickstart ends below COCO AP50 0.5 (the README says 0.79-0.86).
Every other README command is parsed by tests/test_readme.py.
"""

import glob
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from test_readme import readme_commands  # noqa: E402


def main():
  commands = readme_commands()
  quickstart = next(c for c in commands if c[:2] == ["python", "train.py"])
  workdir = quickstart[quickstart.index("--workdir") + 1]
  evaluate = next(c for c in commands if c[:2] == ["python", "eval.py"])
  shapes = [
    c
    for c in commands
    if c[:2] in (["mkdir", "-p"], ["python", "-c"]) and any("/tmp/shapes" in w for w in c)
  ]
  predict = next(c for c in commands if c[:2] == ["python", "predict.py"] and "--attention" in c)
  evaluate = evaluate[:2] + ["--workdir", workdir]  # eval.py's example on the quickstart's run
  predict[predict.index("--workdir") + 1] = workdir
  with tempfile.TemporaryDirectory() as tmp:
    for command in [quickstart, evaluate, *shapes, predict]:
      words = [w.replace("/tmp/", f"{tmp}/") for w in command]
      print("+", " ".join(words)[:300], flush=True)
      subprocess.run(words, cwd=REPO, check=True)
    pattern = os.path.join(workdir.replace("/tmp/", f"{tmp}/"), "eval", "step_*_metrics.json")
    step_of = lambda path: int(os.path.basename(path).split("_")[1])
    metrics = max(glob.glob(pattern), key=step_of)
    ap50 = json.load(open(metrics))["AP50"]
    print(f"quickstart: {metrics}: AP50 {ap50:.3f}")
    if ap50 < 0.5:
      sys.exit(f"the quickstart ended at AP50 {ap50:.3f} < 0.5")
    output = predict[predict.index("--output") + 1].replace("/tmp/", f"{tmp}/")
    detections = os.path.join(output, "detections.json")
    count = len(json.load(open(detections)))
    print(f"predict: {count} detections in {detections}")
    if not count:
      sys.exit(f"predict.py wrote no detections to {detections}")


if __name__ == "__main__":
  main()
