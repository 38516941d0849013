"""Compares the records of two `run.sh` outputs: every JSON and JSONL file, timings and the run
directories' own paths aside. Prints one line per file and the number of differences.

    python3 experiments/records/compare.py BEFORE_OUT AFTER_OUT
"""

import json
import pathlib
import sys


def comparable(value, roots):
    """`value` without timing fields, with the run directories' paths replaced by RUN."""
    if isinstance(value, dict):
        return {
            key: comparable(item, roots)
            for key, item in value.items()
            if not (key.startswith("time") or "seconds" in key or key == "elapsed_s")
        }
    if isinstance(value, list):
        return [comparable(item, roots) for item in value]
    if isinstance(value, str):
        for root in sorted(roots, key=lambda r: -len(str(r))):  # "a2" before its prefix "a"
            value = value.replace(str(root), "RUN")
    return value


def records(path, roots):
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [comparable(json.loads(line), roots) for line in text.splitlines()]
    return comparable(json.loads(text), roots)


def record_files(root):
    """Record files relative to `root` (orbax checkpoints and machine descriptions aside)."""
    return {
        path.relative_to(root)
        for path in root.rglob("*.json*")
        if "checkpoints" not in path.parts and path.name != "run_info.json"
    }


def main(before: pathlib.Path, after: pathlib.Path) -> int:
    roots = (before, after)
    differences = 0
    for name in sorted(record_files(before) | record_files(after)):
        if not (before / name).exists() or not (after / name).exists():
            print("only in one:", name)
            differences += 1
        elif records(before / name, roots) != records(after / name, roots):
            print("DIFF", name)
            differences += 1
        else:
            print("same", name)
    print("differences:", differences)
    return 0


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])))
