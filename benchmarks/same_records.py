"""Check that two records folders hold the same records: every shard byte for byte, every JSON
(manifest, scene parts, build settings) as parsed. For changes that must not change the records.

Run by hand, e.g. a reference build with the code before a change, then the same build after it:
    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before .venv/bin/python -P -m rts_tf build-records ... --out /tmp/records_before
    .venv/bin/python -P -m rts_tf build-records ... --out /tmp/records_after
    .venv/bin/python benchmarks/same_records.py /tmp/records_before /tmp/records_after
(`-P`: the current folder's rts_tf does not shadow the one PYTHONPATH names.) Exits 1 when they differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def differences(first: Path, second: Path) -> list[str]:
    """What differs between two records folders (empty when they hold the same records)."""
    files = [sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) for root in (first, second)]
    found = [f"only in {root}: {path}" for root, mine, theirs in ((first, *files), (second, *files[::-1]))
             for path in mine if path not in theirs]
    for path in sorted(set(files[0]) & set(files[1])):
        a, b = (first / path).read_bytes(), (second / path).read_bytes()
        if path.suffix == ".json":
            left, right = json.loads(a), json.loads(b)
            if left != right:
                keys = sorted(k for k in set(left) | set(right) if left.get(k) != right.get(k)) \
                    if isinstance(left, dict) and isinstance(right, dict) else []
                found.append(f"{path}: JSON differs" + (f" in {', '.join(keys)}" if keys else ""))
        elif a != b:
            found.append(f"{path}: bytes differ")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args()
    found = differences(args.first, args.second)
    count = sum(1 for p in args.first.rglob("*") if p.is_file())
    print("\n".join(found) if found else f"identical: {count} files (shards byte for byte, JSON as parsed)")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
