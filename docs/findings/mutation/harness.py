"""Apply each targeted mutant of mutants.py to the source, run the test files that cover its
area (before: the layout-done tests in before_tests/; after: tests/), restore the source.

Run from the repository root, on a copy if you keep working meanwhile (it edits the source):
    git archive layout-done tests | tar -x --transform 's,^tests,before_tests,'
    .venv/bin/python docs/findings/mutation/harness.py [ID_OR_AREA,...] [before,after]
One JSON line per mutant on stdout and in mutation_results.jsonl ("caught" = pytest exit 1).
"""
import json, os, pathlib, subprocess, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mutants import M, TESTS
only = set(sys.argv[1].split(",")) if len(sys.argv) > 1 and sys.argv[1] else None
which = sys.argv[2].split(",") if len(sys.argv) > 2 else ["before", "after"]
out = pathlib.Path("mutation_results.jsonl")
for mid, area, f, old, new in M:
    if only and mid not in only and area not in only:
        continue
    p = pathlib.Path(f); src = p.read_text()
    if src.count(old) != 1:
        print(mid, "PATTERN COUNT", src.count(old), flush=True); continue
    p.write_text(src.replace(old, new))
    try:
        res = {"id": mid, "area": area}
        for k, tests in zip(("before", "after"), TESTS[area]):
            if k not in which:
                continue
            t0 = time.time()
            r = subprocess.run([".venv/bin/python", "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", "-q", "-x",
                                "-m", "not slow and not gpu", *tests], capture_output=True, text=True,
                               env={**os.environ, "MPLBACKEND": "Agg", "HYPOTHESIS_PROFILE": "ci"})
            lines = r.stdout.strip().splitlines()
            res[k] = "caught" if r.returncode == 1 else ("survived" if r.returncode == 0 else f"rc{r.returncode}")
            res[k + "_line"] = lines[-1] if lines else r.stderr[-200:]
            res[k + "_s"] = round(time.time() - t0, 1)
    finally:
        p.write_text(src)
    print(json.dumps(res), flush=True)
    with out.open("a") as fh:
        fh.write(json.dumps(res) + "\n")
