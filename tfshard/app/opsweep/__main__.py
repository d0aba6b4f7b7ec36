"""``python -m tfshard.app.opsweep``: run the op-coverage sweep and print the table.

    python -m tfshard.app.opsweep                      # every op, every config
    python -m tfshard.app.opsweep --list               # how the op list was made
    python -m tfshard.app.opsweep --ops top_k,one_hot --configs 2x4:batch
    python -m tfshard.app.opsweep --markdown docs/op_coverage.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _split(value):
    return [v for v in (value or "").split(",") if v] or None


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfshard.app.opsweep import runner, sweep

    parser = argparse.ArgumentParser(prog="python -m tfshard.app.opsweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print how the op list was derived and exit")
    parser.add_argument("--ops", help="comma-separated op names (random ops as random.<name>)")
    parser.add_argument("--configs", help="comma-separated configs: " + ",".join(runner.CONFIGS_BY_NAME))
    parser.add_argument("--markdown", metavar="PATH", help="also write the Markdown table to PATH")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes at once (default 2)")
    parser.add_argument("--group-size", type=int, default=sweep.GROUP_SIZE, help="samples per compiled function")
    parser.add_argument("--json", metavar="PATH", help="also write every cell as JSON to PATH")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)

    if args.list:
        from tfshard.app.opsweep import oplist

        op_list = sweep.derived_op_list()
        print(oplist.describe(op_list))
        sset = sweep.sample_set()
        kinds = {}
        for op, kind in sset.kinds.items():
            kinds.setdefault(kind, []).append(op)
        print(f"\n{len(sset.samples)} samples:")
        for kind, ops in sorted(kinds.items()):
            print(f"  {kind:<7} {len(ops):>4} ops: {', '.join(ops)}")
        print("\nSkipped:")
        for op, reason in sset.skipped.items():
            print(f"  {op:<20} {reason}")
        return 0

    from tfshard.app.opsweep import expected, report

    def progress(message):
        if not args.quiet:
            print(f"[{time.strftime('%X')}] {message}", file=sys.stderr, flush=True)

    result = sweep.run_sweep(configs=_split(args.configs), ops=_split(args.ops),
                             group_size=args.group_size, jobs=args.jobs, progress=progress)
    print(report.text(result))
    unexpected, stale = expected.check(result)
    if unexpected:
        print(f"\n{len(unexpected)} failing cells not in EXPECTED_FAILURES "
              "(tfshard/app/opsweep/expected.py):")
        for (op, config, part), cell in sorted(unexpected.items()):
            print(f"  ({op!r}, {config!r}, {part!r}): {cell.kind}: {cell.detail[:120]}")
    if stale:
        print(f"\n{len(stale)} EXPECTED_FAILURES entries that now pass (remove them):")
        for key in sorted(stale):
            print(f"  {key!r}")
    if args.json:
        import json

        cells = [{"op": op, "config": config, "part": part, "kind": cell.kind, "detail": cell.detail,
                  "sample": cell.sample, "split": cell.split}
                 for (op, config, part), cell in sorted(result.cells.items())]
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"seconds": result.seconds, "workers": result.workers, "cells": cells}, f, indent=0)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(report.markdown(result, expected.EXPECTED_FAILURES))
        print(f"\nwrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
