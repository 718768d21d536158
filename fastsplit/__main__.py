"""Console entry point: ``fastsplit demo [options]`` (also ``python -m fastsplit demo``)."""

from __future__ import annotations

import sys

USAGE = """usage: fastsplit <command> [options]

commands:
  demo    grow a network on MNIST while it trains and compare it with fixed-size
          baselines (fastsplit demo --help for the options); fastsplit demo
          --task lm: a byte-level language model trained from scratch against
          the same model grown, with its plot
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    if not argv:  # a usage error, as argparse reports one: on stderr, exit status 2
        print(f"fastsplit: a command is required\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    if argv[0] == "demo":
        from .demo import main as demo

        return demo(argv[1:])
    print(f"fastsplit: unknown command {argv[0]!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
