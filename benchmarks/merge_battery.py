"""Merge two runs of ``bench_registration_battery.py`` made with the same registration defaults.

Rows of the NEW run that failed or were stopped (``error``) are replaced by the OLD run's row for the
same (group, pair, method) when it has one, marked ``"from": <old command>``; rows only in the old run
are added the same way.  The summary and the markdown are rebuilt with the battery's own code.  Used
when a time-boxed re-run skipped peers that an earlier run of the same pairs and defaults had measured.

Usage:  python benchmarks/merge_battery.py OLD.json NEW.json --out benchmarks/registration_battery_X.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def merge(old: dict, new: dict) -> list[dict]:
    key = lambda r: (r["group"], r["pair"], r["method"])  # noqa: E731
    old_rows = {key(r): r for r in old["rows"] if "error" not in r}
    rows, seen = [], set()
    for r in new["rows"]:
        k = key(r)
        seen.add(k)
        if "error" in r and k in old_rows:
            rows.append({**old_rows[k], "from": old["command"]})
        else:
            rows.append(r)
    for k, r in old_rows.items():
        if k not in seen:
            rows.append({**r, "from": old["command"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--out", required=True)
    parser.add_argument("--note", default="", help="a sentence for the header (what was merged and why)")
    args = parser.parse_args()
    import bench_registration_battery as battery

    old, new = (json.loads(Path(p).read_text()) for p in (args.old, args.new))
    rows = merge(old, new)
    summary = battery.summarise(rows)
    ns = argparse.Namespace(**new.get("args", {"threads": 2, "peer_pairs": "-", "syncc_pairs": "-"}))
    command = f"{new['command']}  +  rows of `{old['command']}` (merged by benchmarks/merge_battery.py)"
    text = battery.markdown(rows, summary, command, ns, new["load_before"], new["load_after"])
    if args.note:
        text = text.replace("\n\n## Summary", f"\n\n{args.note}\n\n## Summary", 1)
    out = Path(args.out)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "load_before": new["load_before"],
                                                    "load_after": new["load_after"], "old_load": [old["load_before"], old["load_after"]],
                                                    "summary": summary, "rows": rows}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
