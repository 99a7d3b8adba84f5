"""`python -m runtime.launch_server --model-path DIR [flags]`: start the HTTP server."""

from __future__ import annotations

import logging
import sys

from runtime.server_args import parse_server_args_or_exit


def main(argv: list[str] | None = None) -> int:
    server_args = parse_server_args_or_exit(argv)
    logging.basicConfig(
        level=getattr(logging, server_args.log_level.upper()),
        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
    )
    if server_args.node_rank > 0:
        from runtime.launch import run_worker_node

        return run_worker_node(server_args)
    from runtime.http_server import launch_server

    return launch_server(server_args)


if __name__ == "__main__":
    sys.exit(main())
