"""The ``hone`` command line. Each subcommand is a thin wrapper over the library; the groups live in :mod:`hone.cli.files`,
:mod:`~hone.cli.training`, :mod:`~hone.cli.deploy` and :mod:`~hone.cli.cluster`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from hone.cli import cluster, deploy, files, training
from hone.config import ConfigError

EXIT_INVALID = 2



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hone", description="Fine-tune, tune and serve LLMs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    files.add_commands(sub)
    training.add_commands(sub)
    deploy.add_commands(sub)
    cluster.add_commands(sub)
    return parser


def _known_errors() -> tuple[type[Exception], ...]:
    """Errors whose message tells the user what to do: printed without a traceback (``HONE_DEBUG=1`` shows it)."""
    from hone.errors import (
        ArtifactError,
        ClusterError,
        DataError,
        ModelError,
        PipelineError,
        QuantizeError,
        RegistryError,
        ServeError,
        StorageError,
        SubmitError,
        TrainError,
    )

    return (ArtifactError, ClusterError, DataError, FileNotFoundError, ModelError, PipelineError, QuantizeError, RegistryError,
            ServeError, StorageError, SubmitError, TrainError)


def main(argv: Sequence[str] | None = None) -> int:
    from hone.runtime import quiet_libraries

    quiet_libraries(console=True)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`hone data preview job.yaml -n 2 data.max_length=64`).
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    fn: Callable[[argparse.Namespace], int] = args.fn
    if os.environ.get("HONE_SUBMITTED"):
        from hone.submit import enter_stable_workdir

        enter_stable_workdir()
    try:
        return fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except _known_errors() as e:
        if os.environ.get("HONE_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
