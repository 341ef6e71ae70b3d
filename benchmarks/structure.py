"""The code's shape, for before/after figures of a restructuring (issue 31's list).

Counts over the package ``embedpin/`` of a tree:

- lines (every .py file, as ``wc -l``) and functions (AST), with the number over 30 lines and the
  median length;
- the largest signatures (parameters, ``self`` / ``cls`` not counted);
- facts defined more than once: for each fact the issue named, the files that spell it
  (a literal or the code that computes it) — 1 is one definition;
- ``duplicates`` pairs (the tool's count over the package) and import-linter's contracts.

    python benchmarks/structure.py [TREE]

Headlines last, one per line, as ``name: value``.
"""

from __future__ import annotations

import ast
import re
import statistics
import subprocess
import sys
from pathlib import Path

# fact -> a pattern that matches each place defining it (string literals, numbers, mixing code)
FACTS = {
    "flip_ppd": r"67\.0\b|3840",
    "generations_folder": r"[\"']generations/|/ ?[\"']generations[\"']|[\"']generations[\"'] ?/",
    "pinned_token": r"[\"']<pinned>[\"']",
    "cpu_max_batch": r"(max_batch|MAX_BATCH|CPU|elsewhere)\W.*\b256\b",
    "seed_mixer": r"SeedSequence\(\[",
    "non_finite_loss": r"\b1e10\b|\b1e9\b",
    "block_names": r"[\"']linear_start[\"'],",
    "basis_names": r"[(\[]\s*[\"']image[\"'], [\"']pca[\"']",
    "weighting_names": r"[\"']geometric[\"'],|[\"']geometric[\"']: \S",
    "placement_names": r"[\"']before[\"'], [\"']after[\"']",
}


def functions(root: Path):
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                params = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]
                          if a.arg not in ("self", "cls")]
                params += [x.arg for x in (args.vararg, args.kwarg) if x]
                yield path.relative_to(root.parent), node, len(params)


def fact_files(root: Path) -> dict[str, int]:
    """For each fact, the files that spell it (help texts and comments included: a default
    restated in words goes stale like a copy of code)."""
    counts = dict.fromkeys(FACTS, 0)
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for fact, pattern in FACTS.items():
            counts[fact] += bool(re.search(pattern, text))
    return counts


def main() -> None:
    tree = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    root = tree / "embedpin"
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in root.rglob("*.py"))
    fns = list(functions(root))
    lengths = [n.end_lineno - n.lineno + 1 for _, n, _ in fns]
    biggest = sorted(fns, key=lambda f: -f[2])[:5]
    for path, node, count in biggest:
        print(f"signature: {path}:{node.name} {count} parameters")
    facts = fact_files(root)
    for fact, n in facts.items():
        print(f"fact {fact}: {n} file(s)")
    dup = subprocess.run(["duplicates", "--repo", str(root), "--most", "200", "--seconds", "120"],
                         capture_output=True, text=True).stdout.splitlines()
    pairs = re.match(r"(\d+) pair", dup[0]) if dup else None
    lint = subprocess.run(["lint-imports"], cwd=tree, capture_output=True, text=True).stdout
    kept = re.search(r"Contracts: (\d+) kept, (\d+) broken", lint)
    print(f"lines: {lines}")
    print(f"functions: {len(fns)}")
    print(f"functions_over_30_lines: {sum(n > 30 for n in lengths)}")
    print(f"median_function_lines: {statistics.median(lengths)}")
    print(f"largest_signature: {biggest[0][2]}")
    print(f"facts_defined_more_than_once: {sum(n > 1 for n in facts.values())}")
    print(f"duplicates_pairs: {pairs.group(1) if pairs else (0 if dup and dup[0].startswith('no dup') else '?')}")
    print(f"import_contracts: {kept.group(1) + ' kept, ' + kept.group(2) + ' broken' if kept else '?'}")


if __name__ == "__main__":
    main()
