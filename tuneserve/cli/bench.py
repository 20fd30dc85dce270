"""`tuneserve bench ...` sub-commands."""

from __future__ import annotations


def add_bench_parser(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    from tuneserve.bench import context, families, offline, overload, responsiveness, serve, soak, spec, step
    from tuneserve.bench.peers import compare as peers
    from tuneserve.deploy import bench as replicas  # the bench layer cannot import deploy; the CLI can

    p = sub.add_parser("bench", help="benchmarks: offline, peers, context, serve, spec, soak, overload, health, "
                       "replicas, families, step")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    offline.add_parser(bsub)
    families.add_parser(bsub)
    peers.add_parser(bsub)
    context.add_parser(bsub)
    serve.add_parser(bsub)
    spec.add_parser(bsub)
    step.add_parser(bsub)
    soak.add_parser(bsub)
    overload.add_parser(bsub)
    responsiveness.add_parser(bsub)
    replicas.add_parser(bsub)
    p.set_defaults(func=lambda ns: (p.print_help() or 2) if not getattr(ns, "bench_main", None)
                   else ns.bench_main(ns))
