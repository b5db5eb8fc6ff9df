"""Report saved closed-loop results: tables, plots, runs compared trial by trial, runs pooled.

    python report_libero.py eval.json --plot eval.png          # a saved run's table (and plot)
    python report_libero.py --compare before.json after.json   # two runs of the same trials, mode by mode
    python report_libero.py --compare run.json run.json --modes dense@sample rsd@sample   # two modes
    python report_libero.py --pool eval_s0.json eval_s1.json eval_s2.json --json pooled.json
    python report_libero.py --suites spatial.json object.json goal.json long.json   # the four-suite table
    python report_libero.py --suites spatial.json object.json --expert expert_spatial.json expert_object.json

Nothing is run: every number comes from result files that ``eval_libero.py`` wrote (see
``results.py`` for the statistics). ``--compare`` pairs two results of the same trials (suite,
tasks, trials, init states, seed) trial by trial: how many end the same, which only one run
solved, and the exact McNemar test. ``--pool`` pools results of the same trials and settings
over other scene seeds, mode by mode: successes, interval, the paired test against dense over
all trials, each run's own speed-up, passes and acceptance over all chunks. ``--suites`` sets
results of different suites side by side in the layout papers use (a column per suite and the
average), the scripted expert's row from its collections (``collect_actions.py --json``) with
``--expert``, published image-based policies below for scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cli
from cli import arg
from fileio import check_outputs, write_json
from results import (add_statistics, compare_runs, load_expert_result, load_result, pool_runs, print_comparison,
                     print_suite_table, report, suite_table)

log = logging.getLogger("report_libero")


@dataclass
class ReportArgs:
    results: list[str] = arg(None, "result JSON file(s) written by eval_libero.py (or a pooled result)",
                             factory=list, nargs="+", positional=True)
    compare: bool = arg(False, "compare two results of the same trials trial by trial")
    modes: list[str] | None = arg(None, "with --compare: pair mode FIRST of the first result with mode SECOND "
                                        "of the second (give one file twice to pair two modes of one run)",
                                  nargs=2, metavar=("FIRST", "SECOND"))
    pool: bool = arg(False, "pool results of the same trials and settings over other scene seeds")
    suites: bool = arg(False, "set results of different suites side by side (one result, or pooled result, per "
                              "suite)")
    expert: list[str] = arg(None, "with --suites: collect_actions.py --json results of the scripted expert (one per "
                                  "suite), set as a row beside the policies", factory=list, nargs="+", metavar="JSON")
    json: str | None = cli.json_arg()
    plot: str | None = arg(None, "success (95% interval) against latency per mode, and per task", metavar="PNG")

    def __post_init__(self):
        cli.require(self.compare + self.pool + self.suites <= 1, "give one of --compare, --pool and --suites")
        if self.compare:
            cli.require(len(self.results) == 2, f"--compare takes two results, got {len(self.results)}")
            cli.require(self.plot is None, "--compare prints a table; --plot draws one result or a pool")
        elif self.pool:
            cli.require(len(self.results) >= 2, f"--pool takes two or more results, got {len(self.results)}")
        elif self.suites:
            cli.require(self.plot is None, "--suites prints a table; --plot draws one result or a pool")
        else:
            cli.require(len(self.results) == 1,
                        f"give one result (or --compare / --pool / --suites), got {len(self.results)}")
        cli.require(self.modes is None or self.compare, "--modes pairs two modes with --compare")
        cli.require(not self.expert or self.suites, "--expert adds a row to the --suites table")


def main(args: ReportArgs) -> dict:
    cli.setup_logging()
    check_outputs({"--json": args.json, "--plot": args.plot}, {"results": args.results})
    if args.compare:
        names = tuple(args.results)
        out = compare_runs(load_result(names[0], "--compare"), load_result(names[1], "--compare"), names,
                           tuple(args.modes) if args.modes else None)
        print_comparison(out, names)
        if args.json:
            write_json(args.json, {"first": names[0], "second": names[1], "modes": out})
        return out
    if args.suites:
        table = suite_table([load_result(p, "--suites") for p in args.results], list(args.results),
                            [load_expert_result(p) for p in args.expert], list(args.expert))
        print_suite_table(table)
        if args.json:
            write_json(args.json, table)
        return table
    if args.pool:
        result = pool_runs([load_result(p, "--pool") for p in args.results], list(args.results))
    else:
        result = load_result(args.results[0], "report_libero.py")
        add_statistics(result)
    report(result, args.json, args.plot)
    return result


def build_parser() -> cli.ArgsParser:
    return cli.ArgsParser(ReportArgs, __doc__.splitlines()[0])


if __name__ == "__main__":
    cli.run(main, build_parser())
