"""The `digit` command: inspect artifacts, run the Prefect flow, print the stages' wall times, apply presets."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="digit", description="DiGIT pipeline tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_inspect = sub.add_parser("inspect", help="summarise a pipeline artifact and write a picture of it")
    p_inspect.add_argument(
        "path", help="an artifact: data/images, a shard, data/features.zarr, a model dir, ..."
    )
    p_inspect.add_argument(
        "--reports", default="reports/inspect", help="where pictures go (default: %(default)s)"
    )
    p_flow = sub.add_parser("flow", help="run stages as a Prefect flow (same code as `dvc repro`)")
    p_flow.add_argument("--params", default="params.yaml")
    p_flow.add_argument("--stages", default="", help="comma-separated stage names (default: all, DAG order)")
    p_flow.add_argument(
        "--runner",
        choices=["threads", "dask"],
        default="threads",
        help="where shard tasks run: threads of this process, or Dask worker processes (default: %(default)s)",
    )
    p_flow.add_argument(
        "--workers",
        type=int,
        default=2,
        help="dask: worker processes of the LocalCluster (default: %(default)s)",
    )
    p_flow.add_argument(
        "--address",
        default=None,
        help="dask: an existing scheduler (e.g. tcp://host:8786) instead of a LocalCluster",
    )
    p_flow.add_argument(
        "--gpu-stages",
        default="",
        help="dask: comma-separated stages whose shard tasks need a worker resource GPU=1 (with --address)",
    )
    p_times = sub.add_parser("times", help="per-stage wall times of the last run (from metrics/*.json)")
    p_times.add_argument("--metrics", default="metrics", help="metrics directory (default: %(default)s)")
    p_preset = sub.add_parser(
        "preset", help="merge named recipes (presets/*.yaml, e.g. imagenet-base) into params.yaml"
    )
    p_preset.add_argument("names", nargs="*", help="presets, applied left to right (or paths to .yaml files)")
    p_preset.add_argument(
        "--params", default="params.yaml", help="the params file to edit (default: %(default)s)"
    )
    p_preset.add_argument(
        "--dry-run", action="store_true", help="validate and print the changes; write nothing"
    )
    p_preset.add_argument("--list", action="store_true", help="list the available presets")
    args = parser.parse_args(argv)

    if args.cmd == "preset":
        from pipeline.presets import PRESETS_DIR, PresetError, apply_presets, available

        if args.list or not args.names:
            for name in available():
                first = (PRESETS_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
                print(f"{name}: {first}")
            return 0
        try:
            _, changes = apply_presets(args.names, args.params, write=not args.dry_run)
        except PresetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for key, old, new in changes:
            print(f"{key}: {old!r} -> {new!r}")
        verb = "would change" if args.dry_run else "changed"
        print(f"{args.params}: {verb} {len(changes)} value(s); validated")
        return 0

    if args.cmd == "inspect":
        from pipeline.inspect import inspect_artifact

        try:
            print(inspect_artifact(args.path, args.reports))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.cmd == "times":
        from pipeline.timings import format_times, stage_times

        try:
            print(format_times(stage_times(args.metrics)))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.cmd == "flow":
        from pipeline.flow import ShardJobsNotPicklable, digit_flow

        stages = [s for s in args.stages.split(",") if s] or None
        try:
            results = digit_flow(
                args.params,
                stages,
                runner=args.runner,
                workers=args.workers,
                address=args.address,
                gpu_stages=[s for s in args.gpu_stages.split(",") if s],
            )
        except (ShardJobsNotPicklable, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for name, metrics in results.items():
            print(f"{name}: {metrics}")
        return 0
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
